"""Hypothesis drives the model with random operation sequences and checks the
invariants the kernel guarantees (and that the fast scan path is the
reference path) after every operation."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ksmbench.emulator.machine import PAGE_SIZE, Ksm, Settings
from ksmbench.emulator.profiles import get_profile
from ksmbench.emulator.scan import full_scan
from ksmbench.scenario.patterns import FillId, parse_pattern, write_byte_values

PATTERNS = ("zero", "tag:a", "tag:b", "unique", "cycle:c:3")


def check_kernel_invariants(k: Ksm, use_zero: bool, sizes: dict[str, dict[str, int]] | None,
                            forked: bool, kept_from_child: bool = False) -> None:
    """What the kernel guarantees between its exported counters, and between
    them and the regions mapped (``sizes``: process -> region -> pages); no
    formula of the model is recomputed here (the profits and pages_volatile are
    derived values: only their relations across processes are checked).
    ``kept_from_child``: a fork left out MADV_DONTFORK/WIPEONFORK pages, whose
    KSM zero pages dup_mm() still counted for the child (a kernel bug the
    model reproduces): the zero-page counters then exceed the PTEs."""
    profile = k.profile
    k.check()
    g = k.global_values()
    alive = [mm for mm in k.mms.values() if mm.alive]
    procs = {mm.name: k.proc_values(mm) for mm in alive}
    regions = {(mm.name, r): k.region_values(seg) for mm in alive
               for r, seg in mm.regions.items()}
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "stable_node_chains", "stable_node_dups", "full_scans"):
        assert g[name] >= 0, name
    for (proc, r), v in regions.items():
        pages = k.mms[proc].regions[r].n if sizes is None else sizes[proc][r]
        assert 0 <= v["zero_pfn"] <= v["present"] <= pages
        assert v["distinct_frames"] <= v["present"] - v["zero_pfn"]
    if sizes is not None:  # the page tables of each region, against what was mapped
        assert set(regions) == {(p, r) for p, rs in sizes.items() for r in rs}
    # the shared zero page is never a KSM page: no stable node, never in pages_shared
    assert k.frames.node[0] < 0
    assert all(n.kpfn != 0 for n in k.nodes if n.alive and not n.is_chain)
    zero_ptes = {p: sum(v["zero_pfn"] for (q, _), v in regions.items() if q == p) for p in procs}
    if k.tracking and kept_from_child:
        assert use_zero or g["ksm_zero_pages"] == 0
    elif k.tracking:
        # KSM zero pages are zero-page PTEs, and only use_zero_pages places them
        assert g["ksm_zero_pages"] <= sum(zero_ptes.values())
        for p, pv in procs.items():
            if pv["ksm_zero_pages"] is not None:
                assert pv["ksm_zero_pages"] <= zero_ptes[p]
        if not use_zero:
            assert g["ksm_zero_pages"] == 0
    else:
        assert g["ksm_zero_pages"] is None
    if profile.has("fork_counter_fix") or not forked:
        # honest per-process counters (4d6fc29f3634): the processes add up to
        # the global counters; an exited process's rmap items linger until
        # ksmd reaches its mm, so with one gone the sums can only be smaller
        everyone = len(alive) == len(k.mms)
        items = g["pages_shared"] + g["pages_sharing"] + g["pages_unshared"] + g["pages_volatile"]
        if profile.has("ksm_stat"):
            total = sum(pv["ksm_rmap_items"] for pv in procs.values())
            assert (total == items) if everyone else (total <= items), (total, items)
        if profile.has("ksm_profit"):
            merging = sum(pv["ksm_merging_pages"] for pv in procs.values())
            stable = g["pages_shared"] + g["pages_sharing"]
            assert (merging == stable) if everyone else (merging <= stable), (merging, stable)
            for pv in procs.values():
                assert pv["ksm_merging_pages"] <= pv["ksm_rmap_items"]
            if everyone:
                # each KSM page counts once more in its processes than in
                # general_profit, which subtracts the kept copy (ksm.rst)
                profits = sum(pv["ksm_process_profit"] for pv in procs.values())
                assert profits == g["general_profit"] + g["pages_shared"] * PAGE_SIZE
        if k.tracking and profile.has("ksm_stat") and not kept_from_child:
            assert sum(pv["ksm_zero_pages"] for pv in procs.values()) == g["ksm_zero_pages"]


class KsmMachine(RuleBasedStateMachine):
    """Two models fed the same operations: one scans with the numpy fast path,
    one with the per-page reference path; they must agree exactly."""

    @initialize(profile=st.sampled_from(["linux-6.18", "linux-6.6", "linux-6.1", "linux-6.11", "linux-7.3"]),
                use_zero=st.booleans(), max_sharing=st.sampled_from([2, 3, 5, 256]),
                smart=st.booleans())
    def setup(self, profile, use_zero, max_sharing, smart):
        cfg = Settings(use_zero_pages=use_zero, max_page_sharing=max_sharing, smart_scan=smart)
        self.profile = get_profile(profile)
        self.use_zero = use_zero
        self.fast = Ksm(self.profile, cfg)
        self.slow = Ksm(self.profile, cfg)
        for k in (self.fast, self.slow):
            k.spawn("main")
        self.procs = {"main": {}}  # live process -> region -> pages
        self.nregions = 0
        self.nfills = 0
        self.nprocs = 1
        self.kept_from_child = False

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
        self.kept_from_child |= any((seg.dontcopy | seg.wipe).any()
                                    for seg in self.fast.mms[parent].regions.values())

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def exit(self, data):
        proc = data.draw(st.sampled_from(sorted(self.procs)))
        self.both("exit", proc)
        del self.procs[proc]

    # -- the VMA ops -------------------------------------------------------------------
    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data(), advice=st.sampled_from(["free", "pageout", "cold", "dontfork",
                                                   "wipeonfork"]))
    def madvise_vma(self, data, advice):
        proc, name, first, end = self._pick_region(data)
        self.both("madvise", proc, name, first, end, advice)

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data(), prot=st.sampled_from(["none", "read", "read-write"]))
    def mprotect(self, data, prot):
        proc, name, first, end = self._pick_region(data)
        self.both("mprotect", proc, name, first, end, prot)

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data(), pattern=st.sampled_from(["zero", "tag:a", "cycle:c:3"]))
    def write_byte(self, data, pattern):
        proc, name, first, end = self._pick_region(data)
        values = write_byte_values(parse_pattern(pattern), end - first)
        self.both("write_byte", proc, name, first, end, values)

    @precondition(lambda self: any(self.procs.values()))
    @rule(data=st.data(), move=st.booleans())
    def mremap(self, data, move):
        # grow only by moving (in place, only the last region could)
        proc, name, _, end = self._pick_region(data)
        pages = data.draw(st.integers(1, 40)) if move else end
        self.both("mremap", proc, name, pages, move)
        self.procs[proc][name] = pages

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
        check_kernel_invariants(self.fast, self.use_zero, self.procs, forked=self.nprocs > 1,
                                kept_from_child=self.kept_from_child)

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


@pytest.mark.parametrize("profile", ["linux-6.1", "linux-6.6", "linux-6.12.117", "linux-6.18"])
def test_kernel_invariants_at_every_point_of_the_suite(profile):
    """The same invariants, deterministically, after every step and scan of the
    built-in suite (random sequences rarely reach deep states in 60 examples)."""
    from ksmbench.emulator.emulate import ScenarioRun
    from ksmbench.scenario import builtin_suite

    checked = 0
    for scenario in builtin_suite():
        run = ScenarioRun(scenario, profile)
        forked = any(step.op == "fork" for step in scenario.steps)
        kept = forked and any(getattr(step, "advice", "") in ("dontfork", "wipeonfork")
                              for step in scenario.steps)
        for _ in run.points():
            check_kernel_invariants(run.ksm, scenario.ksm.use_zero_pages, None, forked, kept)
            checked += 1
    assert checked > 150
