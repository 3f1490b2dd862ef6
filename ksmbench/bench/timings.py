"""The timed benchmarks: merge, unmerge, CoW break, ksmd CPU per scan.

One *cycle* measures everything for one (content, use_zero_pages, size) on
one freshly filled region, in this order (each phase starts from run=2, so
no rmap item or checksum survives from the phase before):

1. ``merge``: free-running ksmd, MADV_MERGEABLE until 2 full scans (the
   interval ``ksm_tests -P`` times); throughput = region size / time.
2. ``unmerge``/``madvise``: MADV_UNMERGEABLE of the merged region (the
   unshare faults run in the caller: break_ksm()).
3. ``scan_cost``: stepped scans 1..3 with ksmd's CPU time for each.
4. ``unmerge``/``run2``: writing run=2 (unmerge_and_remove_all_rmap_items()
   runs in the writer's context, so the write returns when it is done).
5. ``cow``: merge again (2 stepped scans), then one byte written per page:
   every write is a CoW break (wp_page_copy()) of a KSM page, or, with
   use_zero_pages=1, of a KSM zero page (since 6.6 that also decrements
   ksm_zero_pages, e2942062e01d).  Baselines: the same write again (no fault)
   and the first touch of a fresh region (anonymous fault + zeroing).

The region belongs to an agent process (the host backend's, one per region)
that sleeps on its socket while ksmd works, as most memory KSM merges does:
a process that runs on another CPU while ksmd merges its pages receives a
TLB-flush IPI per write-protected page, which slows ksmd down severalfold on
a 2-CPU machine (see ``session.free_merge``).  Operations the owner must do
itself (madvise, writes) are timed inside the agent (its ``timed`` op), so no
socket round trip is in the interval.  Page states are read from the agent's
pagemap by this process (root reads any process's frame numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backends.host import AgentHandle
from ..kernel.procfs import FrameReader, ProcFS
from .probes import classify_frames
from .config import FreeRunTunables
from .session import BenchSession, merged_pages

#: (content, use_zero_pages) cases: duplicates; zero pages merged like any
#: duplicates; zero pages replaced by the shared zero page (4.11, tracked 6.6+)
CASES: tuple[tuple[str, int], ...] = (("dup", 0), ("zero", 0), ("zero", 1))
STEPPED_SCANS = 3
#: the duplicate content: one tag page (ksm_tests fills with '*'; the cost of
#: checksumming and comparing a page does not depend on its bytes)
PATTERNS = {"dup": "tag:bench-dup", "zero": "zero"}

Sample = dict[str, tuple[float, str]]
Record = Callable[[str, str, float, int, int, Sample], None]  # benchmark, case, size, uzp, repeat, metrics


@dataclass
class RegionState:
    """What pagemap says about the region: the truth on every kernel, also
    before 6.6 where no counter shows KSM zero pages."""

    present: int
    zero_pfn: int
    ksm: int

    @property
    def merged(self) -> int:
        return self.zero_pfn + self.ksm


class FrameView:
    """Reads the frames of regions of other processes (pagemap + kpageflags)."""

    def __init__(self) -> None:
        self._own = FrameReader(ProcFS(), "self")
        self.zero_pfn = self._own.discover_zero_pfn()

    def state(self, pid: int, addr: int, npages: int) -> RegionState:
        with FrameReader(ProcFS(), pid) as reader:
            frames = reader.frames(addr, npages)
            zero, ksm, _pages = classify_frames(reader, frames, self.zero_pfn)
        return RegionState(int(np.count_nonzero(frames >= 0)), zero, ksm)

    def close(self) -> None:
        self._own.close()


class OwnedRegion:
    """A region in an agent process, with the operations the benchmarks time."""

    def __init__(self, session: BenchSession, npages: int, name: str = "bench"):
        self.session = session
        self.npages = npages
        self.agent = AgentHandle.spawn(name)
        self.key = f"__bench_{name}"
        session.host.agents[self.key] = self.agent  # killed by the session on any exit
        self.budget = 60 + npages * 50e-6
        self.addr = self.agent.call("mmap", "r", npages, False, timeout=self.budget)

    def fill(self, pattern: str) -> None:
        self.agent.call("fill", "r", 0, self.npages, pattern, "bench", 0, timeout=self.budget)

    def madvise(self, advice: str) -> None:
        self.agent.call("madvise", "r", 0, self.npages, advice, timeout=self.budget)

    def timed(self, op: str, *args) -> float:
        """Seconds ``op`` took inside the agent."""
        return self.agent.call("timed", op, *args, timeout=self.budget) / 1e9

    def timed_madvise(self, advice: str) -> float:
        return self.timed("madvise", "r", 0, self.npages, advice)

    def timed_write(self, value: int, region: str = "r") -> float:
        return self.timed("write_byte_per_page", region, value, 0, self.npages)

    def state(self, frames: FrameView) -> RegionState:
        return frames.state(self.agent.pid, self.addr, self.npages)

    def close(self) -> None:
        self.agent.kill()
        self.session.host.agents.pop(self.key, None)


def run_cycle(session: BenchSession, frames: FrameView, *, content: str, use_zero_pages: int,
              size_mib: int, repeat: int, tun: FreeRunTunables, record: Record,
              phase: Callable[[str], None] = lambda _msg: None) -> None:
    """Measure one (content, use_zero_pages, size) once; ``record`` each phase."""
    npages = size_mib * (1 << 20) // 4096
    region = OwnedRegion(session, npages)
    try:
        region.fill(PATTERNS[content])

        # 1. merge, free-running, the ksm_tests -P interval
        phase("merge")
        timing = session.free_merge(lambda: region.madvise("mergeable"), npages, tun,
                                    use_zero_pages)
        state = region.state(frames)
        record("merge", content, size_mib, use_zero_pages, repeat, {
            "seconds": (timing.seconds, "s"),
            "mib_per_s": (size_mib / timing.seconds, "MiB/s"),
            "first_scan_seconds": (timing.first_scan_seconds, "s"),
            "ksmd_cpu_seconds": (timing.ksmd_cpu.seconds, "s"),
            "ksmd_cpu_share": (timing.ksmd_cpu.seconds / timing.seconds, "ratio"),
            "merged_pages": (state.merged, "pages"),
            "merged_fraction": (state.merged / npages, "ratio"),
            "counter_merged_pages": (merged_pages(timing.counters), "pages"),
            **({"tlb_shootdowns": (timing.tlb_shootdowns, "count")}
               if timing.tlb_shootdowns is not None else {}),
        })

        # 2. MADV_UNMERGEABLE of the merged region
        phase("unmerge (madvise)")
        def record_unmerge(how: str, merged_before: int, seconds: float) -> None:
            # pagemap, not counters: before 6.6 no counter shows KSM zero pages
            after = region.state(frames)
            record("unmerge", f"{content}/{how}", size_mib, use_zero_pages, repeat, {
                "seconds": (seconds, "s"),
                "mib_per_s": (size_mib / seconds, "MiB/s"),
                "pages_unshared": (merged_before - after.merged, "pages"),
                "pages_left_merged": (after.merged, "pages"),
            })

        record_unmerge("madvise", state.merged, region.timed_madvise("unmergeable"))

        # 3. stepped scans: ksmd CPU per full scan and per merged page
        phase("ksmd cost per scan")
        session.prepare_stepping(use_zero_pages, tun.stable_node_chains_prune_millisecs)
        region.madvise("mergeable")
        cpu_total = 0.0
        metrics: dict[str, tuple[float, str]] = {}
        for scan in range(1, STEPPED_SCANS + 1):
            wall, cpu, _counters = session.timed_scan(npages, f"bench {content} {size_mib} MiB")
            metrics[f"scan{scan}_cpu_seconds"] = (cpu.seconds, "s")
            metrics[f"scan{scan}_cpu_ticks_seconds"] = (cpu.stat_seconds, "s")
            metrics[f"scan{scan}_wall_seconds"] = (wall, "s")
            if scan <= 2:
                cpu_total += cpu.seconds
            if scan == 2:
                merged = region.state(frames).merged
                metrics["merged_pages"] = (merged, "pages")
                if merged:
                    metrics["cpu_per_merged_page_us"] = (cpu_total / merged * 1e6, "us")
        metrics["cpu_per_page_steady_ns"] = (
            metrics[f"scan{STEPPED_SCANS}_cpu_seconds"][0] / npages * 1e9, "ns")
        record("scan_cost", content, size_mib, use_zero_pages, repeat, metrics)

        # 4. run=2 of the merged region
        phase("unmerge (run=2)")
        merged_before = region.state(frames).merged
        record_unmerge("run2", merged_before, _timed_clean(session))

        # 5. CoW break on merged pages, with two baselines
        phase("CoW break")
        session.prepare_stepping(use_zero_pages, tun.stable_node_chains_prune_millisecs)
        for _ in range(2):  # run=2 kept VM_MERGEABLE; two scans merge again
            session.timed_scan(npages, f"bench cow {content} {size_mib} MiB")
        merged = region.state(frames).merged
        cow = region.timed_write(0x2D)
        rewrite = region.timed_write(0x2E)
        region.agent.call("mmap", "fresh", npages, False, timeout=region.budget)
        first_touch = region.timed_write(0x01, "fresh")
        record("cow", content, size_mib, use_zero_pages, repeat, {
            "seconds": (cow, "s"),
            "merged_pages": (merged, "pages"),
            "us_per_page": (cow / npages * 1e6, "us"),
            "rewrite_us_per_page": (rewrite / npages * 1e6, "us"),
            "first_touch_us_per_page": (first_touch / npages * 1e6, "us"),
        })
    finally:
        region.close()
        session.clean()  # nothing of this cycle stays merged


def _timed_clean(session: BenchSession) -> float:
    import time

    t0 = time.perf_counter()
    session.clean()
    return time.perf_counter() - t0


def plan(sizes: tuple[int, ...], repeats: int,
         cases: tuple[tuple[str, int], ...] = CASES) -> list[tuple[int, str, int, int]]:
    """(repeat, content, use_zero_pages, size) in run order: repeats outermost,
    so slow drift of the machine spreads over every case instead of biasing one."""
    return [(r, content, uzp, size) for r in range(repeats) for content, uzp in cases
            for size in sizes]


def cycle_bytes(size_mib: int) -> int:
    """Peak memory a cycle maps (region + fresh baseline region)."""
    return 2 * size_mib * (1 << 20)
