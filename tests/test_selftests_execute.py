"""Running selftest programs safely, against a fake KSM sysfs (no root needed).

The stand-in "selftest" does what the real ones do wrong: it changes tunables
and does not put them back, forks, and (in the hanging variant) waits forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from ksmbench.kernel.sysfs import KsmSysfs
from ksmbench.kernel.tunables import journals, repair
from ksmbench.selftests.execute import Command, kill_group, run_commands, run_one

FAKE_SELFTEST = r"""
import os, sys, time
root, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3]
for name, value in (("run", "1"), ("use_zero_pages", "1"), ("pages_to_scan", "7")):
    with open(os.path.join(root, name), "w") as f:
        f.write(value)
print("TAP version 13", flush=True)
print("1..1", flush=True)
if mode == "hang":
    if os.fork() == 0:          # a child, as test_prctl_fork has one
        time.sleep(600)
        os._exit(0)
    print("# [RUN] test_forever", flush=True)
    while True:                 # ksm_merge(): full_scans never grows
        time.sleep(0.01)
print("# [RUN] test_quick", flush=True)
print("ok 1 done", flush=True)
"""


def _command(tmp_path: Path, fake_ksm: Path, mode: str, marker: str) -> Command:
    script = tmp_path / "fake_selftest.py"
    script.write_text(FAKE_SELFTEST)
    return Command(f"fake {mode}", (sys.executable, str(script), str(fake_ksm), mode, marker),
                   str(tmp_path), str(tmp_path / "logs" / f"{mode}.log"))


def _with_marker(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def _wait_gone(marker: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _with_marker(marker), "a selftest process outlived its run"


def test_tunables_left_changed_are_restored(tmp_path, fake_ksm, state_dir):
    marker = uuid.uuid4().hex
    sysfs = KsmSysfs(fake_ksm)
    before = sysfs.tunables()
    (run,) = run_commands([_command(tmp_path, fake_ksm, "quick", marker)], timeout=60, sysfs=sysfs)
    assert run.returncode == 0 and not run.timed_out
    assert run.left_changed == {"run": ("0", "1"), "use_zero_pages": ("0", "1"),
                                "pages_to_scan": ("100", "7")}
    assert sysfs.tunables() == before == run.tunables_after
    assert "ok 1 done" in run.output and Path(run.log).read_text() == run.output
    assert not journals(state_dir)


def test_a_hanging_selftest_is_killed_with_its_children(tmp_path, fake_ksm, state_dir):
    marker = uuid.uuid4().hex
    sysfs = KsmSysfs(fake_ksm)
    before = sysfs.tunables()
    started = time.monotonic()
    run = run_one(_command(tmp_path, fake_ksm, "hang", marker), 2.0, sysfs)
    assert time.monotonic() - started < 30
    assert run.timed_out and "did not finish within 2 s" in run.error
    assert run.returncode is None
    assert "# [RUN] test_forever" in run.output  # kept: line-buffered into the log
    assert run.left_changed["run"] == ("0", "1")
    assert sysfs.tunables() == before
    _wait_gone(marker)


EXECUTOR = r"""
import sys
from ksmbench.kernel.sysfs import KsmSysfs
from ksmbench.kernel.tunables import signals_as_exceptions
from ksmbench.selftests.execute import Command, run_one
root, script, mode, marker, log = sys.argv[1:6]
cmd = Command("fake", (sys.executable, script, root, mode, marker), "/", log)
try:
    with signals_as_exceptions():
        print("running", flush=True)
        run_one(cmd, 600.0, KsmSysfs(root))
except KeyboardInterrupt as exc:
    print(f"stopped: {exc}", flush=True)
    sys.exit(2)
"""


def _start_executor(tmp_path, fake_ksm, marker):
    script = tmp_path / "fake_selftest.py"
    script.write_text(FAKE_SELFTEST)
    log = tmp_path / "hang.log"
    proc = subprocess.Popen([sys.executable, "-c", EXECUTOR, str(fake_ksm), str(script), "hang",
                             marker, str(log)], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    assert proc.stdout.readline().strip() == "running"
    deadline = time.monotonic() + 30
    while "test_forever" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the fake selftest never started"
        time.sleep(0.05)
    return proc


def test_sigterm_during_a_selftest_restores_and_kills_it(tmp_path, fake_ksm, state_dir):
    marker = uuid.uuid4().hex
    before = KsmSysfs(fake_ksm).tunables()
    proc = _start_executor(tmp_path, fake_ksm, marker)
    assert KsmSysfs(fake_ksm).tunable("run") == "1"  # the selftest changed it
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "terminated by SIGTERM" in out
    assert KsmSysfs(fake_ksm).tunables() == before
    assert not journals(state_dir)
    _wait_gone(marker)


def test_sigkill_leaves_a_journal_and_nothing_running(tmp_path, fake_ksm, state_dir):
    marker = uuid.uuid4().hex
    before = KsmSysfs(fake_ksm).tunables()
    proc = _start_executor(tmp_path, fake_ksm, marker)
    program = [p for p in _with_marker(marker) if p.ppid() == proc.pid]
    assert program, "the selftest should be the executor's child"
    proc.kill()
    proc.wait(timeout=30)
    # PR_SET_PDEATHSIG takes the program down with its parent, the guard its forked child
    _wait_gone(marker)
    journal = json.loads(journals(state_dir)[0].read_text())
    assert journal["pid"] == proc.pid
    assert KsmSysfs(fake_ksm).tunable("run") == "1"
    message = repair(KsmSysfs(fake_ksm))
    assert message and f"pid {proc.pid}" in message
    assert KsmSysfs(fake_ksm).tunables() == before


def test_kill_group_reaps_every_member():
    marker = uuid.uuid4().hex
    code = (f"import os, time\n# {marker}\nos.fork(); os.fork()\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 20
    while len(_with_marker(marker)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_with_marker(marker)) == 4
    kill_group(proc.pid, [proc])
    _wait_gone(marker, timeout=5)


def test_kill_group_does_not_wait_for_zombies_nobody_reaps():
    # In a container whose init never reaps, killed orphans stay zombies in
    # their group forever (CI failed this way).  Here the non-reaping parent
    # is a sleeping intermediate process.
    code = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '600'], process_group=0)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(parent.stdout.readline())
        started = time.monotonic()
        kill_group(pgid, timeout=10)
        assert time.monotonic() - started < 5
        with open(f"/proc/{pgid}/stat") as f:  # still there, as a zombie
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_a_missing_program_is_an_error_not_a_crash(tmp_path, fake_ksm, state_dir):
    sysfs = KsmSysfs(fake_ksm)
    before = sysfs.tunables()
    cmd = Command("nothing", (str(tmp_path / "no-such-binary"),), str(tmp_path),
                  str(tmp_path / "nothing.log"))
    import shutil
    if shutil.which("stdbuf"):
        # stdbuf starts, then fails to exec the program: exit 127, no verdict
        (run,) = run_commands([cmd], timeout=30, sysfs=sysfs)
        assert run.returncode == 127
    else:
        (run,) = run_commands([cmd], timeout=30, sysfs=sysfs)
        assert run.error and "could not start" in run.error
    assert sysfs.tunables() == before
