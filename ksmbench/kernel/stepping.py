"""Stepping ksmd exactly one full scan at a time.

How ksmd waits (mm/ksm.c, ksm_scan_thread(), unchanged in this respect from
4.x to 6.18): after a batch of ``pages_to_scan`` items it sleeps on
``ksm_iter_wait`` for ``sleep_millisecs``, woken early only when
``sleep_millisecs`` changes; when ksmd should not run (run != 1, or no mm
registered) it sleeps on ``ksm_thread_wait`` until a write of run=1 wakes it.
A batch ends early when a full scan completes, so with a huge
``pages_to_scan`` one batch is exactly one full scan.

The protocol here keeps ksmd *parked* between scans: run=0, asleep on
``ksm_thread_wait``.  One scan is then:

1. write run=1: ksmd wakes and runs one batch = one full scan;
2. wait until ``full_scans`` grew by exactly one (bounded);
3. wait until ksmd sleeps again (state S in /proc/<ksmd>/stat), now on
   ``ksm_iter_wait`` with a long ``sleep_millisecs``;
4. park it: write run=0, then change ``sleep_millisecs`` (alternating two
   values; writing the value already there wakes nothing), which wakes it
   from ``ksm_iter_wait`` into ``ksm_thread_wait``; wait until it sleeps.

Because run=0 between scans, a process registering with KSM between scans
does not start an unrequested scan (``__ksm_enter()`` wakes ksmd when the mm
list was empty).  A sentinel mm (see ``backends.host``) keeps the list from
ever being empty, so every requested scan really happens.

``stable_node_chains_prune_millisecs`` is set to 0 while stepping: pruning of
stale dups in max_page_sharing chains is otherwise decided by wall-clock time
(``stable_node_dup()``), which would make observations depend on timing.
"""

from __future__ import annotations

import time

from ..errors import WaitTimeout
from ..waiting import time_scale, wait_until
from .procfs import ProcFS
from .sysfs import KsmSysfs
from .tunables import TunableChanges

SLEEP_A = 60000
SLEEP_B = 60001
#: pages_to_scan while stepping: larger than any region ksmbench maps
PAGES_TO_SCAN = 16 * 1024 * 1024


class ScanStepper:
    def __init__(self, sysfs: KsmSysfs, procfs: ProcFS, changes: TunableChanges, *,
                 timeout_base: float = 20.0, timeout_per_page: float = 20e-6):
        self.sysfs = sysfs
        self.procfs = procfs
        self.changes = changes
        self.timeout_base = timeout_base
        self.timeout_per_page = timeout_per_page
        self.ksmd_pid: int | None = None
        self._sleep = SLEEP_A
        #: full scans completed through this stepper (monotonic, unlike the
        #: kernel's full_scans, which run=2 resets to 0)
        self.scans_done = 0
        self.prepared = False

    # -- setup ---------------------------------------------------------------
    def prepare(self) -> None:
        """Take control of ksmd: stepping tunables set, ksmd parked."""
        self.sysfs.require()
        self.ksmd_pid = self.procfs.find_kthread("ksmd")
        if self.sysfs.tunable("advisor_mode") not in (None, "none"):
            # 6.8+: with advisor_mode=scan-time, pages_to_scan is the
            # advisor's and writing it fails with -EINVAL.
            self.changes.set("advisor_mode", "none")
        self.changes.set("pages_to_scan", PAGES_TO_SCAN)
        if self.sysfs.has("stable_node_chains_prune_millisecs"):
            self.changes.set("stable_node_chains_prune_millisecs", 0)
        self.changes.set("run", 0)
        current = self.sysfs.tunable("sleep_millisecs")
        self._sleep = SLEEP_B if current == str(SLEEP_A) else SLEEP_A
        self._park("taking control of ksmd")
        self.prepared = True

    def _timeout(self, pages: int) -> float:
        return (self.timeout_base + pages * self.timeout_per_page) * time_scale()

    def _ksmd_asleep(self) -> bool:
        if self.ksmd_pid is None:
            return True
        return self.procfs.task_state(self.ksmd_pid) in ("S", "I")

    def _wait_ksmd_asleep(self, what: str) -> None:
        if self.ksmd_pid is None:
            time.sleep(0.05)  # no /proc view of ksmd: give it time instead
            return
        wait_until(self._ksmd_asleep, timeout=10 * time_scale(),
                   what=f"{what}: ksmd (pid {self.ksmd_pid}) to go back to sleep")

    def _park(self, what: str) -> None:
        if self.sysfs.tunable("run") == "1":
            self.changes.set("run", 0)
        self._sleep = SLEEP_B if self._sleep == SLEEP_A else SLEEP_A
        self.changes.set("sleep_millisecs", self._sleep)
        self._wait_ksmd_asleep(what)

    # -- stepping ------------------------------------------------------------
    def full_scans(self) -> int:
        value = self.sysfs.read_int("full_scans")
        return 0 if value is None else value

    def scan(self, *, pages_hint: int = 0, label: str = "") -> None:
        """Run exactly one full scan and return with ksmd parked."""
        if not self.prepared:
            self.prepare()
        number = self.scans_done + 1
        where = f"{label} scan {number}" if label else f"scan {number}"
        before = self.full_scans()
        self.changes.set("run", 1)
        timeout = self._timeout(pages_hint)
        after = wait_until(lambda: (v := self.full_scans()) > before and v, timeout=timeout,
                           what=f"{where}: ksmd to complete a full scan "
                                f"(full_scans {before} -> {before + 1})",
                           hint="is another program changing /sys/kernel/mm/ksm? "
                                "raise KSMBENCH_TIME_SCALE on a slow machine")
        self._wait_ksmd_asleep(where)
        self._park(where)
        after = self.full_scans()
        if after != before + 1:
            raise WaitTimeout(f"{where}: ksmd ran {after - before} full scans instead of 1",
                              hint="something else woke ksmd; is another tool driving KSM?")
        self.scans_done += 1

    def unmerge_all(self) -> None:
        """``echo 2 > run``: unshare everything, drop all rmap items (synchronous)."""
        if not self.prepared:
            self.prepare()
        self.changes.set("run", 2)
