"""Predicting what KSM will save for process images, with the emulator.

The snapshot (:mod:`.snapshot`) gives, per process, its candidate pages in
address order with a digest and a frame number each.  They become the
emulator's state (:mod:`ksmbench.emulator.machine`): one mm per process, in
the order given (ksmd's mm list order: the order in which the processes
registered), one segment per VMA holding its candidate pages, one frame per
distinct physical frame (pages shared by fork map one frame), and one
content id per distinct digest (the zero page is content 0).  The emulator
then runs full scans, exactly as it does for scenarios, with the profile of
the running kernel and the chosen tunables.

What the prediction assumes: the pages do not change from the snapshot on
(what changes is measured as churn, not modelled), and ksmd starts from
nothing (no rmap item, no KSM page: run=2 or a fresh boot).  A segment holds
only the present candidate pages: ksmd skips holes, swap entries and zero
PTEs without any effect on the counters.

Transparent huge pages (modelled here for snapshots, whose huge pages come
from the snapshot's KPF_THP; scenario THP regions are modelled in the
emulator's machine, docs/emulator.md "THP regions"): ksmd merges
4 KiB pages, so try_to_merge_one_page() first splits a THP it tries to merge
a subpage of.  Since b1f202060afe (6.12) the split maps every zero-filled
subpage to the shared zero page with a *clean* PTE: memory is saved (RSS,
PSS, AnonPages drop) but no counter shows it, it is not a KSM zero page
(measured here: 16 MiB of zeros in THPs gave ksm_zero_pages only for the
pages outside THPs).  ksmd tries to merge a page in the first scan in which
its checksum is unchanged (scan 2 for a static page) if its content is zero
(use_zero_pages=1) or occurs more than once (a stable or unstable tree hit);
zero-filled subpages come after the trigger in address order or are it, so
the whole effect is applied before scan 2: the zero-filled subpages of every
THP with a triggering subpage become clean zero PTEs.

Wall time to converge at ``pages_to_scan`` / ``sleep_millisecs``: ksmd takes
``pages_to_scan`` rmap items per batch and then sleeps ``sleep_millisecs``;
a batch ends early when a full scan completes, and items that smart_scan
skips do not count against the batch (ksm_do_scan(), 6.7).  So a full scan
takes ceil(visits / pages_to_scan) batches, each followed by a sleep, plus
ksmd's CPU time, estimated per visited page, per unstable-tree page and per
merged page with costs fitted on the reference machine (``CPU_PER_*``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..emulator.content import ZERO
from ..emulator.machine import PAGE_SIZE, Ksm, Segment, Settings
from ..emulator.profiles import get_profile, profile_for_release
from ..emulator.scan import full_scan
from .snapshot import ProcessImage, is_zero

#: ksmd CPU time per page it visits (checksum), per page it puts into or
#: looks up in the unstable tree (memcmp() down the tree), and per page it
#: merges (write-protect, replace_page(), TLB flush): least squares over the
#: 12 stepped scans of the three reference workloads on the reference 2-core
#: host (6.18; results/reference/workloads), where it predicts each scan's
#: ksmd CPU to within about 0.06 s.  An estimate: the measurement reports
#: ksmd's real CPU beside it.
CPU_PER_VISIT = 0.53e-6
CPU_PER_UNSTABLE = 7.2e-6
CPU_PER_MERGE = 3.6e-6
#: the counters whose stillness defines convergence
SAVINGS_COUNTERS = ("pages_shared", "pages_sharing", "ksm_zero_pages", "general_profit")


@dataclass(frozen=True)
class Tunables:
    use_zero_pages: bool = False
    max_page_sharing: int = 256
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    smart_scan: bool = True

    @classmethod
    def from_host(cls, sysfs, **overrides) -> "Tunables":
        """The host's current values, overridden where the user chose."""
        def val(name, default):
            text = sysfs.tunable(name)
            return default if text is None else int(text)

        current = dict(use_zero_pages=bool(val("use_zero_pages", 0)),
                       max_page_sharing=val("max_page_sharing", 256),
                       pages_to_scan=val("pages_to_scan", 100),
                       sleep_millisecs=val("sleep_millisecs", 20),
                       smart_scan=bool(val("smart_scan", 1)))
        current.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**current)

    def to_dict(self) -> dict:
        return {"use_zero_pages": int(self.use_zero_pages), "max_page_sharing": self.max_page_sharing,
                "pages_to_scan": self.pages_to_scan, "sleep_millisecs": self.sleep_millisecs,
                "smart_scan": int(self.smart_scan)}


@dataclass
class ScanPrediction:
    scan: int
    globals: dict[str, int | None]
    procs: dict[int, dict[str, int | None]]
    visits: int          # rmap items handed to cmp_and_merge_page (not skipped)
    merges: int          # pages newly saved in this scan
    seconds: float       # estimated wall time of this full scan at the tunables
    cpu_seconds: float   # estimated ksmd CPU time of this full scan
    thp_split_zero_pages: int = 0  # zero PTEs a THP split left (not counted by KSM)

    def saved_pages(self) -> int:
        g = self.globals
        return (g.get("pages_sharing") or 0) + (g.get("ksm_zero_pages") or 0)


@dataclass
class Prediction:
    profile: str
    tunables: Tunables
    pids: list[int]
    pages: int
    distinct_contents: int
    zero_content_pages: int
    shared_frames: int
    thp_pages: int = 0
    #: zero-filled THP subpages that a split maps to the zero page (clean PTE)
    thp_split_zero_pages: int = 0
    scans: list[ScanPrediction] = field(default_factory=list)
    converged_scan: int | None = None
    build_seconds: float = 0.0
    scan_seconds: float = 0.0

    def at(self, scan: int) -> ScanPrediction:
        return self.scans[scan - 1]

    @property
    def final(self) -> ScanPrediction:
        return self.at(self.converged_scan or len(self.scans))

    def seconds_to_converge(self) -> float:
        last = self.converged_scan or len(self.scans)
        return sum(s.seconds for s in self.scans[:last])

    def summary(self) -> dict:
        f = self.final
        return {"profile": self.profile, "tunables": self.tunables.to_dict(), "pids": self.pids,
                "candidate_pages": self.pages, "distinct_contents": self.distinct_contents,
                "zero_content_pages": self.zero_content_pages,
                "frames_mapped_more_than_once": self.shared_frames,
                "thp_pages": self.thp_pages,
                "thp_split_zero_pages": self.thp_split_zero_pages,
                "converged_scan": self.converged_scan,
                "seconds_to_converge_estimate": self.seconds_to_converge(),
                "final": {**f.globals, "saved_pages": f.saved_pages(),
                          "saved_bytes": f.saved_pages() * PAGE_SIZE},
                "final_per_process": {str(p): v for p, v in f.procs.items()},
                "emulator_build_seconds": self.build_seconds,
                "emulator_scan_seconds": self.scan_seconds}


def profile_name(requested: str = "auto", release: str | None = None) -> str:
    if requested and requested != "auto":
        get_profile(requested)
        return requested
    name = profile_for_release(release or os.uname().release)
    return name or "linux-6.18"


class Predictor:
    """The emulator loaded with process images; scans on demand."""

    def __init__(self, images: Sequence[ProcessImage], tunables: Tunables, profile: str):
        import time

        t0 = time.perf_counter()
        self.images = list(images)
        self.tunables = tunables
        self.profile = get_profile(profile)
        self.ksm = Ksm(self.profile, Settings(use_zero_pages=tunables.use_zero_pages,
                                              max_page_sharing=tunables.max_page_sharing,
                                              smart_scan=tunables.smart_scan))
        self.mms: dict[int, object] = {}
        self._split: list[tuple[Segment, np.ndarray]] = []
        stats = self._load()
        self.prediction = Prediction(profile, tunables, [im.pid for im in self.images], *stats)
        self.prediction.thp_pages = sum(int(np.count_nonzero(a.thp)) for im in self.images
                                        for a in im.areas if a.thp.size)
        self.prediction.thp_split_zero_pages = sum(int(i.size) for _s, i in self._split)
        self.prediction.build_seconds = time.perf_counter() - t0

    def _load(self) -> tuple[int, int, int, int]:
        k = self.ksm
        areas = [a for im in self.images for a in im.areas]
        if areas:
            digests = np.concatenate([a.digests for a in areas])
            pfns = np.concatenate([a.pfns for a in areas])
        else:
            digests = np.zeros((0, 2), dtype=np.uint64)
            pfns = np.zeros(0, dtype=np.int64)
        n = digests.shape[0]
        # content ids: one per distinct digest, 0 for the zero page
        zero = is_zero(digests)
        content = self._content_ids(digests) if n else np.zeros(0, dtype=np.int64)
        content[zero] = ZERO
        # frames: one per physical frame when frame numbers are known (root)
        fr = k.frames
        shared = 0
        if n and (pfns > 0).all():
            # a page KSM has merged already is a copy of its own again: the
            # prediction starts from nothing merged (as after run=2)
            ksm = np.concatenate([a.ksm if a.ksm.size == a.pages else np.zeros(a.pages, dtype=bool)
                                  for a in areas])
            if ksm.any():
                pfns = pfns.copy()
                pfns[ksm] = -1 - np.arange(int(np.count_nonzero(ksm)), dtype=np.int64)
            upfn, first, counts = np.unique(pfns, return_index=True, return_counts=True)
            frames_u = fr.alloc(content[first])
            fr.mapcount[frames_u] = counts
            frame_of = frames_u[np.searchsorted(upfn, pfns)]
            shared = int(np.count_nonzero(counts > 1))
        else:
            frame_of = fr.alloc(content) if n else np.zeros(0, dtype=np.int64)
        split = self._thp_split_pages(areas, content, pfns)
        pos = 0
        for im in self.images:
            mm = k.spawn(str(im.pid))
            self.mms[im.pid] = mm
            # PR_SET_MEMORY_MERGE sets MMF_VM_MERGE_ANY; either way the mm
            # registers with ksmd (__ksm_enter) at the list tail
            mm.merge_any = im.scope == "merge-any"
            k._ksm_enter(mm)
            for a in im.areas:
                seg = Segment(mm, f"{a.start:x}", a.start // PAGE_SIZE, a.pages, False)
                seg.pte[:] = frame_of[pos:pos + a.pages]
                seg.merge[:] = True
                seg.anon[:] = True  # it has anonymous pages, so it has an anon_vma
                idx = np.flatnonzero(split[pos:pos + a.pages])
                if idx.size:
                    self._split.append((seg, idx))
                pos += a.pages
                mm.segments.append(seg)
                mm.regions[seg.name] = seg
        distinct = int(np.unique(content).size) if n else 0
        return n, distinct, int(np.count_nonzero(zero)), shared

    def _content_ids(self, digests: np.ndarray) -> np.ndarray:
        """One id per distinct 128-bit digest.  Sorting 64-bit halves is several
        times faster than sorting 128-bit records; the other half is then
        checked within each group, and a (2^-64-rare) disagreement falls back
        to the full sort."""
        hi = np.ascontiguousarray(digests[:, 0])
        lo = np.ascontiguousarray(digests[:, 1])
        uniq, first, inverse = np.unique(hi, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        if (lo[first[inverse]] == lo).all():
            return self.ksm.contents.add_keys(uniq, lo[first])[inverse]
        keyed = np.ascontiguousarray(digests).view([("hi", "<u8"), ("lo", "<u8")]).ravel()
        uniq2, inverse2 = np.unique(keyed, return_inverse=True)
        return self.ksm.contents.add_keys(uniq2["hi"], uniq2["lo"])[inverse2.ravel()]

    def _thp_split_pages(self, areas, content: np.ndarray, pfns: np.ndarray) -> np.ndarray:
        """Which pages a THP split will map to the zero page (see the module doc)."""
        n = content.size
        out = np.zeros(n, dtype=bool)
        # b1f202060afe (6.12): the profile flag thp_split_zero_remap
        if n == 0 or not self.profile.has("thp_split_zero_remap"):
            return out
        thp = np.concatenate([a.thp if a.thp.size == a.pages else np.zeros(a.pages, dtype=bool)
                              for a in areas])
        if not thp.any():
            return out
        counts = np.bincount(content)
        zero = content == ZERO
        trigger = counts[content] >= 2
        if self.tunables.use_zero_pages:
            trigger |= zero
        # a PMD-mapped THP is 512 frames aligned to 512 (x86-64, 4 KiB pages)
        folio = np.where(thp, pfns >> 9, -1)
        hit = np.unique(folio[thp & trigger])
        out = thp & zero & np.isin(folio, hit)
        return out

    def _apply_thp_split(self) -> None:
        fr = self.ksm.frames
        for seg, idx in self._split:
            fr.unmap(seg.pte[idx])
            seg.pte[idx] = 0          # the shared zero page, clean: not a KSM zero page
            seg.zdirty[idx] = False

    def _candidates(self) -> int:
        total = 0
        for mm in self.ksm.slots:
            for seg in mm.segments:
                if seg.mapped:
                    total += int(np.count_nonzero(seg.merge & (seg.pte > 0)))
        return total

    def scan(self) -> ScanPrediction:
        import time

        k = self.ksm
        t = self.tunables
        before = self.prediction.scans[-1].saved_pages() if self.prediction.scans else 0
        if len(self.prediction.scans) == 1:
            self._apply_thp_split()
        candidates = self._candidates()
        skipped0 = k.pages_skipped
        t0 = time.perf_counter()
        full_scan(k)
        self.prediction.scan_seconds += time.perf_counter() - t0
        visits = candidates - (k.pages_skipped - skipped0)
        g = k.global_values()
        procs = {pid: k.proc_values(mm) for pid, mm in self.mms.items()}
        saved = (g.get("pages_sharing") or 0) + (g.get("ksm_zero_pages") or 0)
        merges = max(0, saved - before)
        unstable = g.get("pages_unshared") or 0  # the unstable tree is rebuilt every scan
        cpu = visits * CPU_PER_VISIT + unstable * CPU_PER_UNSTABLE + merges * CPU_PER_MERGE
        batches = max(1, math.ceil(visits / max(1, t.pages_to_scan)))
        seconds = batches * t.sleep_millisecs / 1000.0 + cpu
        sp = ScanPrediction(len(self.prediction.scans) + 1, g, procs, visits, merges, seconds, cpu,
                            self.prediction.thp_split_zero_pages
                            if len(self.prediction.scans) >= 1 else 0)
        self.prediction.scans.append(sp)
        return sp

    def run(self, max_scans: int = 20, min_scans: int = 3) -> Prediction:
        """Scan until the savings counters stay still for a whole scan."""
        p = self.prediction
        while len(p.scans) < max_scans:
            self.scan()
            if len(p.scans) >= max(2, min_scans) and p.converged_scan is None:
                a, b = p.scans[-2].globals, p.scans[-1].globals
                if all(a.get(c) == b.get(c) for c in SAVINGS_COUNTERS):
                    p.converged_scan = len(p.scans) - 1
                    break
        return p

    def ensure(self, scans: int) -> None:
        while len(self.prediction.scans) < scans:
            self.scan()


def predict(images: Sequence[ProcessImage], tunables: Tunables, profile: str,
            max_scans: int = 20) -> Predictor:
    predictor = Predictor(images, tunables, profile)
    predictor.run(max_scans=max_scans)
    return predictor
