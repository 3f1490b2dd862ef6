"""Real-kernel tests on this host: the per-scan table measured on the 6.18
host (docs/emulator.md), exactly, and the zero-page series' behaviours (6.6+)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import host_ksm_usable

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")]

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]
SCENARIOS = ["mixed-region", "zero-pages", "zero-unmerge-half", "cow-zero-pages", "zero-dontneed",
             "zero-munmap", "unmerge-all", "read-fault-zero", "zero-pages-as-duplicates",
             "dup-above-max", "two-procs-tag"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([*KSMBENCH, "run", "--kernel", "host", "--wait", "900", "--out", str(out),
                           *SCENARIOS], capture_output=True, text=True, timeout=1200)
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout
    rundir = next(out.iterdir())
    df = pd.read_csv(rundir / "observations.csv", dtype={"observed": "Int64", "scan": "Int64"})
    return rundir, df


def cell(df, scenario, metric, step, scan=None):
    rows = df[(df.scenario == scenario) & (df.metric == metric) & (df.step == step)]
    rows = rows[rows.scan.isna()] if scan is None else rows[rows.scan == scan]
    assert len(rows) == 1, (scenario, metric, step, scan, len(rows))
    value = rows.observed.iloc[0]
    return None if pd.isna(value) else int(value)


# after scan: shared, sharing, unshared, volatile, ksm_zero_pages, general_profit, chains, dups,
#             ksm_stat rmap_items, zero, merging, process_profit   (docs/emulator.md)
MEASURED = {
    1: (0, 0, 0, 3000, 0, -192000, 0, 0, 3000, 0, 0, -192000),
    2: (4, 996, 1000, 1000, 1000, 7983616, 1, 4, 3000, 1000, 1000, 8000000),
    3: (4, 996, 1000, 0, 1000, 8047616, 1, 4, 2000, 1000, 1000, 8064000),
    4: (4, 996, 1000, 0, 1000, 8047616, 1, 4, 2000, 1000, 1000, 8064000),
    5: (4, 996, 0, 1000, 1000, 8047616, 1, 4, 2000, 1000, 1000, 8064000),
}
COLUMNS = ("global.pages_shared", "global.pages_sharing", "global.pages_unshared",
           "global.pages_volatile", "global.ksm_zero_pages", "global.general_profit",
           "global.stable_node_chains", "global.stable_node_dups", "proc.main.ksm_rmap_items",
           "proc.main.ksm_zero_pages", "proc.main.ksm_merging_pages", "proc.main.ksm_process_profit")


@pytest.mark.parametrize("scan", sorted(MEASURED))
def test_measured_table_every_counter(observed, scan):
    _, df = observed
    scan_step = 5  # mixed-region: mmap, 3 fills, madvise, scan
    got = tuple(cell(df, "mixed-region", metric, scan_step, scan) for metric in COLUMNS)
    assert dict(zip(COLUMNS, got)) == dict(zip(COLUMNS, MEASURED[scan]))
    skipped = cell(df, "mixed-region", "global.pages_skipped", scan_step, scan)
    assert skipped == (1000 if scan == 5 else 0)  # smart_scan skips the unique pages on scan 5
    assert cell(df, "mixed-region", "global.full_scans", scan_step, scan) == scan


def test_zero_pages_are_counted_and_leave_rss(observed):
    _, df = observed
    s, step = "zero-pages", 3
    assert cell(df, s, "global.ksm_zero_pages", step, 1) == 0
    assert cell(df, s, "global.ksm_zero_pages", step, 2) == 512
    assert cell(df, s, "proc.main.ksm_zero_pages", step, 2) == 512
    assert cell(df, s, "region.main.a.zero_pfn", step, 2) == 512
    assert cell(df, s, "proc.main.rss_anon_scenario_pages", step, 1) == 512
    assert cell(df, s, "proc.main.rss_anon_scenario_pages", step, 2) == 0  # replace_page(): MM_ANONPAGES--
    assert cell(df, s, "global.pages_shared", step, 2) == 0
    # profit counts zero pages (1a8e84305783); rmap items go one scan later
    assert cell(df, s, "global.general_profit", step, 2) == 512 * 4096 - 512 * 64
    assert cell(df, s, "proc.main.ksm_rmap_items", step, 3) == 0
    assert cell(df, s, "global.general_profit", step, 3) == 512 * 4096


def test_unmergeable_unshares_ksm_zero_pages_and_writes_decrement(observed):
    _, df = observed
    s = "zero-unmerge-half"
    assert cell(df, s, "global.ksm_zero_pages", 3, 2) == 512
    # MADV_UNMERGEABLE of the first half: unshared at once (79271476b336)
    assert cell(df, s, "global.ksm_zero_pages", 4) == 256
    assert cell(df, s, "proc.main.ksm_zero_pages", 4) == 256
    assert cell(df, s, "region.main.a.zero_pfn", 4) == 256
    assert cell(df, s, "proc.main.rss_anon_scenario_pages", 4) == 256
    # write faults on the second half: wp_page_copy() decrements at once
    assert cell(df, s, "global.ksm_zero_pages", 5) == 0
    assert cell(df, s, "region.main.a.zero_pfn", 5) == 0
    assert cell(df, s, "region.main.a.present", 5) == 512


def test_write_faults_on_ksm_zero_pages(observed):
    _, df = observed
    s = "cow-zero-pages"
    assert cell(df, s, "global.ksm_zero_pages", 3, 2) == 256
    assert cell(df, s, "global.ksm_zero_pages", 4) == 192  # 64 pages written with a tag
    assert cell(df, s, "global.ksm_zero_pages", 5) == 128  # 64 more written with zeros
    assert cell(df, s, "region.main.a.zero_pfn", 5) == 128


def test_dontneed_and_munmap_of_ksm_zero_pages(observed):
    _, df = observed
    assert cell(df, "zero-dontneed", "global.ksm_zero_pages", 3, 2) == 256
    assert cell(df, "zero-dontneed", "global.ksm_zero_pages", 4) == 156
    assert cell(df, "zero-dontneed", "region.main.a.present", 4) == 156
    # read faults map the zero page again, but clean: not KSM-placed, not counted
    assert cell(df, "zero-dontneed", "region.main.a.zero_pfn", 6) == 256
    assert cell(df, "zero-dontneed", "global.ksm_zero_pages", 6) == 156
    assert cell(df, "zero-munmap", "global.ksm_zero_pages", 6, 2) == 320
    assert cell(df, "zero-munmap", "global.ksm_zero_pages", 7) == 64
    gone = df[(df.scenario == "zero-munmap") & (df.step == 7) & (df.metric == "region.main.a.present")]
    assert gone.empty  # the region is gone: no row at all


def test_unmerge_all_unshares_zero_pages_too(observed):
    _, df = observed
    s = "unmerge-all"
    assert cell(df, s, "global.ksm_zero_pages", 4, 2) == 200
    assert cell(df, s, "global.pages_sharing", 4, 2) == 199
    for metric, value in (("global.ksm_zero_pages", 0), ("global.pages_shared", 0),
                          ("global.pages_sharing", 0), ("proc.main.ksm_rmap_items", 0),
                          ("region.main.a.zero_pfn", 0), ("region.main.a.ksm", 0),
                          ("region.main.a.distinct_frames", 400)):
        assert cell(df, s, metric, 5) == value, metric
    assert cell(df, s, "global.ksm_zero_pages", 6, 2) == 200  # merges again


def test_read_fault_zero_pages_are_not_counted(observed):
    _, df = observed
    s = "read-fault-zero"
    assert cell(df, s, "region.main.a.zero_pfn", 1) == 256
    assert cell(df, s, "global.ksm_zero_pages", 4, 2) == 0
    assert cell(df, s, "proc.main.ksm_rmap_items", 4, 2) == 0  # the zero page is never scanned
    assert cell(df, s, "region.main.a.zero_pfn", 5) == 256  # not unshared by MADV_UNMERGEABLE


def test_chains_and_dups_above_max_page_sharing(observed):
    _, df = observed
    s = "dup-above-max"
    # 50 pages, M=16: 4 KSM pages; 33 pages: 2 KSM pages + 1 unshared (ksm_tests formula)
    assert cell(df, s, "global.pages_shared", 6, 2) == 4 + 2
    assert cell(df, s, "global.pages_sharing", 6, 2) == (50 - 4) + (33 - 1 - 2)
    assert cell(df, s, "global.pages_unshared", 6, 2) == 1
    assert cell(df, s, "global.stable_node_chains", 6, 2) == 2
    assert cell(df, s, "global.stable_node_dups", 6, 2) == 6


def test_expectations_were_checked(observed):
    rundir, _ = observed
    exp = pd.read_csv(rundir / "expectations.csv")
    assert len(exp) >= 8
    assert exp.holds.all(), exp[~exp.holds]


def test_metadata(observed):
    import json

    rundir, df = observed
    meta = json.loads((rundir / "metadata.json").read_text())
    assert meta["backend"] == "host"
    assert meta["kernel_release"] == os.uname().release
    assert meta["ksm_tunables_before"] == meta["ksm_tunables_after"]
    assert meta["started_at"] and meta["ended_at"]
    assert set(df.kernel) == {"host"}


def test_every_scenario_has_a_baseline_and_a_teardown(observed):
    _, df = observed
    for scenario in SCENARIOS:
        rows = df[df.scenario == scenario]
        base = rows[rows.op == "baseline"]
        # the absolute counters only, at step -1, measured and not predicted
        assert set(base.step) == {-1} and len(base) == 8, scenario
        assert base.predicted.isna().all() and base.match.isna().all()
        down = rows[rows.op == "teardown"]
        assert len(down) == 11 and down.step.nunique() == 1, scenario  # every global counter
        assert int(down.step.iloc[0]) == rows[~rows.op.isin(["baseline", "teardown"])].step.max() + 1
        assert (down.match.astype(str).str.lower() == "true").all(), down
        # every process has exited and ksmd has scanned: no rmap item, no KSM page,
        # no KSM zero page is left (this kernel counts fork-inherited zero pages)
        for metric in ("global.pages_shared", "global.pages_sharing", "global.pages_unshared",
                       "global.pages_volatile", "global.ksm_zero_pages", "global.general_profit",
                       "global.stable_node_dups"):
            after = cell(df, scenario, metric, int(down.step.iloc[0]))
            assert after == cell(df, scenario, metric, -1), (scenario, metric)
