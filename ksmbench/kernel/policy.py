"""The host policy: may this run use the host's kernel, and is KSM ours alone?

One place decides both, for every caller (the host backend, the selftests,
differential testing, the benchmarks, savings and the pytest plugin).  Its
roots (/proc and /sys/kernel/mm/ksm) are injectable, like psutil's
PROCFS_PATH, so the rules are tested against fake trees without root.

**Host access** (:meth:`HostPolicy.check_access`): KSM exists (CONFIG_KSM),
we are root, the KSM sysfs is writable (a read-only bind mount is not), and
``/proc/self/pagemap`` shows frame numbers.  Since 4.2 (1c90308e7a77) pagemap
shows frame numbers as 0 to an opener without CAP_SYS_ADMIN in the initial
user namespace, so root inside a user namespace, or root with CAP_SYS_ADMIN
dropped, reads "no frame is shared" everywhere; 4.0 and 4.1 (ab676b7d6fbf)
refuse the open instead.  The check reads one page of our own to find out.

**Foreign KSM users** (:meth:`HostPolicy.foreign_ksm_users`).  The global
counters (pages_shared, pages_sharing, ksm_zero_pages, ...) and ksmd's work
include every mm that KSM knows about, so a measurement is only sound while
no other process has KSM-mergeable memory or KSM state.  A process counts as a
KSM user when any of these holds, each read where the kernel has it:

============================  ===============================================
source of truth               exists from
============================  ===============================================
``VmFlags: ... mg`` in        3.8 (834f82e2aa9a): a VM_MERGEABLE mapping
``/proc/<pid>/smaps``         (MADV_MERGEABLE, or every mapping of a process
                              with PR_SET_MEMORY_MERGE, which marks them, 6.4)
``ksm_mergeable: yes`` in     ~6.14 (3ab76c767bc7): the same fact, answered
``/proc/<pid>/ksm_stat``      by the kernel (ksm_process_mergeable()); where
                              it is printed, smaps need not be walked
``ksm_merge_any: yes``        ~6.14: MMF_VM_MERGE_ANY (PR_SET_MEMORY_MERGE,
                              6.4, d7597f59d1d3); before ~6.14 another
                              process's flag is visible only through the
                              VM_MERGEABLE mappings it causes
``ksm_rmap_items`` > 0        6.1 (cb4df4cae4f2), ksm_stat: ksmd has scanned
                              its pages (they stay counted after
                              MADV_UNMERGEABLE until ksmd drops them)
``ksm_merging_pages`` > 0     5.19 (7609385337a4) as its own file, in
                              ksm_stat from 6.4: its pages are merged now
``ksm_zero_pages`` > 0        6.6 (the KSM zero-page series), ksm_stat
============================  ===============================================

Negative per-mm ksm_zero_pages (the 6.6-6.9 accounting bug, fixed by
c2dc78b86e08 in 6.10) are not counted as use: a process would otherwise be
"foreign" forever.

**Ours** is one rule: this process and its descendants (the agents, the
zygote and the sentinel, a scenario's forks, the savings workloads, a
selftest binary).  Their memory is the measurement.  Orphans of ours are
reparented to us (the host session is a child subreaper), so they stay ours.
A process started by our parent, or by another ksmbench run, is foreign.

A caller chooses only whether to refuse at once or to wait (bounded) for
the foreign users to go: :meth:`HostPolicy.require_ksm_to_ourselves`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..errors import Busy, KernelIOError, PermissionNeeded, os_boundary
from . import procfs as _procfs
from . import sysfs as _sysfs
from .procfs import PM_PFN_MASK, PM_PRESENT, ProcFS
from .syscalls import PAGE_SIZE, Region
from .sysfs import KsmSysfs

#: the start of every refusal for foreign KSM users (callers that retry match it)
FOREIGN_USERS = "other processes already have KSM-mergeable memory"
_HINT = "stop them, or run on a VM kernel (--kernel debian:<version>)"
#: how often a waiting caller looks again (one look reads every process's ksm_stat)
POLL_SECONDS = 1.0
#: users named in one message
_SHOWN = 5


@dataclass(frozen=True)
class KsmUser:
    """A process, not ours, with KSM-mergeable memory or KSM state."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def refusal(users: list[KsmUser], waited: float = 0.0) -> Busy:
    """The one-line error naming the foreign users (still there after ``waited`` s)."""
    shown = ", ".join(map(str, users[:_SHOWN]))
    more = f" and {len(users) - _SHOWN} more" if len(users) > _SHOWN else ""
    after = f" (still, after waiting {waited:.0f} s for them to go)" if waited > 0 else ""
    return Busy(f"{FOREIGN_USERS}: {shown}{more}{after}; KSM's global counters and ksmd's "
                "work would include their pages", hint=_HINT)


class HostPolicy:
    """Host access and foreign KSM users, read from one /proc and one KSM sysfs."""

    def __init__(self, *, sysfs_root: str | os.PathLike = _sysfs.DEFAULT_ROOT,
                 proc_root: str | os.PathLike = _procfs.DEFAULT_ROOT):
        self.sysfs = KsmSysfs(sysfs_root)
        self.procfs = ProcFS(proc_root)

    # -- host access -------------------------------------------------------------
    def check_access(self) -> None:
        """Refuse early, with a useful message, when the host cannot be used."""
        self.sysfs.require()
        if os.geteuid() != 0:
            raise PermissionNeeded(
                "running scenarios on the host kernel needs root (KSM tunables, pagemap frame numbers)",
                hint="run as root, or use a VM kernel: --kernel debian:6.12")
        if not os.access(self.sysfs.root / "run", os.W_OK):
            raise PermissionNeeded(f"{self.sysfs.root} is not writable (read-only sysfs?)",
                                   hint="use a VM kernel: --kernel debian:6.12")
        if not self.pagemap_shows_frames():
            raise PermissionNeeded(
                f"{self.procfs.path('self', 'pagemap')} shows frame numbers as 0: "
                "CAP_SYS_ADMIN in the initial user namespace is needed",
                hint="run as root outside a user namespace, or use a VM kernel: --kernel debian:6.12")

    def pagemap_shows_frames(self) -> bool:
        """Whether our pagemap shows the frame of a page we just wrote."""
        path = self.procfs.path("self", "pagemap")
        page = Region(1)
        try:
            page.write_byte_per_page(1)
            with os_boundary(f"reading {path}"):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    entry = int.from_bytes(os.pread(fd, 8, page.addr // PAGE_SIZE * 8), "little")
                finally:
                    os.close(fd)
        finally:
            page.munmap()
        if not entry & int(PM_PRESENT):
            raise KernelIOError(f"{path}: a page just written is not present", None)
        return bool(entry & int(PM_PFN_MASK))

    # -- foreign KSM users ---------------------------------------------------------
    def foreign_ksm_users(self) -> list[KsmUser]:
        """Every process, apart from ours, with KSM-mergeable memory or KSM state."""
        me = os.getpid()
        found = []
        for pid in self.procfs.pids():
            if pid == me:
                continue
            try:
                if not self._uses_ksm(pid) or self._is_ours(pid, me):
                    continue
                command = self.procfs.comm(pid)
            except (KernelIOError, PermissionNeeded, ValueError, IndexError):
                continue  # it exited while being read, or is not ours to read
            if command is not None:  # None: it exited meanwhile
                found.append(KsmUser(pid, command))
        return found

    def _uses_ksm(self, pid: int) -> bool:
        stat = self.procfs.ksm_stat(pid)
        if stat.get("ksm_mergeable") or stat.get("ksm_merge_any"):
            return True
        if any((stat.get(name) or 0) > 0
               for name in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages")):
            return True
        if stat.get("ksm_mergeable") is not None:
            return False  # the kernel answered for every mapping (~6.14+)
        if stat.get("ksm_merging_pages") is None and (self.procfs.ksm_merging_pages(pid) or 0) > 0:
            return True  # 5.19-6.3: its own file, not yet in ksm_stat
        smaps = self.procfs.smaps(pid) or ""
        return any(line.startswith("VmFlags:") and " mg" in line for line in smaps.splitlines())

    def _is_ours(self, pid: int, me: int) -> bool:
        """Whether ``pid`` descends from ``me`` (its ppid chain reaches us)."""
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            fields = self.procfs.stat_fields(pid)
            if not fields:
                return False
            pid = int(fields[1])
            if pid == me:
                return True
        return False

    def require_ksm_to_ourselves(self, *, wait: float = 0.0) -> None:
        """Refuse (``wait`` 0) or wait up to ``wait`` seconds while other
        processes use KSM; :class:`Busy` names those still there."""
        deadline = time.monotonic() + wait
        while True:
            users = self.foreign_ksm_users()
            if not users:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise refusal(users, waited=wait)
            time.sleep(min(POLL_SECONDS, left))
