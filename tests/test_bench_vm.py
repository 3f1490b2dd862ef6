"""``ksmbench bench --kernel debian:6.1``: the same benchmark code runs inside a
pre-series guest and its results come back into the host's run directory.

6.1 predates the zero-page series (6.6): KSM zero pages are neither counted
nor unshared by MADV_UNMERGEABLE or run=2 (79271476b336 added that), while
KSM pages of duplicates are.  The page tables show it on every kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import RUN_LOCK_WAIT, host_ksm_usable

#: a Debian kernel fetched (once), booted under TCG, the timings inside it
LIMIT = 900
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(LIMIT),
              pytest.mark.skipif(not host_ksm_usable(), reason="needs root (QEMU, KSM lock)")]

SIZE_MIB = 2
PAGES = SIZE_MIB * 256


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-vm")
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "bench", "--kernel", "debian:6.1",
                           "--wait", str(RUN_LOCK_WAIT), "--out", str(out), "--only", "timings",
                           "--sizes", str(SIZE_MIB), "--repeats", "1"],
                          capture_output=True, text=True, timeout=LIMIT - 60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rundir = next(out.iterdir())
    return rundir, pd.read_csv(rundir / "bench.csv"), json.loads((rundir / "metadata.json").read_text())


def value(bench, benchmark, case, metric, uzp):
    rows = bench[(bench.benchmark == benchmark) & (bench.case == case) & (bench.metric == metric)
                 & (bench.use_zero_pages == uzp)]
    assert len(rows) == 1, (benchmark, case, metric, uzp)
    return rows.value.iloc[0]


def test_results_come_back_labelled_with_the_guest_kernel(guest_run):
    rundir, bench, meta = guest_run
    assert set(bench.kernel) == {"debian:6.1"}
    entry = meta["kernels"][0]
    assert entry["kernel"] == "debian:6.1" and entry["backend"] == "vm"
    assert entry["kernel_release"].startswith("6.1.")
    assert entry["accelerator"] in ("kvm", "tcg")
    assert not entry["features"]["ksm_zero_pages"]  # no counter before 6.6
    assert (rundir / "guest-debian-6-1" / "console.log").exists()


def test_pre_series_kernel_keeps_ksm_zero_pages_after_unmerge(guest_run):
    _, bench, _ = guest_run
    # every page merges in all three cases (pagemap says so, whatever the counters)
    for case, uzp in (("dup", 0), ("zero", 0), ("zero", 1)):
        assert value(bench, "merge", case, "merged_pages", uzp) == PAGES
        assert value(bench, "unmerge", f"{case}/run2", "pages_unshared", uzp) == (0 if uzp else PAGES)
    # duplicates are unshared; KSM zero pages stay mapped (fixed in 6.6)
    assert value(bench, "unmerge", "dup/madvise", "pages_left_merged", 0) == 0
    assert value(bench, "unmerge", "zero/madvise", "pages_left_merged", 1) == PAGES
    assert value(bench, "unmerge", "zero/run2", "pages_left_merged", 1) == PAGES
    # and the counters cannot see them: merged pages by counters are 0 with use_zero_pages=1
    assert value(bench, "merge", "zero", "counter_merged_pages", 1) == 0
