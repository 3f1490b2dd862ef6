"""--format ktap and --junit FILE (ksmbench/formats/): KTAP that the KTAP
parser of ksmbench.selftests reads back, in the layout of the kernel's
Documentation/dev-tools/ktap.rst, and JUnit XML with the right counts."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ksmbench.cli import main
from ksmbench.formats import Cell, ExpectCheck, RunView
from ksmbench.formats.junit_out import junit_tree
from ksmbench.formats.ktap_out import render_ktap
from ksmbench.selftests.ktap import ERROR, FAIL, PASS, SKIP, parse_ktap

VERDICT_TO_KTAP = {"match": PASS, "observed": PASS, "mismatch": FAIL, "error": ERROR, "n/a": SKIP}


def _blocks(text: str):
    """(top-level lines, [(subtest name, dedented lines, the parent's result line)])"""
    lines = text.splitlines()
    top, blocks, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  "):
            block = []
            while lines[i].startswith("  "):
                block.append(lines[i][2:])
                i += 1
            j = i
            while lines[j].startswith("# "):    # a summary, as KUnit prints it
                j += 1
            blocks.append((block, lines[j]))   # the parent's result follows its subtests
            continue
        top.append(line)
        i += 1
    return top, blocks


def _run(tmp_path, capsys, *extra):
    out = tmp_path / "runs"
    junit = tmp_path / "junit.xml"
    status = main(["run", "zero-pages", "prctl-merge", "dup-below-max",
                   "--kernel", "emulator:linux-6.1", "--kernel", "emulator:linux-6.6",
                   "--profile", "linux-6.6", "--jobs", "1", "--out", str(out),
                   "--format", "ktap", "--junit", str(junit), *extra])
    captured = capsys.readouterr()
    (rundir,) = [d for d in out.iterdir() if d.is_dir()]
    return status, captured.out, rundir, junit


def test_ktap_round_trip_through_the_selftests_parser(tmp_path, capsys):
    status, text, rundir, _ = _run(tmp_path, capsys)
    assert status == 2                       # prctl-merge cannot run on 6.1: an error
    meta = json.loads((rundir / "metadata.json").read_text())
    verdicts = {(s, k["kernel"]): v for k in meta["kernels"] for s, v in k["verdicts"].items()}
    assert set(verdicts.values()) >= {"match", "mismatch", "error"}

    lines = text.splitlines()
    assert lines[0] == "KTAP version 1" and lines[1] == "1..6"
    top, blocks = _blocks(text)
    parsed = parse_ktap("\n".join(top))
    assert parsed.plan == 6 and [r.number for r in parsed.results] == [1, 2, 3, 4, 5, 6]
    assert not parsed.repeated and not parsed.unfinished
    got = {}
    for r in parsed.results:
        m = re.fullmatch(r"(\S+) \[(\S+)\]", r.name)
        assert m, r.name
        got[(m[1], m[2])] = r.verdict
    assert got == {key: VERDICT_TO_KTAP[v] for key, v in verdicts.items()}
    counts = {"pass": 0, "fail": 0, "skip": 0, "error": 0}
    for v in got.values():
        counts[v] += 1
    assert parsed.totals == {**counts, "xfail": 0, "xpass": 0}

    expect_rows = (rundir / "expectations.csv").read_text().splitlines()[1:]
    for block, parent in blocks:
        assert block[0] == "KTAP version 1" and block[1].startswith("# Subtest: ")
        name = block[1].removeprefix("# Subtest: ")
        assert re.match(rf"(not )?ok \d+ {re.escape(name)}( #|$)", parent), (name, parent)
        sub = parse_ktap("\n".join(block))
        assert sub.plan == len(sub.results) > 0
        assert [r.number for r in sub.results] == list(range(1, sub.plan + 1))
        scenario, kernel = re.fullmatch(r"(\S+) \[(\S+)\]", name).groups()
        expects = [r for r in sub.results if r.name.startswith("expect ")]
        assert len(expects) == sum(1 for row in expect_rows
                                   if row.startswith(f"{scenario},{kernel},"))
        if verdicts[(scenario, kernel)] == "mismatch":
            assert any(r.verdict == FAIL for r in sub.results)
            failed = [r for r in sub.results if r.verdict == FAIL]
            assert all(r.diagnostics and r.diagnostics[-1].startswith("observed ")
                       for r in failed)
        if verdicts[(scenario, kernel)] == "match":
            assert all(r.verdict == PASS for r in sub.results)


def test_report_prints_the_same_ktap_from_the_run_directory(tmp_path, capsys):
    _, text, rundir, junit = _run(tmp_path, capsys)
    assert main(["report", "--format", "ktap", str(rundir)]) == 1
    assert capsys.readouterr().out == text
    again = tmp_path / "again.xml"
    main(["report", "--junit", str(again), str(rundir)])
    assert again.read_bytes() == junit.read_bytes()


def test_junit_counts(tmp_path, capsys):
    _, _, rundir, junit = _run(tmp_path, capsys)
    meta = json.loads((rundir / "metadata.json").read_text())
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    all_verdicts = [v for k in meta["kernels"] for v in k["verdicts"].values()]
    assert int(root.get("tests")) == 6 == len(all_verdicts)
    assert int(root.get("failures")) == all_verdicts.count("mismatch") > 0
    assert int(root.get("errors")) == all_verdicts.count("error") == 1
    assert int(root.get("skipped")) == 0
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["emulator:linux-6.1", "emulator:linux-6.6"]
    for suite, k in zip(suites, meta["kernels"]):
        cases = suite.findall("testcase")
        assert [c.get("name") for c in cases] == ["zero-pages", "prctl-merge", "dup-below-max"]
        for case in cases:
            v = k["verdicts"][case.get("name")]
            assert (case.find("failure") is not None) == (v == "mismatch")
            assert (case.find("error") is not None) == (v == "error")
        assert int(suite.get("failures")) == list(k["verdicts"].values()).count("mismatch")


def test_na_is_skip_in_ktap_and_junit():
    view = RunView("r", ["debian:6.1"], ["prctl-merge", "zero-pages"], [
        Cell("prctl-merge", "debian:6.1", "n/a", "needs PR_SET_MEMORY_MERGE (Linux 6.4)"),
        Cell("zero-pages", "debian:6.1", "match", None, 1.5, 84,
             [ExpectCheck(4, "global.pages_sharing", "63", "63", True)], []),
    ])
    text = render_ktap(view)
    assert "ok 1 prctl-merge [debian:6.1] # SKIP needs PR_SET_MEMORY_MERGE (Linux 6.4)" in text
    top, blocks = _blocks(text)
    parsed = parse_ktap("\n".join(top))
    assert [r.verdict for r in parsed.results] == [SKIP, PASS]
    assert len(blocks) == 1                   # a skipped test has no subtests
    assert parsed.totals["skip"] == 1 and parsed.totals["pass"] == 1
    root = junit_tree(view).getroot()
    assert (root.get("tests"), root.get("skipped"), root.get("failures")) == ("2", "1", "0")
    assert root.find("testsuite/testcase/skipped").get("message").startswith("needs")
