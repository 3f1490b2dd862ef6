"""``ksmbench report`` on synthetic run directories: every figure, one
self-contained HTML file, a markdown summary, and verdicts that can fail."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser


from ksmbench.bench.savings import Snapshot, Workload, combine, reconcile, series_rows
from ksmbench.bench.config import FreeRunTunables
from ksmbench.bench.outcome import CrosscheckResult
from ksmbench.bench.stats import summarize
from ksmbench.bench.store import BenchStore
from ksmbench.report.cli import generate
from ksmbench.report.load import load_runs, verdicts
from ksmbench.results import RunDir

PAGE = 4096


def _scenario_run(tmp_path, *, mismatch: bool = False) -> str:
    """A run of two scenarios on two kernels, with predictions; optionally one wrong cell."""
    rd = RunDir(tmp_path / "runs", "scen")
    rows = []
    for kernel in ("host", "debian:6.1"):
        rd.kernel_entry(kernel).update(kernel_release="6.18.0" if kernel == "host" else "6.1.0",
                                       backend="host" if kernel == "host" else "vm",
                                       accelerator=None if kernel == "host" else "tcg")
        for scenario in ("zero-pages", "dup-below-max"):
            for step, op, scan, shared, sharing, zero in (
                    (0, "mmap", None, 0, 0, 0), (3, "scan", 1, 0, 0, 0),
                    (3, "scan", 2, 1, 9, 1000), (3, "scan", 3, 1, 9, 1000)):
                cells = {"global.pages_shared": shared, "global.pages_sharing": sharing,
                         "global.ksm_zero_pages": zero if kernel == "host" else None}
                for metric, value in cells.items():
                    predicted = value
                    if mismatch and kernel == "debian:6.1" and scenario == "zero-pages" \
                            and scan == 2 and metric == "global.pages_sharing":
                        predicted = value + 1
                    match = None if value is None or predicted is None else value == predicted
                    rows.append((scenario, kernel, step, op, scan, metric, value, predicted, match))
    rd.add_observations(rows)
    rd.add_expectations([("zero-pages", "host", 3, "global.ksm_zero_pages", 1000, 1000, True)])
    if mismatch:  # an expect that does not hold, on an otherwise matching scenario
        rd.add_expectations([("dup-below-max", "host", 3, "global.pages_sharing", 8, 9, False)])
    rd.close()
    return str(rd.path)


def _bench_run(tmp_path) -> str:
    store = BenchStore(tmp_path / "runs", "bench")
    store.rundir.kernel_entry("host").update(kernel_release="6.18.0", backend="host")
    for kernel in ("host", "debian:6.12"):
        for r in range(3):
            for size in (8, 32):
                for case, uzp in (("dup", 0), ("zero", 1)):
                    store.add_sample(kernel, "merge", case, size, uzp, r, {
                        "mib_per_s": (400.0 + 10 * r + size, "MiB/s"), "seconds": (size / 400, "s")})
                    store.add_sample(kernel, "cow", case, size, uzp, r, {"us_per_page": (3.0 + r, "us")})
                    store.add_sample(kernel, "unmerge", f"{case}/run2", size, uzp, r,
                                     {"mib_per_s": (2000.0 - r, "MiB/s")})
                    store.add_sample(kernel, "scan_cost", case, size, uzp, r,
                                     {"cpu_per_merged_page_us": (4.0 + r / 10, "us")})
            for who, speed in (("ksm_tests", 330.0), ("ksmbench", 333.0), ("ksmbench-idle-owner", 900.0)):
                store.add_sample(kernel, "crosscheck", who, 100, 0, r, {"mib_per_s": (speed + r, "MiB/s")})
        w = Workload(2, 4)
        results = {}
        for uzp in (0, 1):
            before = Snapshot(0.0, {}, 0, 100 * PAGE, 100 * PAGE, 100 * PAGE, 1000, 500, 10, 400, 50,
                              0, 0, 0)
            after = Snapshot(1.0, {"pages_sharing": 40, "ksm_zero_pages": 10 * uzp}, 30,
                             (100 - 10 * uzp) * PAGE, 50 * PAGE, 50 * PAGE, 800, 500, 12, 400, 250,
                             10 * uzp, 50, 10)
            series = [("before0", None, before), ("before", None, before), ("scan", 1, before),
                      ("scan", 2, after), ("after_run2", None, before)]
            store.add_savings_rows(series_rows(kernel, uzp, 0, series))
            results[uzp] = combine([reconcile(before, before, after, before, 0.05, {}, uzp)], w)
        store.set_savings(kernel, results)
        ours, theirs = summarize([333.0, 330.0, 336.0], "MiB/s"), summarize([330.0, 327.0, 333.0], "MiB/s")
        store.set_crosscheck(kernel, CrosscheckResult(
            size_mib=100, ksm_tests={"source_package": "linux-source-6.12", "source_version": "x"},
            tunables=FreeRunTunables(pages_to_scan=1000), ours_mib_per_s=ours,
            ksm_tests_mib_per_s=theirs, ratio=333 / 330, relative_difference=0.009, tolerance=0.05,
            agrees=True))
    store.close()
    return str(store.path)


class _Resources(HTMLParser):
    """Every URL the HTML would load (src/href), and the images."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.urls.append(value)
                if tag == "img":
                    self.images.append(value)


def test_report_from_synthetic_runs_is_self_contained(tmp_path):
    runs = [_scenario_run(tmp_path), _bench_run(tmp_path)]
    out = tmp_path / "report"
    paths = generate(runs, out)
    html = paths["html"].read_text()
    parser = _Resources()
    parser.feed(html)
    # opens offline: nothing to fetch, every image embedded
    external = [u for u in parser.urls if not (u.startswith("data:image/png;base64,") or u.startswith("#"))]
    assert external == []
    names = {p.stem for p in (out / "figures").glob("*.png")}
    expected = {"match-matrix", "merge-throughput", "costs", "savings-over-time", "zero-page-savings",
                "counters-zero-pages", "counters-dup-below-max"}
    assert expected <= names
    assert len(parser.images) == len(names)
    for f in (out / "figures").glob("*.png"):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    for name in expected:
        assert f"(figures/{name}.png)" in md
    # 4 points x 3 counters; debian:6.1 has no ksm_zero_pages, so 4 cells fewer to compare
    assert "| zero-pages | match (12/12) | match (8/8) |" in md
    assert "they agree within 5 %" in md
    assert "debian:6.1 ran under QEMU TCG" in md


def test_verdicts_detect_a_mismatch_and_an_unmet_expectation(tmp_path):
    data = load_runs([_scenario_run(tmp_path, mismatch=True)])
    v = verdicts(data).set_index(["scenario", "kernel"])
    assert v.loc[("zero-pages", "debian:6.1"), "verdict"] == "mismatch"
    assert v.loc[("zero-pages", "debian:6.1"), "mismatches"] == 1
    assert v.loc[("dup-below-max", "debian:6.1"), "verdict"] == "match"
    assert v.loc[("zero-pages", "host"), "expects"] == 1
    assert v.loc[("zero-pages", "host"), "verdict"] == "match"
    # every cell matches, but an expect failed
    assert v.loc[("dup-below-max", "host"), "mismatches"] == 0
    assert v.loc[("dup-below-max", "host"), "verdict"] == "mismatch"
    out = generate([_scenario_run(tmp_path / "again", mismatch=True)], tmp_path / "r")
    assert "| zero-pages | match (12/12) | mismatch (7/8) |" in out["markdown"].read_text()
    assert 'class="bad">mismatch' in out["html"].read_text()


def test_observed_only_runs_have_their_own_verdict(tmp_path):
    rd = RunDir(tmp_path, "obs")
    rd.add_observations([("zero-pages", "host", 0, "mmap", None, "global.pages_shared", 0, None, None)])
    rd.close()
    v = verdicts(load_runs([str(rd.path)]))
    assert v.iloc[0]["verdict"] == "observed"


def test_report_command_line(tmp_path):
    run = _bench_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "report", run, "--title", "t"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "bench" / "report" / "report.html").exists()
    summary = (tmp_path / "runs" / "bench" / "report" / "summary.md").read_text()
    assert summary.startswith("# t")
    assert re.search(r"\| host \| merge throughput \| dup \| 0 \| 8 \| 418\.0 MiB/s", summary)


def test_report_refuses_what_is_not_a_run_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not a run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_json_of_the_synthetic_run_has_raw_samples(tmp_path):
    doc = json.loads(open(f"{_bench_run(tmp_path)}/bench.json").read())
    merge = [s for s in doc["kernels"]["host"]["summaries"]
             if s["benchmark"] == "merge" and s["metric"] == "mib_per_s"]
    assert all(len(s["samples"]) == 3 for s in merge)
