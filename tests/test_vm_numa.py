"""Two NUMA nodes for real (marker ``vm``): one debian:6.12 guest booted with
two nodes (QEMU -numa) runs the ``numa`` set and LTP ksm06 restated; every
cell is judged against the emulator and every expectation must hold.  Under
TCG on a 2-core machine the boot and the five scenarios took 61 s.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

KERNEL = "debian:6.12"


def test_a_two_node_guest_merges_per_node_as_the_emulator_predicts(tmp_path):
    from test_numa import numa_scenarios

    from ksmbench.backends.vm import VMBackend
    from ksmbench.emulator import Predictor
    from ksmbench.results import RunDir
    from ksmbench.runner import RunRecorder, Runner, exit_status

    missing = [t for t in ("qemu-system-x86_64", "busybox") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing}: run vm/install-host-deps")
    scenarios = numa_scenarios()
    rundir = RunDir(tmp_path)
    runner = Runner([RunRecorder(rundir, predictor=Predictor())], artifacts_root=rundir.path)
    # no --numa-nodes: the backend boots with the 2 nodes the scenarios bind to
    outcome = runner.run_kernel(VMBackend(KERNEL, memory="2G", cpus=2, accel="auto"), scenarios)
    rundir.close()
    assert outcome.error is None, outcome.error

    meta = json.loads((rundir.path / "metadata.json").read_text())
    assert meta["numa_nodes"] == 2
    assert meta["numa_memory_nodes"] == [0, 1]  # what the guest kernel reported
    console = (rundir.path / KERNEL.replace(":", "_") / "console.log").read_text(errors="replace")
    assert "SRAT: Node 1 PXM 1" in console and "numa_balancing=disable" in console
    problems = [mm.describe() for o in outcome.scenarios.values() for mm in o.mismatches]
    assert problems == [], problems[:10]
    assert {n: o.verdict for n, o in outcome.scenarios.items()} == \
        {s.name: "match" for s in scenarios}
    assert all(o.finished and o.expect_checked and not o.expect_failures
               for o in outcome.scenarios.values())
    assert sum(o.compared for o in outcome.scenarios.values()) > 2000
    assert exit_status([outcome]) == 0
    assert meta["ksm_tunables_after"]["merge_across_nodes"] == "1"
