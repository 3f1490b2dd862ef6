"""ksmbench validate: judging a variant against its base, and its bad inputs.

The judging tests need no kernel: the "kernels" are observations the emulator
predicts for chosen profiles (a base with the series, a variant without it),
then perturbed where a test needs a difference no flag explains.  The
recorded campaign in results/reference is re-judged too.  The bad-input
tests run the real command line (exit 2, one line, no traceback).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ksmbench.compare.builds import WorkTree, KernelSource, read_patch, variants_from
from ksmbench.compare.judge import EXPLAINED, MISSING, UNEXPLAINED, judge, parse_expect, with_flags
from ksmbench.emulator import predict
from ksmbench.errors import UsageError
from ksmbench.compare.identify import probe_scenarios
from ksmbench.scenario import builtin_suite

REPO = Path(__file__).resolve().parents[1]
BASE = "linux-6.12.117"


@pytest.fixture(scope="module")
def scenarios():
    return builtin_suite() + probe_scenarios()


def observe_as(profile, scenarios):
    return {s.name: predict(s, profile) for s in scenarios}


def perturb(observed, scenario, metric, delta=1):
    """The observations with one cell changed (the last point that has ``metric``)."""
    points = list(observed[scenario])
    for i in range(len(points) - 1, -1, -1):
        if points[i].values.get(metric) is not None:
            values = dict(points[i].values)
            values[metric] += delta
            points[i] = replace(points[i], values=values)
            return {**observed, scenario: points}
    raise AssertionError(f"{scenario} has no {metric}")


def test_identical_observations_are_all_equal(scenarios):
    base = observe_as(BASE, scenarios)
    j = judge("v", base, observe_as(BASE, scenarios), scenarios, BASE, {})
    assert j.compared > 500
    assert j.changed == [] and j.unexplained == []
    assert j.verdict == "as-expected"


def test_one_changed_cell_is_unexplained_and_named(scenarios):
    base = observe_as(BASE, scenarios)
    variant = perturb(base, "zero-pages", "global.general_profit", 4096)
    j = judge("v", base, variant, scenarios, BASE, {})
    assert j.verdict == "changed"
    assert len(j.changed) == 1 and len(j.unexplained) == 1
    cell = j.unexplained[0]
    assert cell.kind == UNEXPLAINED
    assert (cell.scenario, cell.metric) == ("zero-pages", "global.general_profit")
    assert cell.variant == cell.base + 4096
    assert "zero-pages step" in cell.describe() and "general_profit" in cell.describe()


def test_the_series_removed_is_explained_by_its_flag_only(scenarios):
    base = observe_as(BASE, scenarios)
    variant = observe_as(BASE + ",-zero_page_tracking", scenarios)
    without = judge("v", base, variant, scenarios, BASE, {})
    assert without.verdict == "changed"
    assert "-zero_page_tracking" in without.flags_blamed
    # zero pages vanish from sysfs and ksm_stat: one-sided cells count as changed
    assert any(c.variant is None and c.metric.endswith("ksm_zero_pages") for c in without.changed)
    expected = judge("v", base, variant, scenarios, BASE, parse_expect("-zero_page_tracking"))
    assert expected.verdict == "as-expected"
    assert len(expected.explained) == len(expected.changed) == len(without.changed)
    assert all(c.kind == EXPLAINED for c in expected.changed)
    # the wrong flag explains nothing it does not predict
    wrong = judge("v", base, variant, scenarios, BASE, parse_expect("-smart_scan"))
    assert wrong.verdict == "changed"


def test_an_expected_change_that_did_not_happen_is_unexplained(scenarios):
    base = observe_as(BASE, scenarios)
    j = judge("v", base, observe_as(BASE, scenarios), scenarios, BASE,
              parse_expect("-zero_page_tracking"))
    assert j.changed == []
    assert j.unexplained and j.verdict == "changed"


def test_a_change_beside_an_explained_one_is_still_unexplained(scenarios):
    base = observe_as(BASE, scenarios)
    variant = perturb(observe_as(BASE + ",-zero_page_tracking", scenarios), "dup-at-max",
                      "global.pages_sharing")
    j = judge("v", base, variant, scenarios, BASE, parse_expect("-zero_page_tracking"))
    assert [c.scenario for c in j.unexplained] == ["dup-at-max"]
    assert j.explained


def test_a_point_reported_on_one_side_only_counts_as_changed(scenarios):
    base = observe_as(BASE, scenarios)
    variant = dict(base)
    variant["zero-munmap"] = base["zero-munmap"][:-1]
    j = judge("v", base, variant, scenarios, BASE, {}, blame=False)
    assert j.unexplained and all(c.variant is MISSING for c in j.unexplained)
    assert j.verdict == "changed"


def test_scenario_errors_make_the_verdict_error(scenarios):
    base = observe_as(BASE, scenarios)
    j = judge("v", base, base, scenarios, BASE, {}, errors=["zero-pages: guest died"])
    assert j.verdict == "error"


def test_expect_parsing():
    assert parse_expect("none") == {} and parse_expect(None) == {}
    assert parse_expect("-zero_page_tracking,+fork_counter_fix") == {
        "zero_page_tracking": False, "fork_counter_fix": True}
    for bad in ("zero_page_tracking", "+nope", "+smart_scan,-smart_scan"):
        with pytest.raises(UsageError):
            parse_expect(bad)
    assert "-zero_page_tracking" in with_flags(BASE, {"zero_page_tracking": False})


# -- patches and the private tree (no build) ------------------------------------------

def test_every_mutant_has_a_description_and_touches_one_to_three_lines():
    patches = sorted((REPO / "vm" / "mutants").glob("*.patch"))
    assert len(patches) >= 8
    for path in patches:
        p = read_patch(path)
        assert p.description and p.description != path.stem, path
        body = path.read_text().splitlines()
        added = [ln for ln in body if ln.startswith("+") and not ln.startswith("+++")]
        removed = [ln for ln in body if ln.startswith("-") and not ln.startswith("---")]
        assert added or removed, path
        assert len(added) <= 3 and len(removed) <= 3, path


def test_each_makes_one_variant_per_patch_and_a_series_one(tmp_path):
    for name in ("b.patch", "a.patch"):
        (tmp_path / name).write_text(f"{name}\n\n--- a/mm/ksm.c\n+++ b/mm/ksm.c\n@@ -1 +1 @@\n-x\n+y\n")
    each = variants_from(tmp_path, each=True)
    assert [v.name for v in each] == ["a", "b"]
    (tmp_path / "series").write_text("b.patch\na.patch\n")
    whole = variants_from(tmp_path, each=False)
    assert len(whole) == 1 and [p.name for p in whole[0].patches] == ["b.patch", "a.patch"]


def _toy_tree(root: Path) -> Path:
    src = root / "linux"
    (src / "mm").mkdir(parents=True)
    (src / "Makefile").write_text("all:\n")
    (src / "Kconfig").write_text("")
    (src / "mm" / "ksm.c").write_text("int a;\nint b;\nint c;\n")
    return src


def test_patches_are_applied_then_reverted_with_times_and_links_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("KSMBENCH_CACHE", str(tmp_path / "cache"))
    src = _toy_tree(tmp_path)
    ksm = src / "mm" / "ksm.c"
    before = ksm.stat()
    patch = tmp_path / "p.patch"
    patch.write_text("change b\n\n--- a/mm/ksm.c\n+++ b/mm/ksm.c\n@@ -1,3 +1,3 @@\n int a;\n"
                     "-int b;\n+int bb;\n int c;\n")
    tree = WorkTree(KernelSource(str(src), src, "test:1", linkable=True))
    tree.ensure()
    copy = tree.src / "mm" / "ksm.c"
    assert copy.stat().st_ino == before.st_ino  # hard-linked, not copied
    with tree.applied([read_patch(patch)]):
        assert "int bb;" in copy.read_text()
        assert ksm.read_text() == "int a;\nint b;\nint c;\n"  # the shared tree is untouched
    assert copy.read_text() == "int a;\nint b;\nint c;\n"
    assert copy.stat().st_mtime_ns == before.st_mtime_ns
    assert not tree.journal.exists()


def test_a_patch_that_does_not_apply_names_the_patch_and_the_file(tmp_path, monkeypatch):
    from ksmbench.compare.builds import VariantError

    monkeypatch.setenv("KSMBENCH_CACHE", str(tmp_path / "cache"))
    src = _toy_tree(tmp_path)
    patch = tmp_path / "bad.patch"
    patch.write_text("--- a/mm/ksm.c\n+++ b/mm/ksm.c\n@@ -1,3 +1,3 @@\n int a;\n"
                     "-int nothere;\n+int bb;\n int c;\n")
    tree = WorkTree(KernelSource(str(src), src, "test:2", linkable=True))
    tree.ensure()
    with pytest.raises(VariantError) as exc:
        with tree.applied([read_patch(patch)]):
            pass
    assert "bad.patch" in str(exc.value) and "mm/ksm.c" in str(exc.value)
    assert (tree.src / "mm" / "ksm.c").read_text() == "int a;\nint b;\nint c;\n"


# -- bad input on the command line ------------------------------------------------------

def _validate(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "ksmbench.cli", "validate", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_source(tmp_path):
    _one_line_error(_validate(str(tmp_path / "nope"), "--patches", str(REPO / "vm" / "mutants")),
                    "no such directory")


def test_source_that_is_not_a_kernel_tree(tmp_path):
    _one_line_error(_validate(str(tmp_path), "--patches", str(REPO / "vm" / "mutants")),
                    "not a kernel source tree")


def test_empty_patch_directory(tmp_path):
    (tmp_path / "p").mkdir()
    _one_line_error(_validate(str(_toy_tree(tmp_path)), "--patches", str(tmp_path / "p")),
                    "no *.patch")


def test_unknown_expect_flag(tmp_path):
    _one_line_error(_validate(str(_toy_tree(tmp_path)), "--patches", str(REPO / "vm" / "mutants"),
                              "--expect", "-no_such_flag"), "no_such_flag")


def test_patch_that_does_not_apply(tmp_path):
    import os

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "bad.patch").write_text(
        "--- a/mm/ksm.c\n+++ b/mm/ksm.c\n@@ -1,3 +1,3 @@\n int a;\n-int zzz;\n+int b;\n int c;\n")
    env = {**os.environ, "KSMBENCH_CACHE": str(tmp_path / "cache")}
    _one_line_error(_validate(str(_toy_tree(tmp_path)), "--patches", str(tmp_path / "p"), env=env),
                    "bad.patch", "mm/ksm.c")


def test_missing_build_tools(tmp_path):
    import os

    env = {**os.environ, "PATH": str(tmp_path)}  # no make, gcc, ...
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.patch").write_text("--- a/mm/ksm.c\n+++ b/mm/ksm.c\n")
    _one_line_error(_validate(str(_toy_tree(tmp_path)), "--patches", str(tmp_path / "p"), env=env),
                    "missing build tools", "vm/install-host-deps --build")


def test_too_little_disk_space(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from ksmbench import cli
    from ksmbench.compare import builds

    usage = namedtuple("usage", "total used free")
    monkeypatch.setenv("KSMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builds.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    status = cli.main(["validate", str(_toy_tree(tmp_path)), "--patches",
                       str(REPO / "vm" / "mutants")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "too little disk space" in err and "GiB" in err
    assert not (tmp_path / "cache" / "validate" / "images").exists()  # nothing half-built
    assert shutil.disk_usage is builds.shutil.disk_usage


# -- the recorded reference runs, judged again ------------------------------------------

REFERENCE = REPO / "results" / "reference"
CAMPAIGN = REFERENCE / "20261201-132232-600e"
COMMENT_ONLY = REFERENCE / "20261201-134215-7c15"


def _copy_run(src: Path, dest: Path) -> Path:
    import shutil

    dest.mkdir()
    for name in ("metadata.json", "observations.csv", "validate.csv"):
        shutil.copy(src / name, dest / name)
    return dest


def test_the_recorded_mutation_campaign_kills_every_mutant_again(tmp_path):
    from ksmbench.compare.validate import rejudge

    run = _copy_run(CAMPAIGN, tmp_path / "run")
    recorded = {r["variant"]: r for r in csv.DictReader(open(CAMPAIGN / "validate.csv"))}
    results = rejudge(run)
    assert len(results) == len(recorded) >= 8
    for r in results:
        assert r.verdict == "changed", r.label
        assert len(r.judgement.unexplained) == int(recorded[r.label]["unexplained"]) > 0
    # the profit mutants change their own profit and nothing else
    by = {r.label: r.judgement.changed_by_scenario() for r in results}
    assert {m for ms in by["m06-general-profit-no-zero"].values() for m in ms} == {
        "global.general_profit"}
    assert {m.rsplit(".", 1)[1] for ms in by["m07-process-profit-no-zero"].values()
            for m in ms} == {"ksm_process_profit"}


def test_the_recorded_comment_only_patch_is_all_equal(tmp_path):
    from ksmbench.compare.validate import rejudge

    [r] = rejudge(_copy_run(COMMENT_ONLY, tmp_path / "run"))
    assert r.verdict == "as-expected"
    assert r.judgement.compared > 5000 and r.judgement.changed == []
    # and a flag that the patch does not switch is an expected change that is missing
    [r] = rejudge(_copy_run(COMMENT_ONLY, tmp_path / "run2"), "-zero_page_tracking")
    assert r.verdict == "changed" and r.judgement.changed == [] and r.judgement.unexplained


def test_a_failed_build_is_reported_by_its_first_error_line(tmp_path):
    from ksmbench.compare.builds import first_error_line

    log = tmp_path / "build.log"
    log.write_text("  CC      mm/ksm.o\n"
                   "/src/mm/ksm.c:1400:17: error: 'x' undeclared (first use in this function)\n"
                   "/src/mm/ksm.c:1401:3: error: expected ';' before '}' token\n"
                   "make[3]: *** [scripts/Makefile.build:229: mm/ksm.o] Error 1\n")
    assert first_error_line(log) == "/src/mm/ksm.c:1400:17: error: 'x' undeclared (first use in this function)"
    log.write_text("  CC      mm/ksm.o\n  LD      vmlinux\n")
    assert first_error_line(log) is None
