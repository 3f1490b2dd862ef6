"""THP regions (``thp = true``): the emulator's model of first-touch huge pages
and of KSM splitting them, on cases whose numbers are derived by hand (in the
comments) from the kernel paths docs/emulator.md ("THP regions") names; the
agent's check that a first touch really got a huge page, on this host's
kernel; and random THP scenarios against the host kernel.  The built-in
``thp-*`` scenarios run on real kernels in tests/test_host_kernel.py and
tests/test_vm_boot.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import RUN_LOCK_WAIT, host_ksm_usable
from ksmbench.emulator import predict
from ksmbench.emulator.emulate import ScenarioRun
from ksmbench.scenario import builtin_names, parse_scenario
from ksmbench.scenario import model as m
from ksmbench.scenario.generate import random_scenario
from ksmbench.scenario.loader import scenario_from_dict
from ksmbench.scenario.serialise import to_toml

NEW = "linux-6.18.44"   # thp_split_zero_remap, checksum_first
OLD = "linux-6.1"       # neither


def scen(steps, ksm=None):
    spec = {"name": "t", "step": steps}
    if ksm:
        spec["ksm"] = ksm
    return scenario_from_dict(spec, source="<test>")


def mmap(region="a", pages=512, thp=True):
    return {"op": "mmap", "region": region, "pages": pages, "thp": thp}


def fill(pattern, region="a", rng=None):
    step = {"op": "fill", "region": region, "pattern": pattern}
    if rng:
        step["range"] = list(rng)
    return step


def mergeable(region="a", rng=None):
    step = {"op": "madvise", "region": region, "advice": "mergeable"}
    if rng:
        step["range"] = list(rng)
    return step


def scans(n):
    return {"op": "scan", "count": n}


def values(points, step, scan=None):
    return [p for p in points if p.step == step and (scan is None or p.scan == scan)][-1].values


# -- the model ---------------------------------------------------------------------------

def test_a_first_write_maps_whole_huge_pages_where_a_chunk_fits_one_vma():
    # 1100 pages: chunks [0,512) and [512,1024) fit the VMA, [1024,1100) is a
    # tail; one written page per chunk makes all 512 present (zero-filled)
    s = scen([mmap(pages=1100), fill("tag:x", rng=(3, 4)), fill("tag:x", rng=(600, 601)),
              fill("tag:x", rng=(1050, 1051))])
    v = values(predict(s, NEW), 2 + 1)
    assert v["region.main.a.present"] == 512 + 512 + 1
    assert v["region.main.a.thp"] == 1024
    # a VMA edge inside a chunk (MADV_MERGEABLE on [0, 700) first) leaves it 4 KiB
    s = scen([mmap(pages=1536), mergeable(rng=(0, 700)), fill("zero")])
    assert values(predict(s, NEW), 2)["region.main.a.thp"] == 1024
    # a region without thp has no thp metric at all
    s = scen([mmap(pages=512, thp=False), fill("zero")])
    assert "region.main.a.thp" not in values(predict(s, NEW), 1)


def test_two_subpages_of_one_huge_page_cannot_merge_in_the_visit_that_splits_it():
    # cycle of 4 over one huge page: scan 2 inserts pages 0-3 into the unstable
    # tree; page 4 finds page 0 in the same huge page, split_huge_page() fails
    # (ksmd holds both), the page is split afterwards and page 4 stays out of
    # the trees; pages 5.. merge.  Without THP page 4 merges in scan 2 too.
    steps = [fill("cycle:c:4"), mergeable(), scans(3)]
    huge = predict(scen([mmap(pages=512)] + steps), NEW)
    small = predict(scen([mmap(pages=512, thp=False)] + steps), NEW)
    assert values(huge, 3, 2)["global.pages_volatile"] == 1
    assert values(huge, 3, 2)["global.pages_sharing"] == 512 - 4 - 1
    assert values(huge, 3, 2)["region.main.a.thp"] == 0
    assert values(small, 3, 2)["global.pages_sharing"] == 512 - 4
    assert values(huge, 3, 3)["global.pages_sharing"] == 512 - 4
    for prof in (NEW, OLD):  # no zero subpage: the same on every kernel
        assert values(predict(scen([mmap(pages=512)] + steps), prof), 3, 2)[
            "global.pages_volatile"] == 1


def test_the_split_maps_zero_subpages_to_the_zero_page_only_since_6_12():
    # use_zero_pages=1, one huge page zero but for pages 0 and 1 (equal).
    # 6.12+: page 1 meets page 0 (same huge page), the split then maps
    # pages 2..511 to the zero page, clean: no KSM zero page is counted, and
    # they leave RSS.  6.1: the split keeps them; scan 2 merges each with the
    # zero page (counted nowhere on 6.1, which lacks ksm_zero_pages)
    steps = [mmap(pages=512), fill("tag:q", rng=(0, 2)), mergeable(), scans(3)]
    new = values(predict(scen(steps, {"use_zero_pages": True}), NEW), 3, 2)
    assert new["region.main.a.zero_pfn"] == 510
    assert new["global.ksm_zero_pages"] == 0
    assert new["proc.main.rss_anon_scenario_pages"] == 2
    assert new["global.pages_volatile"] == 1  # page 1; page 0 in the unstable tree
    old = values(predict(scen(steps, {"use_zero_pages": True}), OLD), 3, 2)
    assert old["region.main.a.zero_pfn"] == 510
    assert old["global.ksm_zero_pages"] is None
    # without use_zero_pages 6.1 merges the 510 zero pages into KSM pages:
    # two dups (510 > max_page_sharing 256) and one for pages 0 and 1
    old = values(predict(scen(steps), OLD), 3, 3)
    assert old["region.main.a.zero_pfn"] == 0
    assert old["global.pages_shared"] == 3
    assert old["global.stable_node_dups"] == 2
    assert values(predict(scen(steps), NEW), 3, 3)["region.main.a.zero_pfn"] == 510


def test_a_tree_page_the_split_unmapped_undoes_the_new_ksm_page():
    # thp-split-zero-tree-page: 4 KiB zero page b0 finds THP page a5 (zero) in
    # the unstable tree; b0 becomes a KSM page, the split maps a5 to the zero
    # page, break_cow() copies b0 again; b1 meets the unmapped a5 and gives up
    steps = [mmap(pages=512), fill("unique"), fill("zero", rng=(5, 6)),
             mmap("b", 2, thp=False), fill("zero", "b"), mergeable(), mergeable("b"), scans(2)]
    new = values(predict(scen(steps), NEW), 7, 2)
    assert (new["global.pages_shared"], new["global.pages_sharing"]) == (0, 0)
    assert new["global.pages_unshared"] == 512  # a5's item stays in the tree
    assert new["region.main.b.distinct_frames"] == 2
    assert new["region.main.a.zero_pfn"] == 1
    old = values(predict(scen(steps), OLD), 7, 2)
    assert (old["global.pages_shared"], old["global.pages_sharing"]) == (1, 2)


def test_the_fast_scan_and_the_per_page_scan_agree_on_thp_scenarios():
    for seed in range(6):
        s = random_scenario(900000 + seed, thp=True)
        for prof in (NEW, "linux-6.12.117", OLD):
            a = ScenarioRun(s, prof, fast=True)
            b = ScenarioRun(s, prof, fast=False)
            pa, pb = list(a.points()), list(b.points())
            assert [p.values for p in pa] == [p.values for p in pb], (seed, prof)
            a.ksm.check()


def test_which_ops_take_a_thp_region_outside_the_model():
    base = [mmap(pages=512), fill("tag:x")]
    assert m.thp_outside_model(scen(base + [mergeable(), scans(1)]).steps) is None
    for step in ({"op": "read", "region": "a"},
                 {"op": "madvise", "region": "a", "advice": "dontneed"},
                 {"op": "mprotect", "region": "a", "prot": "read"},
                 {"op": "fork", "child": "c"}):
        why = m.thp_outside_model(scen(base + [step]).steps)
        assert why is not None and why.startswith("step 2")
    # the THP region gone (munmap): fork and reads elsewhere are modelled
    after = [{"op": "munmap", "region": "a"}, mmap("b", 4, thp=False),
             {"op": "read", "region": "b"}, {"op": "fork", "child": "c"}]
    assert m.thp_outside_model(scen(base + after).steps) is None
    # outside the model only full_scans is predicted
    pts = predict(scen(base + [{"op": "read", "region": "a"}, scans(1)]), NEW)
    assert values(pts, 3, 1)["global.full_scans"] == 1
    assert values(pts, 3, 1)["global.pages_volatile"] is None


def test_random_thp_scenarios_stay_inside_the_model_and_old_seeds_keep_their_draws():
    for seed in range(30):
        s = random_scenario(seed, thp=True)
        first = s.steps[0]
        assert isinstance(first, m.Mmap) and first.thp and first.pages >= 512
        assert m.thp_outside_model(s.steps) is None
        assert parse_scenario(to_toml(s, "")).steps == s.steps
    # without thp a seed draws what it drew before THP regions existed: the
    # serialised scenarios' digests were taken from the generator before
    # this change (commit 8eca426), so earlier campaigns' seeds still mean
    # the same scenarios
    import hashlib

    before = {1: "4712fbc191167440", 42: "e227202aeee67434", 400301: "05adb3f798eaafd4",
              500007: "0f97fd01e48d1c66", 600013: "17dcec87c8f8ee82"}
    for seed, digest in before.items():
        text = to_toml(random_scenario(seed), "")
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, seed


def test_the_thp_scenarios_are_in_the_suite():
    names = set(builtin_names())
    assert {"thp-split-same-huge-page", "thp-zero-subpages", "thp-stable-merge",
            "thp-split-zero-tree-page", "thp-vma-edge"} <= names


# -- on this host's kernel -----------------------------------------------------------------

@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap frame numbers and kpageflags need root")
def test_the_agent_reports_a_chunk_that_got_no_huge_page(monkeypatch):
    """A real first write: with MADV_HUGEPAGE the chunk is one huge page and
    the region is MADV_NOHUGEPAGE again afterwards (khugepaged leaves it
    alone); where the advice is withheld the kernel maps 4 KiB pages and the
    agent says the scenario is not applicable."""
    import socket

    from ksmbench.backends.agent import Agent
    from ksmbench.errors import NotApplicable
    from ksmbench.kernel import syscalls

    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() or \
            "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("no transparent huge pages on this kernel")
    a, b = socket.socketpair()
    agent = Agent(a, "main")
    try:
        agent.op_mmap("h", 1024, True)
        agent.op_fill("h", 0, 1, "tag:x", scenario="t", step=1)
        r = agent.regions["h"]
        assert int(np.count_nonzero(agent.frames().thp_mask(r.addr, 1024))) == 512
        # the region's VMA is MADV_NOHUGEPAGE again after the write
        assert " nh" in _vmflags(r.addr) and " hg" not in _vmflags(r.addr)
        real = syscalls.Region.madvise

        def no_hugepage(self, advice, first=0, end=None):
            return real(self, "nohugepage" if advice == "hugepage" else advice, first, end)

        monkeypatch.setattr(syscalls.Region, "madvise", no_hugepage)
        with pytest.raises(NotApplicable, match="pages 512-1023.*0 of 512"):
            agent.op_fill("h", 600, 601, "tag:x", scenario="t", step=2)
    finally:
        for region in list(agent.regions.values()):
            region.munmap()
        if agent._frames is not None:
            agent._frames.close()
        a.close()
        b.close()


def _vmflags(addr: int) -> str:
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line
    return ""


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_random_thp_scenarios_match_the_host_kernel(tmp_path):
    from ksmbench.compare.differential import HostRunner, Tally, run_differential
    from ksmbench.errors import Busy
    from ksmbench.kernel.lock import RunLock

    try:
        with RunLock(timeout=RUN_LOCK_WAIT):
            tally = Tally()
            checked, findings, errors = run_differential(
                range(910000, 910012), tmp_path, runner=HostRunner(), tally=tally, thp=True,
                batch=12)
    except Busy as exc:
        pytest.skip(f"host KSM is in use: {exc.one_line()}")
    assert not errors, errors
    assert checked + len(tally.not_applicable) == 12 and checked >= 10
    assert tally.cells > 100 * checked
    assert not findings, "; ".join(f"{f.path} ({f.cells[0].describe()})" for f in findings)


def test_a_chain_left_with_one_full_dup_stays_a_chain_before_6_11():
    """Found by the THP campaign on debian:6.1 (tests/differential/random-720020.toml,
    max_page_sharing=2): the kernel kept a chain whose only live dup was full, and
    walked it through that dup; the model collapsed it (what 6.11's a0b856b617c5
    does).  The observed cells in the file's comment are what linux-6.1 predicts
    now; the same scenario under 6.11+ collapses the chain."""
    import re

    path = Path(__file__).parent / "differential" / "random-720020.toml"
    text = path.read_text()
    s = parse_scenario(text, source=str(path))
    points = {(p.step, p.scan): p.values for p in predict(s, OLD)}
    cell = re.compile(r"^# step (\d+)(?: scan (\d+))? (\S+): observed (-?\d+), predicted", re.M)
    seen = cell.findall(text)
    assert len(seen) >= 10
    for step, scan, metric, observed in seen:  # chains and dups; the guest's baseline was 0
        assert points[(int(step), int(scan) if scan else None)][metric] == int(observed)
    forced = {(p.step, p.scan): p.values for p in predict(s, OLD + ",+chain_best_dup")}
    assert forced[(19, 1)]["global.stable_node_chains"] == 5


def test_a_thp_scenario_is_not_applicable_without_thp_or_with_the_underused_shrinker(tmp_path):
    from ksmbench.backends.host import thp_unusable

    assert "lacks" in thp_unusable(tmp_path / "absent")
    (tmp_path / "khugepaged").mkdir()
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    assert "off here" in thp_unusable(tmp_path)
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert thp_unusable(tmp_path) is None  # 6.1: no shrink_underused
    (tmp_path / "shrink_underused").write_text("1\n")
    (tmp_path / "khugepaged" / "max_ptes_none").write_text("511\n")
    assert thp_unusable(tmp_path) is None
    (tmp_path / "khugepaged" / "max_ptes_none").write_text("64\n")
    assert "max_ptes_none is 64" in thp_unusable(tmp_path)
    (tmp_path / "shrink_underused").write_text("0\n")
    assert thp_unusable(tmp_path) is None
