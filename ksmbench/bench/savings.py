"""Memory savings three ways, reconciled, and what unmerging would cost.

The workload: ``K`` processes (the host backend's agents, one real process
each) hold a region of ``M`` pages laid out the same way:

* the first quarter written with zeros;
* the middle half ``cycle:common:<M/2>``: M/2 distinct pages, the same in
  every process (what similar VMs or containers share);
* the last quarter ``unique``: different in every page of every process.

After the region is MADV_MERGEABLE, ksmd is stepped scan by scan; after each
scan the same instant is seen three ways:

* **KSM counters**: ``(pages_sharing + ksm_zero_pages) * PAGE_SIZE``, the
  saving as ksm.rst defines it (6.6, e2942062e01d), and ``general_profit``
  (6.4; since 6.6 it counts KSM zero pages, 1a8e84305783), which subtracts
  64 bytes per rmap item;
* **processes** (psutil): sums of RSS, USS and PSS over the K processes;
* **system** (/proc/meminfo): AnonPages, MemAvailable, SUnreclaim.

The KSM counters are counted from a baseline read once KSM is clean for the
run and before any workload process exists (:func:`~ksmbench.observation.from_baseline`):
a kernel may keep counting KSM zero pages nobody maps any more (on 6.18.44, those
left in a MADV_DONTFORK or MADV_WIPEONFORK region across fork, until reboot),
and those are not this workload's saving.  Each repeat records the baseline
(``counters_baseline``).

Each view moves by a different amount, for reasons that follow from how the
kernel accounts pages; :func:`reconcile` states each reason as an expected
change computed from the counters and pagemap, and shows what was measured
beside it.  Finally run=2 is written and the memory it takes back is measured:
the number sysadmins asked for when the series was reviewed ("how much memory
would I need if I unmerged everything?"); since 6.6 the counters predict it
as ``pages_sharing + ksm_zero_pages``, before 6.6 run=2 left KSM zero pages in
place (the series' first patch, 79271476b336, made it unshare them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..backends.host import AgentHandle
from ..kernel.procfs import FrameReader, ProcFS
from ..kernel.syscalls import PAGE_SIZE
from ..observation import absolute_levels, from_baseline
from .probes import classify_frames, process_memory, read_meminfo, read_pcp_pages
from .outcome import MachineDrift, SavingsResult, SavingsView, SavingsWorkload, UnmergeCost
from .session import BenchSession

MIB = 1 << 20
RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on 64-bit (ksm.rst)
SCANS = 4


@dataclass(frozen=True)
class Workload:
    processes: int = 4
    mib_per_process: int = 64

    @property
    def pages(self) -> int:
        return self.mib_per_process * MIB // PAGE_SIZE

    def layout(self) -> list[tuple[int, int, str]]:
        m = self.pages
        q = m // 4
        return [(0, q, "zero"), (q, m - q, f"cycle:common:{m - 2 * q}"), (m - q, m, "unique")]

    def expected(self, use_zero_pages: int, max_page_sharing: int = 256) -> dict[str, int]:
        """Counters the layout must produce once everything is merged."""
        m, k = self.pages, self.processes
        q = m // 4
        common = m - 2 * q
        shared = common
        sharing = (k - 1) * common if k >= 2 else 0
        if k < 2:
            shared = 0
        zero_pages = 0
        n0 = k * q
        if use_zero_pages:
            zero_pages = n0
        else:
            s0, h0 = _dup_merge(n0, max_page_sharing)
            shared += s0
            sharing += h0
        return {"pages_shared": shared, "pages_sharing": sharing, "ksm_zero_pages": zero_pages,
                "pages_unshared": k * q, "saved_pages": sharing + zero_pages}


def _dup_merge(n: int, mps: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) for n identical pages (docs/emulator.md,
    "Rules of thumb"; the formula ksm_tests asserts)."""
    if n < 2:
        return 0, 0
    if n % mps in (0, 1):
        shared = n // mps
        return shared, shared * (mps - 1)
    shared = n // mps + 1
    return shared, n - shared


@dataclass
class Snapshot:
    """One instant seen the three ways."""

    seconds: float
    counters: dict
    rmap_items: int
    rss: int
    uss: int
    pss: int
    anon_kb: int
    available_kb: int
    sunreclaim_kb: int
    free_kb: int
    pcp_pages: int
    zero_pfn: int           # workload mappings of the zero page (pagemap)
    ksm_frames_mapped: int  # workload mappings of KSM pages (pagemap + kpageflags)
    ksm_frames: int         # distinct KSM pages among them
    per_process: dict = field(default_factory=dict)
    #: the absolute global counters (sysfs names) before the workload started;
    #: ``counters`` are read as they are, :attr:`counted` from here
    baseline: dict = field(default_factory=dict)

    @property
    def counted(self) -> dict:
        """The KSM counters counted from the run's baseline: this workload's own."""
        return from_baseline(self.counters, self.baseline)

    @property
    def sharing(self) -> int:
        """The workload's own pages_sharing: mappings of KSM pages beyond the first."""
        return self.ksm_frames_mapped - self.ksm_frames

    def saved_counter_bytes(self) -> int:
        c = self.counted
        return ((c.get("pages_sharing") or 0) + (c.get("ksm_zero_pages") or 0)) * PAGE_SIZE


class SavingsRun:
    """Runs the workload once for one use_zero_pages value on a BenchSession."""

    def __init__(self, session: BenchSession, workload: Workload, use_zero_pages: int,
                 progress: Callable[[str], None] = lambda _m: None):
        self.session = session
        self.workload = workload
        self.uzp = use_zero_pages
        self.progress = progress
        self.agents: list[AgentHandle] = []
        self.addresses: dict[str, int] = {}
        self.t0 = time.monotonic()
        self._reader = FrameReader(ProcFS(), "self")
        self.zero_pfn = self._reader.discover_zero_pfn()
        #: read in :meth:`run` once KSM is clean, before any agent exists
        self.baseline: dict = {}

    def snapshot(self) -> Snapshot:
        counters = self.session.counters()
        rss = uss = pss = rmap = 0
        per = {}
        frames = []
        for agent in self.agents:
            mem = process_memory(agent.pid)
            seen = agent.call("observe", timeout=120)
            stat = seen["ksm_stat"]
            rss, uss, pss = rss + mem.rss, uss + mem.uss, pss + mem.pss
            rmap += stat.get("ksm_rmap_items") or 0
            frames.append(self._frames(agent))
            per[agent.name] = {"rss": mem.rss, "uss": mem.uss, "pss": mem.pss,
                               "rss_anon_pages": seen["rss_anon_pages"], **stat}
        zero, mapped, distinct = self._classify(frames)
        info = read_meminfo()
        pcp = read_pcp_pages()
        return Snapshot(time.monotonic() - self.t0, counters, rmap, rss, uss, pss,
                        info.get("AnonPages", 0), info.get("MemAvailable", 0),
                        info.get("SUnreclaim", 0), info.get("MemFree", 0), pcp,
                        zero, mapped, distinct, per, dict(self.baseline))

    def _frames(self, agent: AgentHandle) -> np.ndarray:
        """Frame of every page of the agent's region, read from its pagemap here
        (root reads any process's frame numbers)."""
        with FrameReader(ProcFS(), agent.pid) as reader:
            return reader.frames(self.addresses[agent.name], self.workload.pages)

    def _classify(self, frames: list[np.ndarray]) -> tuple[int, int, int]:
        """(zero-page mappings, KSM-page mappings, distinct KSM pages) of the
        whole workload: the truth the counters are compared with, independent
        of anything else registered with KSM."""
        allf = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int64)
        return classify_frames(self._reader, allf, self.zero_pfn)

    def run(self) -> tuple[list[tuple[str, int | None, Snapshot]], dict[str, Any]]:
        """Returns the time series [(point, scan, snapshot)] and the reconciliation."""
        s = self.session
        w = self.workload
        s.clean()
        s.set_use_zero_pages(self.uzp)
        s.stepper.prepare()
        self.baseline = absolute_levels(s.counters())
        series: list[tuple[str, int | None, Snapshot]] = []
        try:
            self.progress(f"starting {w.processes} processes")
            for i in range(w.processes):
                name = f"p{i}"
                agent = AgentHandle.spawn(name)
                s.host.agents[f"__bench_{name}"] = agent  # killed by the session on any exit
                self.agents.append(agent)
                self.addresses[name] = agent.call("mmap", "r", w.pages, False, timeout=120)
                for first, end, pattern in w.layout():
                    agent.call("fill", "r", first, end, pattern, f"bench-savings-{self.uzp}", i,
                               timeout=300)
            # two snapshots before anything merges: their difference is the
            # machine's own drift over a scan's time (other processes allocate too)
            before0 = self.snapshot()
            time.sleep(0.5)
            before = self.snapshot()
            series += [("before0", None, before0), ("before", None, before)]
            for agent in self.agents:
                agent.call("madvise", "r", 0, w.pages, "mergeable", timeout=120)
            for scan in range(1, SCANS + 1):
                self.progress(f"scan {scan}/{SCANS}")
                s.stepper.scan(pages_hint=w.pages * w.processes, label=f"savings scan {scan}")
                series.append(("scan", scan, self.snapshot()))
            after = series[-1][2]
            self.progress("unmerging everything (run=2)")
            t0 = time.perf_counter()
            s.clean()
            run2_seconds = time.perf_counter() - t0
            unmerged = self.snapshot()
            series.append(("after_run2", None, unmerged))
        finally:
            for agent in self.agents:
                agent.kill()
            for key in [k for k in s.host.agents if k.startswith("__bench_")]:
                del s.host.agents[key]
            self.agents = []
            self._reader.close()
        expected = w.expected(self.uzp, int(s.sysfs.tunable("max_page_sharing") or 256))
        return series, reconcile(before0, before, after, unmerged, run2_seconds, expected, self.uzp)


def reconcile(before0: Snapshot, before: Snapshot, after: Snapshot, unmerged: Snapshot,
              run2_seconds: float, expected: dict[str, int], use_zero_pages: int) -> dict[str, Any]:
    """Bytes saved in each view, the amount each view *should* move by (and
    why), and the unmerge cost.

    "Should" is computed from the workload's own page tables (pagemap +
    kpageflags of every process): ``sharing`` = mappings of KSM pages minus
    distinct KSM pages, ``zero`` = mappings of the zero page (the workload
    wrote every page, so each one was placed by KSM).  That truth does not
    depend on the KSM counters, so the counters are checked against it too.
    """
    c = after.counted
    sharing = after.sharing
    zero = after.zero_pfn
    freed = (sharing + zero) * PAGE_SIZE
    zero_counter = c.get("ksm_zero_pages")  # None before 6.6
    rmap_bytes = after.rmap_items * RMAP_ITEM_BYTES
    drift_anon = (before.anon_kb - before0.anon_kb) * 1024
    drift_avail = (before.available_kb - before0.available_kb) * 1024
    drift_free = ((before.free_kb - before0.free_kb) * 1024
                  + (before.pcp_pages - before0.pcp_pages) * PAGE_SIZE)
    saved_counters = ((c.get("pages_sharing") or 0) + (zero_counter or 0)) * PAGE_SIZE

    def view(name, measured, expected_bytes, why):
        """``measured`` None: this kernel lacks the counter (never shown as 0)."""
        residual = None if expected_bytes is None or measured is None else measured - expected_bytes
        return {"view": name, "saved_bytes": measured, "expected_bytes": expected_bytes,
                "residual_bytes": residual, "explanation": why}

    views = [
        view("KSM counters: (pages_sharing + ksm_zero_pages) x 4 KiB", saved_counters, freed,
             "ksm.rst (6.6): 'pages_sharing + ksm_zero_pages represents the actual number of "
             "pages saved by KSM'; expected: the workload's page tables"
             + (". This kernel has no ksm_zero_pages counter (added in 6.6, e2942062e01d): the "
                "KSM zero pages are saved but no counter shows them" if zero_counter is None else "")),
        view("KSM general_profit", c.get("general_profit"),
             (sharing + (zero if zero_counter is not None else 0)) * PAGE_SIZE - rmap_bytes,
             "general_profit = (pages_sharing + ksm_zero_pages) x 4 KiB - rmap_items x 64 B "
             "(6.4 d21077fbc2fc; KSM zero pages counted since 6.6, 1a8e84305783): KSM's own cost, "
             "one rmap item per page it still tracks, is subtracted"
             + (". This kernel has no general_profit (added in 6.4)"
                if c.get("general_profit") is None else "")),
        view("processes: sum of RSS", before.rss - after.rss, zero * PAGE_SIZE,
             "RSS counts a KSM page in every process that maps it, so merging duplicates does "
             "not lower it; only KSM zero pages leave it (replace_page() does "
             "dec_mm_counter(MM_ANONPAGES)). Expected: zero pages x 4 KiB"),
        view("processes: sum of USS", before.uss - after.uss,
             (after.ksm_frames_mapped + zero) * PAGE_SIZE,
             "USS counts only pages mapped once; every mapping of a KSM page is shared "
             "(mapcount >= 2), so USS drops by all merged mappings, including one per KSM page "
             "that still exists: it overstates the saving by pages_shared"),
        view("processes: sum of PSS", before.pss - after.pss, freed,
             "PSS splits a shared page among its mappers, so the sum over the processes counts "
             "each KSM page once: it drops by pages_sharing, and by the KSM zero pages, which "
             "smaps does not count at all (a special PTE: vm_normal_page() is NULL)"),
        view("system: /proc/meminfo AnonPages", (before.anon_kb - after.anon_kb) * 1024, freed,
             "AnonPages counts each mapped anonymous page once however many map it, so it "
             "drops by the pages freed: pages_sharing + KSM zero pages. Everything else on the "
             "machine moves it too (see the drift measured before merging)"),
        view("system: /proc/meminfo MemAvailable", (after.available_kb - before.available_kb) * 1024,
             freed - rmap_bytes,
             "MemAvailable should gain the freed pages minus KSM's own slab (rmap items, 64 B "
             "each, and stable nodes), but a freed page first goes to a per-CPU free list, which "
             "MemFree and MemAvailable do not count (see the next row); it also moves with "
             "everything else on the machine"),
        view("system: MemFree + per-CPU free lists (/proc/zoneinfo)",
             ((after.free_kb - before.free_kb) * 1024
              + (after.pcp_pages - before.pcp_pages) * PAGE_SIZE),
             freed - rmap_bytes,
             "every freed page is either in the buddy allocator (MemFree) or on a per-CPU list "
             "(zoneinfo 'count:'); together they gain the freed pages minus the slab KSM "
             f"allocated for its rmap items ({rmap_bytes / MIB:.1f} MiB) and stable nodes"),
    ]
    # what run=2 took back: every KSM page mapping and, since 6.6 (79271476b336),
    # every KSM zero page becomes a private page again
    predicted = ((c.get("pages_sharing") or 0) + (zero_counter or 0)) * PAGE_SIZE
    unmerge = {
        "run2_seconds": run2_seconds,
        "predicted_bytes_by_counters": predicted,
        "page_tables_bytes": ((after.sharing - unmerged.sharing)
                              + (after.zero_pfn - unmerged.zero_pfn)) * PAGE_SIZE,
        "measured_anon_bytes": (unmerged.anon_kb - after.anon_kb) * 1024,
        "measured_pss_bytes": unmerged.pss - after.pss,
        "measured_available_bytes": (after.available_kb - unmerged.available_kb) * 1024,
        "measured_free_and_pcp_bytes": ((after.free_kb - unmerged.free_kb) * 1024
                                        + (after.pcp_pages - unmerged.pcp_pages) * PAGE_SIZE),
        "zero_pages_left_after_run2": unmerged.zero_pfn,
        "ksm_pages_left_after_run2": unmerged.ksm_frames,
        "explanation": ("run=2 unshares every KSM page (the pages_sharing copies come back) and, "
                        "since 6.6 (79271476b336), every KSM zero page; before 6.6 KSM zero pages "
                        "stayed mapped, so run=2 needed back pages_sharing only, and no counter "
                        "showed the zero pages"),
    }
    return {
        "use_zero_pages": use_zero_pages,
        "expected_counters": expected,
        "workload_page_tables": {"ksm_pages": after.ksm_frames, "ksm_mappings": after.ksm_frames_mapped,
                                 "sharing": sharing, "zero_pages": zero},
        "counters": {k: c.get(k) for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                           "pages_volatile", "ksm_zero_pages", "general_profit")},
        # read once KSM was clean, before the workload: "counters" count from it
        "counters_baseline": dict(after.baseline),
        "rmap_items": after.rmap_items,
        "rmap_bytes": rmap_bytes,
        "slab_unreclaimable_delta_bytes": (after.sunreclaim_kb - before.sunreclaim_kb) * 1024,
        "drift_anon_bytes": drift_anon,
        "drift_available_bytes": drift_avail,
        "drift_free_and_pcp_bytes": drift_free,
        "views": views,
        "unmerge": unmerge,
        "before": _brief(before),
        "after": _brief(after),
        "after_run2": _brief(unmerged),
    }


def _brief(s: Snapshot) -> dict[str, Any]:
    return {"rss": s.rss, "uss": s.uss, "pss": s.pss, "anon_bytes": s.anon_kb * 1024,
            "free_bytes": s.free_kb * 1024, "pcp_bytes": s.pcp_pages * PAGE_SIZE,
            "available_bytes": s.available_kb * 1024, "rmap_items": s.rmap_items,
            "zero_pfn": s.zero_pfn, "ksm_mappings": s.ksm_frames_mapped, "ksm_pages": s.ksm_frames,
            "counters": s.counted, "per_process": s.per_process}


def series_rows(kernel: str, uzp: int, repeat: int, series) -> list[tuple]:
    """savings.csv rows: (kernel, use_zero_pages, repeat, point, scan, seconds, metric, value)."""
    rows = []
    for point, scan, snap in series:
        c = snap.counted
        values = {
            "counters.saved_bytes": snap.saved_counter_bytes(),
            "counters.general_profit": c.get("general_profit"),
            "counters.pages_shared": c.get("pages_shared"),
            "counters.pages_sharing": c.get("pages_sharing"),
            "counters.ksm_zero_pages": c.get("ksm_zero_pages"),
            "counters.rmap_items": snap.rmap_items,
            "processes.rss_bytes": snap.rss,
            "processes.uss_bytes": snap.uss,
            "processes.pss_bytes": snap.pss,
            "system.anon_bytes": snap.anon_kb * 1024,
            "system.available_bytes": snap.available_kb * 1024,
            "system.sunreclaim_bytes": snap.sunreclaim_kb * 1024,
            "system.free_bytes": snap.free_kb * 1024,
            "system.free_and_pcp_bytes": snap.free_kb * 1024 + snap.pcp_pages * PAGE_SIZE,
            "pagemap.zero_pfn": snap.zero_pfn,
            "pagemap.ksm_mappings": snap.ksm_frames_mapped,
            "pagemap.ksm_pages": snap.ksm_frames,
            "pagemap.saved_bytes": (snap.sharing + snap.zero_pfn) * PAGE_SIZE,
        }
        for metric, value in values.items():
            rows.append((kernel, uzp, repeat, point, scan, round(snap.seconds, 4), metric, value))
    return rows


def combine(recs: list[dict[str, Any]], workload: Workload) -> SavingsResult:
    """Several repeats of the workload as one reconciliation: every number is
    the median over the repeats; the residuals' range and every repeat are kept."""
    import statistics

    first = recs[-1]
    views = []
    for i, v in enumerate(first["views"]):
        col = [r["views"][i] for r in recs]
        residuals = [c["residual_bytes"] for c in col if c["residual_bytes"] is not None]
        views.append(SavingsView(
            view=v["view"], explanation=v["explanation"],
            saved_bytes=(statistics.median(c["saved_bytes"] for c in col)
                         if v["saved_bytes"] is not None else None),
            expected_bytes=statistics.median(c["expected_bytes"] for c in col)
            if v["expected_bytes"] is not None else None,
            residual_bytes=statistics.median(residuals) if residuals else None,
            residual_min_bytes=min(residuals) if residuals else None,
            residual_max_bytes=max(residuals) if residuals else None,
        ))
    unmerge = dict(first["unmerge"])
    for key in ("run2_seconds", "predicted_bytes_by_counters", "page_tables_bytes",
                "measured_anon_bytes", "measured_pss_bytes", "measured_available_bytes",
                "measured_free_and_pcp_bytes", "zero_pages_left_after_run2"):
        unmerge[key] = statistics.median(r["unmerge"][key] for r in recs)
    drift = {k: statistics.median(abs(r[k]) for r in recs)
             for k in ("drift_anon_bytes", "drift_available_bytes", "drift_free_and_pcp_bytes")}
    return SavingsResult(
        workload=SavingsWorkload(workload.processes, workload.mib_per_process,
                                 tuple(tuple(x) for x in workload.layout())),
        repeats_done=len(recs), use_zero_pages=first["use_zero_pages"],
        expected_counters=first["expected_counters"], views=tuple(views),
        unmerge=UnmergeCost(**unmerge), median_abs_drift=MachineDrift(**drift), repeats=tuple(recs))


#: short names of the views, for bench.csv metrics
VIEW_KEYS = ("counters", "general_profit", "rss", "uss", "pss", "anon_pages", "mem_available",
             "free_and_pcp")


def savings_metrics(rec: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """One repeat's views as bench.csv metrics (MiB saved, and the residual)."""
    out: dict[str, tuple[float, str]] = {}
    for key, v in zip(VIEW_KEYS, rec["views"]):
        if v["saved_bytes"] is None:
            continue  # a counter this kernel lacks
        out[f"{key}_saved_mib"] = (v["saved_bytes"] / MIB, "MiB")
        if v["residual_bytes"] is not None:
            out[f"{key}_residual_mib"] = (v["residual_bytes"] / MIB, "MiB")
    out["run2_seconds"] = (rec["unmerge"]["run2_seconds"], "s")
    out["run2_needs_back_mib"] = (rec["unmerge"]["measured_anon_bytes"] / MIB, "MiB")
    out["run2_predicted_mib"] = (rec["unmerge"]["predicted_bytes_by_counters"] / MIB, "MiB")
    return out
