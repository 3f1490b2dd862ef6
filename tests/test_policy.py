"""The host policy (ksmbench/kernel/policy.py): host access and foreign KSM users.

Fake /proc trees for every kernel shape and race; then, on this host (root),
a real foreign process with MADV_MERGEABLE memory, a real host session that
refuses while it lives and enters once it is gone, and a real pagemap read
without CAP_SYS_ADMIN.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from conftest import RUN_LOCK_WAIT, host_ksm_usable
from ksmbench.errors import Busy, KsmUnavailable, PermissionNeeded
from ksmbench.kernel.lock import RunLock
from ksmbench.kernel.policy import FOREIGN_USERS, HostPolicy, KsmUser

ME = os.getpid()
NOT_MERGEABLE_6_18 = ("ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\n"
                      "ksm_process_profit 0\nksm_merge_any: no\nksm_mergeable: no\n")
SMAPS_MG = "7f00-7f10 rw-p 0 00:00 0\nVmFlags: rd wr mr mw me ac mg\n"
SMAPS_PLAIN = "7f00-7f10 rw-p 0 00:00 0\nVmFlags: rd wr mr mw me ac\n"


def proc_entry(root, pid, comm, *, ppid=1, **files):
    """/proc/<pid> with comm, stat (its parent) and the files given."""
    d = root / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_each_kernel_shape_of_ksm_use_is_seen(fake_proc):
    # ~6.14+: the kernel says so directly (no smaps walk)
    proc_entry(fake_proc, 10, "qemu-system-x86", ksm_stat=NOT_MERGEABLE_6_18.replace(
        "ksm_mergeable: no", "ksm_mergeable: yes"))
    proc_entry(fake_proc, 11, "merge-any", ksm_stat=NOT_MERGEABLE_6_18.replace(
        "ksm_merge_any: no", "ksm_merge_any: yes"))
    # ~6.14+ answering "no": smaps is not believed over it (a stale smaps here)
    proc_entry(fake_proc, 12, "idle", ksm_stat=NOT_MERGEABLE_6_18, smaps=SMAPS_MG)
    # 6.1: rmap items left after MADV_UNMERGEABLE, no mg mapping any more
    proc_entry(fake_proc, 13, "leftover", ksm_stat="ksm_rmap_items 12\n", smaps=SMAPS_PLAIN)
    # 6.1: nothing scanned yet, but an mg mapping
    proc_entry(fake_proc, 14, "old", ksm_stat="ksm_rmap_items 0\n", smaps=SMAPS_MG)
    # 5.19-6.0: no ksm_stat, merged pages in their own file
    proc_entry(fake_proc, 15, "merged-519", ksm_merging_pages="7\n", smaps=SMAPS_PLAIN)
    # before 5.19: smaps only
    proc_entry(fake_proc, 16, "ancient", smaps=SMAPS_MG)
    proc_entry(fake_proc, 17, "plain", smaps=SMAPS_PLAIN)
    proc_entry(fake_proc, 18, "kthread", ksm_stat="", smaps="")
    # 6.6-6.9: ksm_zero_pages printed with %lu went "negative": not use
    proc_entry(fake_proc, 19, "negative", ksm_stat=f"ksm_rmap_items 0\nksm_zero_pages {2**64 - 1}\n"
               "ksm_merging_pages 0\nksm_process_profit 0\n", smaps=SMAPS_PLAIN)
    proc_entry(fake_proc, 20, "zero-pages", ksm_stat="ksm_rmap_items 0\nksm_zero_pages 3\n"
               "ksm_merging_pages 0\nksm_process_profit 0\n", smaps=SMAPS_PLAIN)
    users = HostPolicy(proc_root=fake_proc).foreign_ksm_users()
    assert users == [KsmUser(10, "qemu-system-x86"), KsmUser(11, "merge-any"), KsmUser(13, "leftover"),
                     KsmUser(14, "old"), KsmUser(15, "merged-519"), KsmUser(16, "ancient"),
                     KsmUser(20, "zero-pages")]


def test_a_foreign_user_is_refused_in_one_line_naming_pid_and_command(fake_proc):
    proc_entry(fake_proc, 4242, "qemu-system-x86", ksm_stat="ksm_rmap_items 0\n", smaps=SMAPS_MG)
    with pytest.raises(Busy) as info:
        HostPolicy(proc_root=fake_proc).require_ksm_to_ourselves()
    line = info.value.one_line()
    assert "\n" not in line and line.startswith(FOREIGN_USERS)
    assert "pid 4242 (qemu-system-x86)" in line and "--kernel debian:" in line


def test_many_users_are_counted_not_all_listed(fake_proc):
    for pid in range(100, 108):
        proc_entry(fake_proc, pid, f"guest{pid}", smaps=SMAPS_MG)
    with pytest.raises(Busy) as info:
        HostPolicy(proc_root=fake_proc).require_ksm_to_ourselves()
    assert "pid 104 (guest104)" in info.value.message and "guest105" not in info.value.message
    assert "and 3 more" in info.value.message


def test_this_process_and_its_descendants_are_ours(fake_proc):
    parent = os.getppid()
    proc_entry(fake_proc, ME, "ksmbench", ppid=parent, smaps=SMAPS_MG)
    proc_entry(fake_proc, 900001, "agent", ppid=ME, smaps=SMAPS_MG)           # zygote/sentinel
    proc_entry(fake_proc, 900002, "agent", ppid=900001, smaps=SMAPS_MG)       # a scenario's fork
    proc_entry(fake_proc, 900003, "agent", ppid=900002, smaps=SMAPS_MG)
    proc_entry(fake_proc, 900004, "sibling", ppid=parent, smaps=SMAPS_MG)     # our parent's: not ours
    proc_entry(fake_proc, 900005, "other-agent", ppid=900004, smaps=SMAPS_MG)  # another run's agent
    if parent not in (0, 1):
        proc_entry(fake_proc, parent, "shell", smaps=SMAPS_MG)                # our parent: not ours
    users = HostPolicy(proc_root=fake_proc).foreign_ksm_users()
    assert {u.pid for u in users} == {900004, 900005} | ({parent} - {0, 1})


def test_a_parent_loop_in_a_torn_tree_ends(fake_proc):
    # a pid reused while the chain is walked can make a loop; it must end
    proc_entry(fake_proc, 900010, "a", ppid=900011, smaps=SMAPS_MG)
    proc_entry(fake_proc, 900011, "b", ppid=900010, smaps=SMAPS_MG)
    assert {u.pid for u in HostPolicy(proc_root=fake_proc).foreign_ksm_users()} == {900010, 900011}


def test_a_process_that_vanishes_while_being_read_is_skipped(fake_proc):
    # listed, ksm_stat read, then gone before comm and stat: as the kernel
    # shows it after exit (the directory's files no longer exist)
    proc_entry(fake_proc, 30, "gone", ksm_stat="ksm_rmap_items 5\n")
    (fake_proc / "30" / "comm").unlink()
    (fake_proc / "30" / "stat").unlink()
    # listed, then gone entirely
    (fake_proc / "31").mkdir()
    # an entry that cannot be read as a file at all (EISDIR stands for ESRCH)
    proc_entry(fake_proc, 32, "odd")
    (fake_proc / "32" / "ksm_stat").mkdir()
    proc_entry(fake_proc, 33, "stays", smaps=SMAPS_MG)
    assert HostPolicy(proc_root=fake_proc).foreign_ksm_users() == [KsmUser(33, "stays")]


def test_wait_succeeds_when_the_foreign_user_exits(fake_proc):
    entry = proc_entry(fake_proc, 40, "qemu-system-x86", smaps=SMAPS_MG)
    exit_after = 0.4
    timer = threading.Timer(exit_after, shutil.rmtree, args=(entry,))
    timer.start()
    try:
        started = time.monotonic()
        HostPolicy(proc_root=fake_proc).require_ksm_to_ourselves(wait=30)
        waited = time.monotonic() - started
    finally:
        timer.cancel()
    assert exit_after <= waited < 5


def test_wait_times_out_naming_who_stayed(fake_proc):
    proc_entry(fake_proc, 41, "qemu-system-x86", smaps=SMAPS_MG)
    started = time.monotonic()
    with pytest.raises(Busy) as info:
        HostPolicy(proc_root=fake_proc).require_ksm_to_ourselves(wait=1.5)
    assert 1.5 <= time.monotonic() - started < 5
    assert "pid 41 (qemu-system-x86)" in info.value.message
    assert "after waiting 2 s" in info.value.message  # what it waited for, and how long


def test_access_without_ksm_and_without_root(tmp_path, fake_ksm, monkeypatch):
    with pytest.raises(KsmUnavailable, match="no KSM"):
        HostPolicy(sysfs_root=tmp_path / "absent").check_access()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionNeeded, match="needs root") as info:
        HostPolicy(sysfs_root=fake_ksm).check_access()
    assert "--kernel debian:" in info.value.one_line()


# -- on this host --------------------------------------------------------------------------

FOREIGN = """
import sys, time
from ksmbench.kernel.syscalls import Region
r = Region(4)
r.write_byte_per_page(7)
r.madvise("mergeable")
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""

#: a host session in its own process: the foreign process, started by the
#: test, is then not its descendant
ENTER_HOST_SESSION = """
import sys
from ksmbench.backends.host import HostSession
from ksmbench.errors import KsmbenchError
try:
    with HostSession():
        pass
except KsmbenchError as exc:
    print(exc.one_line())
    sys.exit(3)
print("entered")
"""

WAIT_FOR_KSM = """
import time
from ksmbench.kernel.policy import HostPolicy
started = time.monotonic()
HostPolicy().require_ksm_to_ourselves(wait=60)
print(f"{time.monotonic() - started:.2f}")
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())


@contextmanager
def foreign_ksm_user(seconds: float) -> Iterator[subprocess.Popen]:
    """A process (a child of this test, so foreign to its subprocesses) with
    MADV_MERGEABLE memory, for at most ``seconds``; killed on leaving."""
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN, str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_host_backend_refuses_a_real_foreign_ksm_user_then_enters_once_it_exits():
    from ksmbench.kernel.sysfs import KsmSysfs

    # the machine's real lock: other runs must not see the foreign process, and
    # the tunables are read while no other run is stepping them
    with RunLock(timeout=RUN_LOCK_WAIT):
        before = KsmSysfs().tunables()
        with foreign_ksm_user(120) as foreign:
            refused = _python(ENTER_HOST_SESSION)
        entered = _python(ENTER_HOST_SESSION)
        after = KsmSysfs().tunables()
    assert refused.returncode == 3, refused.stderr
    line = refused.stdout.strip()
    command = os.path.basename(sys.executable)[:15]  # comm: the executable's name, 15 bytes
    assert line.startswith(FOREIGN_USERS) and f"pid {foreign.pid} ({command})" in line
    assert (entered.returncode, entered.stdout.strip()) == (0, "entered"), entered.stderr
    assert after == before


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_waiting_for_a_real_foreign_ksm_user_ends_when_it_exits():
    with RunLock(timeout=RUN_LOCK_WAIT):
        with foreign_ksm_user(2.0):
            waited = _python(WAIT_FOR_KSM)
    assert waited.returncode == 0, waited.stderr
    assert 1.0 < float(waited.stdout) < 30  # it waited, and not until its time limit


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable() or not shutil.which("setpriv"),
                    reason="needs root, a writable KSM sysfs and setpriv (util-linux)")
def test_root_without_cap_sys_admin_is_told_pagemap_hides_frames():
    check = ("from ksmbench.errors import KsmbenchError\nfrom ksmbench.kernel.policy import HostPolicy\n"
             "try:\n    HostPolicy().check_access()\n    print('ok')\n"
             "except KsmbenchError as exc:\n    print(exc.one_line())\n")
    dropped = subprocess.run(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
                              sys.executable, "-c", check], capture_output=True, text=True,
                             timeout=60, env=os.environ.copy())
    assert dropped.returncode == 0, dropped.stderr
    assert "pagemap shows frame numbers as 0" in dropped.stdout
    assert _python(check).stdout.strip() == "ok"
