"""Hypothesis drives the model with random operation sequences and checks the
invariants the kernel guarantees (and that the fast scan path is the
reference path) after every operation."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ksmbench.emulator.machine import PAGE_SIZE, RMAP_ITEM_SIZE, Ksm, Settings
from ksmbench.emulator.profiles import get_profile
from ksmbench.emulator.scan import full_scan
from ksmbench.scenario.patterns import FillId, parse_pattern

PATTERNS = ("zero", "tag:a", "tag:b", "unique", "cycle:c:3")


class KsmMachine(RuleBasedStateMachine):
    """Two models fed the same operations: one scans with the numpy fast path,
    one with the per-page reference path; they must agree exactly."""

    @initialize(profile=st.sampled_from(["linux-6.18", "linux-6.6", "linux-6.1", "linux-6.11"]),
                use_zero=st.booleans(), max_sharing=st.sampled_from([2, 3, 5, 256]),
                smart=st.booleans())
    def setup(self, profile, use_zero, max_sharing, smart):
        cfg = Settings(use_zero_pages=use_zero, max_page_sharing=max_sharing, smart_scan=smart)
        self.profile = get_profile(profile)
        self.fast = Ksm(self.profile, cfg)
        self.slow = Ksm(self.profile, cfg)
        for k in (self.fast, self.slow):
            k.spawn("main")
        self.procs = {"main": {}}  # live process -> region -> pages
        self.nregions = 0
        self.nfills = 0
        self.nprocs = 1

    def both(self, method, *args):
        for k in (self.fast, self.slow):
            getattr(k, method)(*[k.mms[a] if i == 0 and isinstance(a, str) and a in k.mms else a
                                 for i, a in enumerate(args)])

    # -- operations ----------------------------------------------------------------
    @precondition(lambda self: self.procs)
    @rule(data=st.data(), pages=st.integers(1, 40))
    def mmap(self, data, pages):
        proc = data.draw(st.sampled_from(sorted(self.procs)))
        self.nregions += 1
        name = f"r{self.nregions}"
        self.both("mmap", proc, name, pages, False)
        self.procs[proc][name] = pages

    def _pick_region(self, data):
        proc = data.draw(st.sampled_from(sorted(p for p, r in self.procs.items() if r)))
        name = data.draw(st.sampled_from(sorted(self.procs[proc])))
        pages = self.procs[proc][name]
        first = data.draw(st.integers(0, pages - 1))
        end = data.draw(st.integers(first + 1, pages))
        return proc, name, first, end

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data(), pattern=st.sampled_from(PATTERNS))
    def fill(self, data, pattern):
        proc, name, first, end = self._pick_region(data)
        self.nfills += 1
        for k in (self.fast, self.slow):
            ids = k.contents.fill(parse_pattern(pattern), end - first, FillId("t", self.nfills))
            k.fill(k.mms[proc], name, first, end, ids)

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data())
    def read(self, data):
        proc, name, first, end = self._pick_region(data)
        self.both("read", proc, name, first, end)

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data(), advice=st.sampled_from(["mergeable", "mergeable", "unmergeable",
                                                   "dontneed"]))
    def madvise(self, data, advice):
        proc, name, first, end = self._pick_region(data)
        self.both("madvise", proc, name, first, end, advice)

    @precondition(lambda self: self.procs)
    @rule(data=st.data(), merge=st.booleans())
    def prctl(self, data, merge):
        if not self.profile.has("prctl_memory_merge"):
            return
        self.both("prctl", data.draw(st.sampled_from(sorted(self.procs))), merge)

    @rule(count=st.integers(1, 3))
    def scan(self, count):
        for _ in range(count):
            full_scan(self.fast, fast=True)
            full_scan(self.slow, fast=False)

    @rule()
    def unmerge_all(self):
        self.both("unmerge_all")

    @precondition(lambda self: self.procs and self.nprocs < 4)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.procs)))
        child = f"p{self.nprocs}"
        self.nprocs += 1
        self.both("fork", parent, child)
        self.procs[child] = dict(self.procs[parent])

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def exit(self, data):
        proc = data.draw(st.sampled_from(sorted(self.procs)))
        self.both("exit", proc)
        del self.procs[proc]

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data())
    def munmap(self, data):
        proc, name, _, _ = self._pick_region(data)
        self.both("munmap", proc, name)
        del self.procs[proc][name]

    # -- invariants ------------------------------------------------------------------
    def values(self, k: Ksm):
        out = dict(k.global_values())
        out.update({(mm.name, f): v for mm in k.mms.values() if mm.alive
                    for f, v in k.proc_values(mm).items()})
        out.update({(mm.name, r, f): v for mm in k.mms.values() if mm.alive
                    for r, seg in mm.regions.items() for f, v in k.region_values(seg).items()})
        return out

    @invariant()
    def fast_equals_reference(self):
        if not hasattr(self, "fast"):
            return
        assert self.values(self.fast) == self.values(self.slow)

    @invariant()
    def kernel_invariants(self):
        if not hasattr(self, "fast"):
            return
        k = self.fast
        k.check()
        g = k.global_values()
        # pages_volatile = rmap_items - shared - sharing - unshared, never negative here
        raw = k.rmap_items - k.pages_shared - k.pages_sharing - k.pages_unshared
        assert raw >= 0 and g["pages_volatile"] == raw
        if self.profile.has("ksm_profit"):
            zero = k.zero_pages if k.tracking else 0
            assert g["general_profit"] == ((k.pages_sharing + zero) * PAGE_SIZE
                                           - k.rmap_items * RMAP_ITEM_SIZE)
            for mm in k.mms.values():
                if mm.alive:
                    pv = k.proc_values(mm)
                    mz = mm.zero_pages if k.tracking else 0
                    assert pv["ksm_process_profit"] == ((mm.merging_pages + mz) * PAGE_SIZE
                                                        - mm.rmap_items * RMAP_ITEM_SIZE)
        if self.profile.has("fork_counter_fix") or self.nprocs == 1:
            # with honest fork accounting (4d6fc29f3634) the per-mm counters add up
            mms = list(k.mms.values())
            assert sum(mm.rmap_items for mm in mms) == k.rmap_items
            assert sum(mm.merging_pages for mm in mms) == k.pages_shared + k.pages_sharing
            if k.tracking:
                assert sum(mm.zero_pages for mm in mms if mm.alive) == k.zero_pages
                assert k.zero_pages == sum(int(np.count_nonzero(seg.zdirty))
                                           for mm in mms for seg in mm.regions.values())
            if self.profile.has("ksm_profit"):
                # sum of process profits = general_profit + pages_shared pages (notes 1.4)
                total = sum(((mm.merging_pages + (mm.zero_pages if k.tracking else 0)) * PAGE_SIZE
                             - mm.rmap_items * RMAP_ITEM_SIZE) for mm in mms)
                assert total == g["general_profit"] + k.pages_shared * PAGE_SIZE

    @invariant()
    def frames_are_mapped_by_their_ptes(self):
        if not hasattr(self, "fast"):
            return
        k = self.fast
        counts = np.zeros(k.frames.n, dtype=np.int64)
        for mm in k.mms.values():
            for seg in mm.regions.values():
                f = seg.pte[seg.pte > 0]
                np.add.at(counts, f, 1)
                r = k.region_values(seg)
                assert r["ksm"] <= r["present"] - r["zero_pfn"]
                assert r["distinct_frames"] <= r["present"] - r["zero_pfn"]
        assert (counts[1:] == k.frames.mapcount[1:k.frames.n]).all()


# KSMBENCH_STATEFUL_EXAMPLES raises the number of random sequences (default 60)
KsmMachine.TestCase.settings = settings(max_examples=int(os.environ.get("KSMBENCH_STATEFUL_EXAMPLES",
                                                                        "60")),
                                        stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
TestKsmModel = KsmMachine.TestCase
