"""Guards: one run at a time, no other KSM users, a clear message without root,
and one error line (no traceback) for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import RUN_LOCK_WAIT, host_ksm_usable
from ksmbench import cli
from ksmbench.errors import Busy
from ksmbench.kernel.lock import RunLock

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]


def test_second_lock_refuses_with_the_holder(state_dir):
    with RunLock(timeout=0, directory=state_dir):
        with pytest.raises(Busy) as info:
            RunLock(timeout=0, directory=state_dir).acquire()
        assert f"pid {os.getpid()}" in str(info.value)
        started = time.monotonic()
        with pytest.raises(Busy, match="after waiting"):
            RunLock(timeout=0.5, directory=state_dir).acquire()
        assert 0.4 < time.monotonic() - started < 5
    with RunLock(timeout=0, directory=state_dir):  # free again once released
        pass


def test_a_waiting_run_gets_the_lock_when_the_first_ends(state_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ksmbench.kernel.lock import RunLock\n"
         "with RunLock():\n    print('held', flush=True)\n    time.sleep(1.0)\n"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with RunLock(timeout=20, directory=state_dir):
        waited = time.monotonic() - started
    holder.wait(timeout=20)
    assert 0.3 < waited < 15


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_malformed_scenario_gives_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[step]]\nop = "mmap"\nregion = "a"\npages = -3\n')
    line = one_line_error(subprocess.run([*KSMBENCH, "run", str(bad)], capture_output=True,
                                         text=True, timeout=60))
    assert str(bad) in line and "step 0" in line and "'pages'" in line


def test_unknown_scenario_gives_one_line():
    line = one_line_error(subprocess.run([*KSMBENCH, "run", "scenarios/nope.toml"],
                                         capture_output=True, text=True, timeout=60))
    assert "nope.toml" in line and "built-in" in line


def test_without_root_the_message_points_to_vm_mode(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status = cli.main(["run", "--kernel", "host", "zero-pages"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "root" in err[0] and "--kernel debian:" in err[0]


def test_read_only_ksm_sysfs_is_reported(monkeypatch, fake_ksm):
    from ksmbench.errors import PermissionNeeded
    from ksmbench.kernel.policy import HostPolicy

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionNeeded, match="not writable"):
        HostPolicy(sysfs_root=fake_ksm).check_access()


@pytest.mark.root
def test_second_cli_run_refuses_while_the_first_holds_the_lock(state_dir):
    if not host_ksm_usable():
        pytest.skip("needs root and KSM (the host preflight runs first)")
    with RunLock(timeout=0, directory=state_dir):
        line = one_line_error(subprocess.run([*KSMBENCH, "run", "zero-pages", "--wait", "0"],
                                             capture_output=True, text=True, timeout=60,
                                             env=os.environ.copy()))
    assert "another ksmbench run" in line and "--wait" in line


