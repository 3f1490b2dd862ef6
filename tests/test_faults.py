"""Faults during a real run on the host: SIGINT/SIGTERM mid-scan restore the
tunables and keep results (exit 2); SIGKILL leaves a journal that the next run
repairs and reports; no agent process outlives its run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (RUN_LOCK_WAIT, host_ksm_usable, merging_scenario, settled_tunables,
                      sigint_disposition)
from ksmbench.kernel.sysfs import KsmSysfs

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")]

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]
LONG = merging_scenario("long-scans", 65536, ("cycle:long:64", 0, 32768), ("unique", 32768, 65536),
                        scans=400, use_zero_pages=True)


def agents_of(pid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "ksmbench.backends.agent" in cmd:
            found.append(p)
    return found


def start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    scenario = tmp_path / "long.toml"
    scenario.write_text(LONG)
    out = tmp_path / "out"
    # SIGINT explicitly at its default: under `make test &` it is inherited ignored
    proc = subprocess.Popen([*KSMBENCH, "run", "--wait", str(RUN_LOCK_WAIT), "--out", str(out),
                             str(scenario)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_disposition())
    limit = RUN_LOCK_WAIT + 120  # another run may hold the lock first
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:  # until some scans have been observed
        csvs = list(out.glob("*/observations.csv"))
        if csvs and ",scan,3," in csvs[0].read_text():
            return proc, csvs[0].parent
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run never reached scan 3 within {limit} s")


def wait_agents_gone(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while agents_of(0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not agents_of(0), "agent processes outlived their run"


def tunables_of_no_run() -> dict[str, str]:
    """The host's tunables read while no other ksmbench run holds the lock."""
    return settled_tunables(lambda: KsmSysfs().tunables())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_scans_restores_and_keeps_results(tmp_path, signum):
    before = tunables_of_no_run()
    proc, rundir = start_long_run(tmp_path)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err
    assert "restored" in err and "results so far are kept" in err
    assert tunables_of_no_run() == before
    rows = (rundir / "observations.csv").read_text().splitlines()
    assert any(",scan,3," in line for line in rows)
    # what was kept was judged, and it matches the emulator
    assert rows[1:] and not any(line.endswith(",false") for line in rows)
    assert any(line.endswith(",true") for line in rows)
    wait_agents_gone()


def test_sigkill_is_repaired_by_the_next_run(tmp_path):
    before = tunables_of_no_run()
    proc, _ = start_long_run(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    wait_agents_gone()  # PR_SET_PDEATHSIG and socket EOF take the agents down
    left = KsmSysfs().tunables()
    assert left != before  # stepping tunables are still in place
    again = subprocess.run([*KSMBENCH, "run", "--wait", str(RUN_LOCK_WAIT), "--out",
                            str(tmp_path / "again"), "dup-below-max"], capture_output=True,
                           text=True, timeout=RUN_LOCK_WAIT + 120)
    assert again.returncode == 0, again.stdout + again.stderr  # and it matches the emulator
    assert "restored KSM tunables" in again.stdout and f"pid {proc.pid}" in again.stdout
    assert tunables_of_no_run() == before
