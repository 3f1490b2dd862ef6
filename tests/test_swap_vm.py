"""Swap on a real kernel: the built-in swap scenarios in one debian:6.12 boot
whose guest gets a zram swap device, every cell judged against the emulator;
and on this host, which has no swap, the same scenarios read n/a and the
machine keeps no swap.

Under TCG the boot and the five scenarios take about 70-100 s here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import host_ksm_usable
from ksmbench.kernel.swap import active_swaps

KERNEL = "debian:6.12"


def swap_scenarios():
    from ksmbench.scenario import builtin_suite

    return [s for s in builtin_suite() if s.swap]


@pytest.mark.vm
@pytest.mark.slow
def test_swap_scenarios_in_a_zram_guest_match_the_emulator(tmp_path):
    from kernel_expectations import assert_every_cell_matches, load
    from ksmbench.backends.vm import VMBackend
    from ksmbench.emulator import Predictor
    from ksmbench.results import RunDir
    from ksmbench.runner import RunRecorder, Runner, exit_status

    missing = [t for t in ("qemu-system-x86_64", "busybox") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing}: run vm/install-host-deps")
    scenarios = swap_scenarios()
    assert len(scenarios) == 5
    rundir = RunDir(tmp_path)
    runner = Runner([RunRecorder(rundir, predictor=Predictor())], artifacts_root=rundir.path)
    outcome = runner.run_kernel(VMBackend(KERNEL, memory="2G", cpus=2, accel="auto"), scenarios)
    rundir.close()
    assert outcome.error is None, outcome.error
    verdicts = {name: o.verdict for name, o in outcome.scenarios.items()}
    assert verdicts == {s.name: "match" for s in scenarios}, \
        [mm.describe() for o in outcome.scenarios.values() for mm in o.mismatches][:12]
    assert exit_status([outcome]) == 0
    assert all(o.finished and not o.expect_failures for o in outcome.scenarios.values())
    df = load(rundir.path / "observations.csv")
    compared = assert_every_cell_matches(df, outcome.profile)
    assert compared > 1000, compared
    # the guest really swapped: MADV_PAGEOUT took the 16 unique pages of
    # swap-pageout-ksm out of the region (without swap they stay present)
    present = df[(df.scenario == "swap-pageout-ksm") & (df.metric == "region.main.a.present")]
    by_step = {int(r.step): int(r.observed) for r in present.itertuples() if r.op != "scan"}
    assert by_step[6] == 56 and by_step[8] == 40, by_step
    meta = json.loads((rundir.path / "metadata.json").read_text())
    assert meta["ksm_tunables_after"]["run"] == "0"
    assert "zram0" in (rundir.path / "debian_6.12" / "console.log").read_text(errors="replace")
    # op reclaim took the KSM page mapped 16 times, which MADV_PAGEOUT never does
    reclaimed = df[(df.scenario == "swap-reclaim-ksm") & (df.step == 6)]
    observed = dict(zip(reclaimed.metric, reclaimed.observed))
    assert observed["region.main.a.present"] == 8 and observed["region.main.a.zero_pfn"] == 8


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_on_a_host_without_swap_they_are_not_applicable(tmp_path):
    if active_swaps():
        pytest.skip("this machine has swap in use")
    names = [s.name for s in swap_scenarios()]
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "run", "--kernel", "host",
                           "--wait", "900", "--out", str(tmp_path), *names],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    meta = json.loads((next(Path(tmp_path).iterdir()) / "metadata.json").read_text())
    assert meta["verdicts"] == {name: "n/a" for name in names}
    assert proc.stdout.count("needs a swap device") == len(names)
    assert active_swaps() == []  # ksmbench added none
