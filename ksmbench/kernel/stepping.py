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
(``stable_node_dup()``), which would make observations depend on timing.  A
scenario may set another value; :meth:`ScanStepper.hold_prune_clock` then makes
the wall clock follow the emulator's modelled one (docs/stepping.md).

A *partial batch* (:meth:`ScanStepper.batch`) runs ksm_do_scan() once with
``pages_to_scan`` = N: the end of the batch is seen as ksmd going back to sleep
(state S) after at least one voluntary context switch since the kick.  Before
a batch that resumes a full scan the per-CPU LRU batches are emptied, as ksmd
does at the start of every full scan (:meth:`ScanStepper._drain_if_resuming`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..errors import WaitTimeout
from ..waiting import time_scale, wait_until
from . import syscalls
from .procfs import ProcFS
from .sysfs import KsmSysfs
from .tunables import TunableChanges

SLEEP_A = 60000
SLEEP_B = 60001
#: pages_to_scan while stepping: larger than any region ksmbench maps
PAGES_TO_SCAN = 16 * 1024 * 1024
#: the prune clock's safety margin: jiffies round msecs up, HZ may be 100
PRUNE_MARGIN = 0.05


@dataclass(frozen=True)
class AdvisorScan:
    """What the host measured around one full scan with the advisor on."""

    batches: int
    #: from the first kick to the end of the last batch seen (ksmd asleep)
    seconds: float
    #: ksmd's CPU time (ns, /proc/<ksmd>/schedstat) while parked before the
    #: first and the last batch, and after the scan; None without schedstat
    cpu_first_kick: int | None
    cpu_last_kick: int | None
    cpu_parked: int | None
    #: the pages_to_scan the advisor set at the end of the scan
    pages_to_scan: int | None

    def scan_times(self) -> range:
        """The scan_time (s) scan_time_advisor() may have computed: it times
        the scan from its first batch to its end, inside the measured
        interval, in whole seconds truncated, 0 counted as 1."""
        return range(1, max(1, int(self.seconds)) + 1)

    def cpu_ns(self, previous: "AdvisorScan | None") -> tuple[int, int] | None:
        """Bounds of the ksmd CPU time (ns) the advisor counted for this scan:
        task_sched_runtime() at the scan's end, which lies between the last
        kick and the parking, minus the same at the previous scan's end, or
        minus 0 for the first scan after a reset (advisor_ctx zeroed), which
        so counts all of ksmd's CPU time since boot.  None without schedstat."""
        if self.cpu_last_kick is None or self.cpu_parked is None:
            return None
        if previous is None:
            return self.cpu_last_kick, self.cpu_parked
        if previous.cpu_last_kick is None or previous.cpu_parked is None:
            return None
        return (max(0, self.cpu_last_kick - previous.cpu_parked),
                self.cpu_parked - previous.cpu_last_kick)


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
        #: a partial batch left ksmd's cursor inside the mm list
        self._mid_scan = False
        self.prepared = False
        #: the prune clock (hold_prune_clock): the interval in seconds, its
        #: regime, when the last batch ended and when the scenario started
        self._prune: tuple[str, float] | None = None
        self._prune_msecs = 0
        self._last_batch_end = 0.0
        self._clock_start = 0.0
        #: the scan-time advisor owns pages_to_scan (hold_advisor)
        self._advisor = False
        #: what was measured around each full scan since hold_advisor()
        self.advisor_scans: list[AdvisorScan] = []
        #: called after each of the advisor's scans with (where, this scan,
        #: the previous one or None); the host backend checks there that the
        #: measured inputs leave the advisor only the modelled outcome
        self.advisor_check: Callable[[str, AdvisorScan, AdvisorScan | None], None] | None = None

    # -- setup ---------------------------------------------------------------
    def prepare(self) -> None:
        """Take control of ksmd: stepping tunables set, ksmd parked."""
        self.sysfs.require()
        self.ksmd_pid = self.procfs.find_kthread("ksmd")
        if not self._advisor:
            if self.sysfs.tunable("advisor_mode") not in (None, "none"):
                # 6.8+: with advisor_mode=scan-time, pages_to_scan is the
                # advisor's and writing it fails with -EINVAL.
                self.changes.set("advisor_mode", "none")
            self.changes.set("pages_to_scan", PAGES_TO_SCAN)
        if self.sysfs.has("stable_node_chains_prune_millisecs"):
            # 0 unless a scenario holds another value (hold_prune_clock), which
            # a re-prepare after an error must not lose
            self.changes.set("stable_node_chains_prune_millisecs", self._prune_msecs)
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

    # -- the prune clock --------------------------------------------------------
    def hold_prune_clock(self, msecs: int, regime: str) -> None:
        """Use stable_node_chains_prune_millisecs = ``msecs`` from now on, and
        keep the timing that makes its outcome deterministic: "always" (0 ms)
        needs nothing; "per-batch" waits ``msecs`` (plus a margin) between the
        end of one batch and the start of the next and requires each batch to
        be shorter than ``msecs``; "never" requires the whole scenario (from
        now) to be shorter than ``msecs``."""
        self._prune_msecs = msecs
        if self.sysfs.has("stable_node_chains_prune_millisecs"):
            self.changes.set("stable_node_chains_prune_millisecs", msecs)
        self._prune = None if regime == "always" else (regime, msecs / 1000)
        self._clock_start = time.monotonic()
        self._last_batch_end = 0.0

    def _before_batch(self) -> float:
        if self._prune is not None and self._prune[0] == "per-batch":
            wait = self._last_batch_end + self._prune[1] + PRUNE_MARGIN - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        return time.monotonic()

    def _after_batch(self, started: float, where: str) -> None:
        now = self._last_batch_end = time.monotonic()
        if self._prune is None:
            return
        regime, interval = self._prune
        took, since = now - started, now - self._clock_start
        if regime == "per-batch" and took >= interval - PRUNE_MARGIN:
            raise WaitTimeout(f"{where}: the batch took {took:.3f} s, not less than "
                              f"stable_node_chains_prune_millisecs ({interval * 1000:.0f} ms): "
                              "its pruning is no longer once per batch",
                              hint="raise stable_node_chains_prune_millisecs in the scenario")
        if regime == "never" and since >= interval - PRUNE_MARGIN:
            raise WaitTimeout(f"{where}: the scenario has run {since:.0f} s, as long as "
                              "stable_node_chains_prune_millisecs: chains may now be pruned",
                              hint="raise stable_node_chains_prune_millisecs in the scenario")

    # -- stepping ------------------------------------------------------------
    def _drain_if_resuming(self) -> None:
        """Before a batch that resumes a full scan, empty every CPU's LRU
        batches, as ksmd's lru_add_drain_all() does at the start of each full
        scan (scan_get_next_rmap_item()).  A page the scenario wrote between
        two batches of one scan would otherwise sit in a per-CPU batch with
        an extra reference; write_protect_page() refuses a page whose refcount
        exceeds its mapcount + 1, so whether it merged would depend on which
        CPU the write ran on and how full that CPU's batch was (found by the
        differential test: the same scenario merged 2, then 0, of 26 pages)."""
        if self._mid_scan:
            syscalls.drain_lru_batches()

    def full_scans(self) -> int:
        value = self.sysfs.read_int("full_scans")
        return 0 if value is None else value

    def scan(self, *, pages_hint: int = 0, label: str = "") -> None:
        """Run exactly one full scan and return with ksmd parked."""
        if not self.prepared:
            self.prepare()
        number = self.scans_done + 1
        where = f"{label} scan {number}" if label else f"scan {number}"
        if self._advisor:
            self._advisor_scan(where, pages_hint)
            self.scans_done += 1
            self._mid_scan = False
            return
        before = self.full_scans()
        self._drain_if_resuming()
        started = self._before_batch()
        self.changes.set("run", 1)
        timeout = self._timeout(pages_hint)
        after = wait_until(lambda: (v := self.full_scans()) > before and v, timeout=timeout,
                           what=f"{where}: ksmd to complete a full scan "
                                f"(full_scans {before} -> {before + 1})",
                           hint="is another program changing /sys/kernel/mm/ksm? "
                                "raise KSMBENCH_TIME_SCALE on a slow machine")
        self._wait_ksmd_asleep(where)
        self._after_batch(started, where)
        self._park(where)
        after = self.full_scans()
        if after != before + 1:
            raise WaitTimeout(f"{where}: ksmd ran {after - before} full scans instead of 1",
                              hint="something else woke ksmd; is another tool driving KSM?")
        self.scans_done += 1
        self._mid_scan = False

    def batch(self, pages: int, *, pages_hint: int = 0, label: str = "") -> None:
        """Run exactly one ksmd batch of ``pages`` pages (ksm_do_scan() with
        scan_npages = pages) and return with ksmd parked.  The batch ends
        early where a full scan completes; ``scans_done`` counts that scan."""
        if not self.prepared:
            self.prepare()
        where = f"{label} batch of {pages} pages" if label else f"batch of {pages} pages"
        if self.ksmd_pid is None:
            raise WaitTimeout(f"{where}: ksmd has no /proc entry here, so the end of a "
                              "partial batch cannot be seen")
        if self._advisor:
            raise WaitTimeout(f"{where}: pages_to_scan belongs to the scan-time advisor",
                              hint="a scenario with advisor_mode = \"scan-time\" scans whole scans")
        before = self.full_scans()
        self.changes.set("pages_to_scan", pages)
        self._drain_if_resuming()
        started = self._before_batch()
        self._run_batch(where, pages_hint)
        self._after_batch(started, where)
        self._park(where)
        self.changes.set("pages_to_scan", PAGES_TO_SCAN)
        grew = self.full_scans() - before
        if grew not in (0, 1):
            raise WaitTimeout(f"{where}: ksmd completed {grew} full scans in one batch",
                              hint="something else woke ksmd; is another tool driving KSM?")
        self.scans_done += grew
        self._mid_scan = grew == 0

    def _run_batch(self, where: str, pages_hint: int) -> None:
        """Kick a parked ksmd (run=1) and wait until its batch is over: asleep
        (S: ksm_iter_wait; the sleeps inside a batch are D) after going to
        sleep at least once since the kick."""
        switches = self.procfs.voluntary_switches(self.ksmd_pid)
        self.changes.set("run", 1)
        wait_until(lambda: self._ksmd_asleep()
                   and (self.procfs.voluntary_switches(self.ksmd_pid) or 0) > (switches or 0),
                   timeout=self._timeout(pages_hint),
                   what=f"{where}: ksmd (pid {self.ksmd_pid}) to run one batch and sleep",
                   hint="is another program changing /sys/kernel/mm/ksm?")

    # -- the scan-time advisor (6.8) -------------------------------------------------
    def hold_advisor(self, knobs: dict[str, int]) -> None:
        """Turn the scan-time advisor on for a scenario, freshly reset: the
        ``advisor_*`` knobs first, then advisor_mode none -> scan-time, whose
        set_advisor_defaults() zeroes the advisor's context and sets
        pages_to_scan to advisor_min_pages_to_scan (4e5fa4f5eff6).  All
        through the undo stack, which restores advisor_mode before
        pages_to_scan (tunables.restore_values)."""
        if self.ksmd_pid is None:
            raise WaitTimeout("the scan-time advisor: ksmd has no /proc entry here, so the "
                              "end of its batches cannot be seen")
        for name, value in knobs.items():
            self.changes.set(name, value)
        self.changes.set("advisor_mode", "none")
        self.changes.set("advisor_mode", "scan-time")
        self._advisor = True
        self.advisor_scans = []

    def release_advisor(self) -> None:
        """advisor_mode=none (set_advisor_defaults() puts pages_to_scan to
        100), then stepping's own pages_to_scan again."""
        if self.sysfs.tunable("advisor_mode") not in (None, "none"):
            self.changes.set("advisor_mode", "none")
        if self.sysfs.has("advisor_mode"):
            self.changes.set("pages_to_scan", PAGES_TO_SCAN)
        self._advisor = False

    def _advisor_scan(self, where: str, pages_hint: int) -> None:
        """One full scan while the advisor owns pages_to_scan: batches of the
        advisor's size, each kicked from parked and parked again, until
        full_scans grows.  Nothing runs between them, so every counter after
        the scan is what one big batch gives (docs/stepping.md, "The
        advisor").  Records what bounds the advisor's two inputs."""
        before = self.full_scans()
        pid = self.ksmd_pid
        deadline = time.monotonic() + self._timeout(pages_hint)
        first_cpu = self.procfs.sched_runtime(pid)
        started = time.monotonic()
        batches = 0
        while True:
            kick_cpu = first_cpu if batches == 0 else self.procfs.sched_runtime(pid)
            self._run_batch(f"{where} batch {batches + 1}", pages_hint)
            batches += 1
            grew = self.full_scans() - before
            ended = time.monotonic()
            self._park(where)
            if grew:
                break
            if time.monotonic() > deadline:
                raise WaitTimeout(f"{where}: ksmd ran {batches} batches of "
                                  f"{self.sysfs.tunable('pages_to_scan')} pages without "
                                  "completing a full scan",
                                  hint="raise KSMBENCH_TIME_SCALE on a slow machine")
        self._after_batch(started, where)  # the "never" prune clock's check (per-batch is refused)
        after = self.full_scans()
        if after != before + 1:
            raise WaitTimeout(f"{where}: ksmd ran {after - before} full scans instead of 1",
                              hint="something else woke ksmd; is another tool driving KSM?")
        record = AdvisorScan(batches=batches, seconds=ended - started,
                             cpu_first_kick=first_cpu, cpu_last_kick=kick_cpu,
                             cpu_parked=self.procfs.sched_runtime(pid),
                             pages_to_scan=self.sysfs.read_int("pages_to_scan"))
        previous = self.advisor_scans[-1] if self.advisor_scans else None
        self.advisor_scans.append(record)
        if self.advisor_check is not None:
            self.advisor_check(where, record, previous)

    def unmerge_all(self) -> None:
        """``echo 2 > run``: unshare everything, drop all rmap items (synchronous)."""
        if not self.prepared:
            self.prepare()
        self._mid_scan = False  # run=2 puts ksmd's cursor back at the list head
        self.changes.set("run", 2)
