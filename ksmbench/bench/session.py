"""A benchmark session on the running kernel: the host backend's session plus
free-running ksmd, timed the way the kernel's own ``ksm_tests -P`` times it.

Everything that touches KSM goes through the kernel layer:
:class:`~ksmbench.backends.host.HostSession` refuses when another process uses
KSM, takes ksmd under control, starts the sentinel mm, and restores every
tunable (through the one undo mechanism, TunableChanges) on the way out, also
on Ctrl-C and SIGTERM.  The caller holds the RunLock.

Two ways of driving ksmd are used:

* **stepped** (:class:`~ksmbench.kernel.stepping.ScanStepper`): one full scan
  per kick, ksmd parked in between, for per-scan CPU cost;
* **free-running** (:meth:`BenchSession.free_merge`): ``sleep_millisecs=0``,
  ``pages_to_scan`` as given, ``run=1``, and the clock runs from
  MADV_MERGEABLE until ``full_scans`` has grown by 2, exactly the interval
  ``ksm_merge_time()`` in tools/testing/selftests/mm/ksm_tests.c measures
  ("merging occurs only after 2 scans").  This is the merge throughput that
  is cross-checked against ``ksm_tests -P``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backends.host import HostSession
from ..errors import Busy, WaitTimeout
from ..kernel import syscalls
from ..observation import absolute_levels, from_baseline
from ..waiting import time_scale
from .affinity import repair_ksmd_affinity
from .config import FreeRunTunables
from .probes import CpuTime, ThreadCpu, ksmd_cpu, read_tlb_shootdowns

MIB = 1 << 20
PAGE_SIZE = syscalls.PAGE_SIZE
#: the byte ksm_tests fills its duplicate area with (allocate_memory(..., '*', ...))
DUP_BYTE = 0x2A


@dataclass(frozen=True)
class MergeTiming:
    seconds: float            # MADV_MERGEABLE .. full_scans +2
    first_scan_seconds: float  # MADV_MERGEABLE .. full_scans +1 (checksums only)
    ksmd_cpu: CpuTime         # ksmd's CPU time over the interval
    counters: dict            # KSM counters right after, counted from before MADV_MERGEABLE
    #: TLB-shootdown interrupts over the interval, all CPUs (None: not x86)
    tlb_shootdowns: int | None = None


def fill_region(region: syscalls.Region, content: str) -> None:
    """Write every page: ``dup`` = every byte 0x2a (as ksm_tests), ``zero`` = zeros."""
    if content == "dup":
        page = np.full(PAGE_SIZE, DUP_BYTE, dtype=np.uint8)
    elif content == "zero":
        page = np.zeros(PAGE_SIZE, dtype=np.uint8)
    else:
        raise ValueError(f"unknown content {content!r} (dup or zero)")
    chunk = 16384
    for first in range(0, region.npages, chunk):
        n = min(chunk, region.npages - first)
        region.write_pages(first, np.broadcast_to(page, (n, PAGE_SIZE)))


def new_region(npages: int, *, thp_advice: str | None = "nohugepage") -> syscalls.Region:
    """A private anonymous region; NOHUGEPAGE unless told otherwise (None: the
    system's THP default, as ksm_tests leaves it)."""
    region = syscalls.Region(npages)
    if thp_advice:
        region.madvise(thp_advice)
    return region


class BenchSession:
    """The host session, plus ksmd's CPU clock and the free-running merge."""

    def __init__(self, wait: float = 0.0) -> None:
        self.host = HostSession()
        self.cpu: ThreadCpu | None = None
        self.wait = wait
        self.repair_message: str | None = None

    def __enter__(self) -> "BenchSession":
        # the host session refuses at once when another process uses KSM (a
        # guest's QEMU, say); a benchmark waits for it to go, within --wait
        if self.wait > 0:
            self.host.policy.require_ksm_to_ourselves(wait=self.wait)
        self.host.__enter__()
        try:
            self.repair_message = repair_ksmd_affinity()
            self.cpu = ksmd_cpu(self.host.procfs, self.host.stepper.ksmd_pid)
        except BaseException:
            self.host.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.host.__exit__(*exc)

    # -- shortcuts ---------------------------------------------------------------
    @property
    def sysfs(self):
        return self.host.sysfs

    @property
    def changes(self):
        return self.host.changes

    @property
    def stepper(self):
        return self.host.stepper

    def counters(self) -> dict:
        return self.host.sysfs.counters()

    # -- exclusivity ---------------------------------------------------------------
    def wait_exclusive(self, timeout: float, what: str) -> None:
        """Wait until no other process has KSM-mergeable memory.

        Global counters and ksmd's work include every registered mm; QEMU, for
        one, registers guest RAM with KSM by default (-machine mem-merge=on).
        A measurement may only start when KSM is ours alone.
        """
        try:
            self.host.policy.require_ksm_to_ourselves(wait=timeout)
        except Busy as exc:
            raise Busy(f"{what}: {exc.message}", hint=exc.hint) from None

    def still_exclusive(self) -> str | None:
        """None if KSM was ours alone; else who else uses it (the measurement
        just taken is then contaminated and must be repeated)."""
        try:
            self.host.policy.require_ksm_to_ourselves()
            return None
        except Busy as exc:
            return exc.message

    def clean(self) -> None:
        """run=2: every KSM page and (6.6+) KSM zero page unshared, every rmap
        item freed, the scan cursor back at the list head, full_scans 0."""
        self.changes.set("run", 2)

    def set_use_zero_pages(self, value: int) -> None:
        self.changes.set("use_zero_pages", int(value))

    def apply_free_tunables(self, tun: FreeRunTunables, use_zero_pages: int) -> None:
        """Hold ``tun`` (and use_zero_pages) with ksmd stopped (run=2 first:
        max_page_sharing and merge_across_nodes refuse changes while KSM pages
        exist)."""
        self.clean()
        self.changes.set("max_page_sharing", tun.max_page_sharing)
        if self.sysfs.has("merge_across_nodes"):  # CONFIG_NUMA only
            self.changes.set("merge_across_nodes", tun.merge_across_nodes)
        if self.sysfs.has("smart_scan"):  # 6.7+
            self.changes.set("smart_scan", tun.smart_scan)
        if self.sysfs.has("stable_node_chains_prune_millisecs"):  # 4.13+
            self.changes.set("stable_node_chains_prune_millisecs",
                             tun.stable_node_chains_prune_millisecs)
        if self.sysfs.tunable("advisor_mode") not in (None, "none"):
            self.changes.set("advisor_mode", "none")  # 6.8+: pages_to_scan is ours
        self.changes.set("pages_to_scan", tun.pages_to_scan)
        self.changes.set("sleep_millisecs", tun.sleep_millisecs)
        self.set_use_zero_pages(use_zero_pages)
        # the stepper's tunables are gone: it re-parks ksmd before its next scan
        self.stepper.prepared = False

    def stop_ksmd(self) -> None:
        self.changes.set("run", 0)

    # -- free-running merge (the ksm_tests -P interval) ----------------------------
    def free_merge(self, advise: Callable[[], None], npages: int, tun: FreeRunTunables,
                   use_zero_pages: int, *, busy_poll: bool = False,
                   apply: bool = True) -> MergeTiming:
        """Clean, hold ``tun``, then time ``advise()`` (MADV_MERGEABLE by the
        region's owner) + run=1 until full_scans has grown by 2.

        Who polls matters.  ``busy_poll=False``: this process polls every
        0.2 ms while the region's owner (an agent) sleeps.  ``busy_poll=True``
        reproduces ksm_tests, whose own process, the region's owner, spins on
        full_scans: on a 2-CPU machine that costs ksmd the TLB-flush IPIs to
        the spinning CPU that write_protect_page()/replace_page() send for the
        owner's mm, and the merge slows down severalfold (measured, see
        the cross-check).  ``apply=False``: the tunables are already held.
        """
        if apply:
            self.apply_free_tunables(tun, use_zero_pages)
        start_scans = self._full_scans()  # 0 after run=2 (ksm_scan.seqnr = 0)
        baseline = absolute_levels(self.counters())  # a leaked ksm_zero_pages is not this merge's
        timeout = (30 + npages * 200e-6) * time_scale()
        tlb0 = read_tlb_shootdowns()
        cpu0 = self.cpu.sample()
        t0 = time.perf_counter()
        advise()
        self.changes.set("run", 1)
        pause = 0.0 if busy_poll else 0.0002
        t_first = self._wait_scans(start_scans + 1, t0, timeout, "the first full scan", pause)
        t_end = self._wait_scans(start_scans + 2, t0, timeout, "the second full scan", pause)
        cpu1 = self.cpu.sample()
        tlb1 = read_tlb_shootdowns()
        self.stop_ksmd()
        counters = from_baseline(self.counters(), baseline)
        return MergeTiming(seconds=t_end - t0, first_scan_seconds=t_first - t0,
                           ksmd_cpu=cpu1 - cpu0, counters=counters,
                           tlb_shootdowns=None if tlb0 is None or tlb1 is None else tlb1 - tlb0)

    def _full_scans(self) -> int:
        value = self.sysfs.read_int("full_scans")
        return 0 if value is None else value

    def _wait_scans(self, target: int, t0: float, timeout: float, what: str,
                    pause: float) -> float:
        while True:
            if self._full_scans() >= target:
                return time.perf_counter()
            if time.perf_counter() - t0 > timeout:
                raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what} of a "
                                  f"free-running ksmd (full_scans {self._full_scans()}, "
                                  f"want {target})",
                                  hint="raise KSMBENCH_TIME_SCALE on a slow machine")
            if pause:
                time.sleep(pause)

    # -- stepped scans with CPU cost -------------------------------------------------
    def prepare_stepping(self, use_zero_pages: int, prune_millisecs: int) -> None:
        """Clean, then park ksmd for stepping with ``use_zero_pages``.

        The stepper sets stable_node_chains_prune_millisecs=0 for
        deterministic scenario observations; for cost measurements it is set
        back to ``prune_millisecs`` (the free-running value), so that both
        ways of driving ksmd do the same work per page.
        """
        self.clean()
        self.set_use_zero_pages(use_zero_pages)
        self.stepper.prepare()
        if self.sysfs.has("stable_node_chains_prune_millisecs"):
            self.changes.set("stable_node_chains_prune_millisecs", prune_millisecs)

    def timed_scan(self, npages: int, label: str) -> tuple[float, CpuTime, dict]:
        """One stepped full scan: wall seconds, ksmd CPU, counters after."""
        cpu0 = self.cpu.sample()
        t0 = time.perf_counter()
        self.stepper.scan(pages_hint=npages, label=label)
        wall = time.perf_counter() - t0
        cpu = self.cpu.sample() - cpu0
        return wall, cpu, self.counters()


def merged_pages(counters: dict) -> int:
    """Pages now backed by a KSM page or the zero page: every mapping of a
    KSM page (pages_shared + pages_sharing) plus KSM zero pages (6.6+)."""
    return ((counters.get("pages_shared") or 0) + (counters.get("pages_sharing") or 0)
            + (counters.get("ksm_zero_pages") or 0))
