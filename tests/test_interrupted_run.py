"""A real host run cut short by SIGINT or SIGTERM says so: metadata.json records that it
was interrupted, where (scenario, step, scan) and the tunables as restored,
and ``ksmbench report`` puts the run's incompleteness first."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import host_ksm_usable, merging_scenario
from ksmbench.kernel.lock import RunLock
from ksmbench.kernel.sysfs import KsmSysfs
from ksmbench.kernel.tunables import state_dir

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")]

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]
MANY_SCANS = merging_scenario("many-scans", 2048, "cycle:many:16", scans=2000)


def settled_tunables() -> dict[str, str]:
    """The tunables while no run changes them: other sessions on this machine
    step ksmd too, so read under the run lock."""
    with RunLock(timeout=3600, directory=state_dir()):
        return KsmSysfs().tunables()


def _sigint_default() -> None:
    # CI may start the tests with SIGINT ignored, which a child inherits:
    # Python then installs no KeyboardInterrupt handler, and SIGINT does nothing
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_is_marked_interrupted_and_the_report_says_so(tmp_path, signum):
    # read under the run lock: other sessions on this machine step ksmd too
    before = settled_tunables()
    scenario = tmp_path / "many.toml"
    scenario.write_text(MANY_SCANS)
    out = tmp_path / "out"
    # a second kernel, which the interrupt keeps from running
    proc = subprocess.Popen([*KSMBENCH, "run", "--kernel", "host", "--kernel", "emulator:linux-6.6",
                             "--wait", "900", "--out", str(out), str(scenario)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    deadline = time.monotonic() + 900
    rundir = None
    while time.monotonic() < deadline:  # until some scans of step 3 are in
        csvs = list(out.glob("*/observations.csv"))
        if csvs and ",3,scan,5," in csvs[0].read_text():
            rundir = csvs[0].parent
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before scan 5: {proc.communicate()}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the run never reached scan 5 within 900 s")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    assert str(rundir) in stdout.replace("\n", "") and "results so far are kept" in stderr

    meta = json.loads((rundir / "metadata.json").read_text())
    assert meta["interrupted"] is True
    where = meta["interrupted_at"]
    assert where["signal"] == signal.Signals(signum).name and where["kernel"] == "host"
    assert where["scenario"] == "many-scans" and where["after_step"] == 3
    assert where["scans_in_step"] == 2000 and 5 <= where["after_scan"] < 2000
    assert meta["kernels_not_run"] == ["emulator:linux-6.6"]
    (entry,) = meta["kernels"]
    assert entry["interrupted"] is True
    assert entry["verdicts"] == {"many-scans": "interrupted"}
    assert entry["ksm_tunables_after"] == entry["ksm_tunables_before"]
    assert entry["ksm_tunables_after"] == before == settled_tunables()
    # the last scan written is the one metadata.json names
    scans = [int(line.split(",")[4]) for line in
             (rundir / "observations.csv").read_text().splitlines()[1:] if ",3,scan," in line]
    assert max(scans) == where["after_scan"]
    if signum != signal.SIGINT:
        return  # the report reads metadata.json alike, whatever the signal

    report = subprocess.run([*KSMBENCH, "report", str(rundir), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "INCOMPLETE" in report.stdout
    summary = (tmp_path / "report" / "summary.md").read_text()
    warning = next(line for line in summary.splitlines() if "INCOMPLETE" in line)
    assert summary.index(warning) < summary.index("| kernel |")  # before any table
    assert f"step 3 scan {where['after_scan']} of 2000" in warning and "SIGINT" in warning
    assert "kernels not run: emulator:linux-6.6" in warning
    matrix = next(line for line in summary.splitlines() if line.startswith("| many-scans |"))
    assert "interrupted" in matrix and "match" not in matrix
    assert "interrupted" in (tmp_path / "report" / "report.html").read_text()
