"""mprotect, mremap, write_byte and the madvise advices free, dontfork,
wipeonfork, cold and pageout: the loader's checks, and the emulator on small
cases whose numbers are derived by hand (in the comments) from the kernel
paths README "Ops" names.  The built-in scenarios that use these ops run on
real kernels in tests/test_host_kernel.py and tests/test_vm_boot.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ksmbench.emulator import predict
from ksmbench.emulator.content import ZERO, ContentTable
from ksmbench.errors import ScenarioError
from ksmbench.scenario import model as m
from ksmbench.scenario.loader import scenario_from_dict
from ksmbench.scenario.patterns import parse_pattern, write_byte_values


def scen(steps, ksm=None):
    spec = {"name": "t", "step": steps}
    if ksm:
        spec["ksm"] = ksm
    return scenario_from_dict(spec, source="<test>")


def mmap(region="a", pages=4, **kw):
    return {"op": "mmap", "region": region, "pages": pages, **kw}


def fill(pattern, region="a", rng=None, **kw):
    step = {"op": "fill", "region": region, "pattern": pattern, **kw}
    if rng:
        step["range"] = list(rng)
    return step


def madvise(advice, region="a", rng=None, **kw):
    step = {"op": "madvise", "region": region, "advice": advice, **kw}
    if rng:
        step["range"] = list(rng)
    return step


def mprotect(prot, region="a", rng=None):
    step = {"op": "mprotect", "region": region, "prot": prot}
    if rng:
        step["range"] = list(rng)
    return step


SCAN = {"op": "scan", "count": 1}


def scans(n):
    return {"op": "scan", "count": n}


def last(points, step):
    """The values after step ``step`` (its last scan, for a scan step)."""
    return [p for p in points if p.step == step][-1].values


def refused(steps, ksm=None) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        scen(steps, ksm)
    message = str(info.value)
    assert "\n" not in message
    return info.value


# -- loader --------------------------------------------------------------------------------

def test_the_new_ops_parse_into_their_dataclasses():
    s = scen([mmap(pages=8), mprotect("read"),
              {"op": "write_byte", "region": "a", "range": [0, 8], "pattern": "tag:x"},
              {"op": "mremap", "region": "a", "pages": 16, "move": True},
              madvise("pageout")])
    assert [st.op for st in s.steps] == ["mmap", "mprotect", "write_byte", "mremap", "madvise"]
    assert s.steps[1] == m.Mprotect(1, "main", "a", 0, 8, "read")
    assert s.steps[2].pattern == parse_pattern("tag:x")
    assert s.steps[3] == m.Mremap(3, "main", "a", 16, True)
    assert s.region_pages[("main", "a")] == 16


def test_every_new_advice_is_accepted_and_an_unknown_one_named():
    for advice in ("free", "dontfork", "wipeonfork", "cold", "pageout"):
        scen([mmap(), madvise(advice)])
    err = refused([mmap(), madvise("hugepages")])
    assert err.field == "advice" and "pageout" in str(err)


def test_mprotect_needs_a_known_prot():
    err = refused([mmap(), mprotect("write")])
    assert err.field == "prot" and "read-write" in str(err)


def test_fill_and_read_are_refused_where_the_protection_forbids_them():
    err = refused([mmap(pages=8), mprotect("read", rng=(2, 4)), fill("zero", rng=(0, 3))])
    assert err.step == 2 and err.field == "range" and "not writable" in str(err)
    err = refused([mmap(pages=8), mprotect("none", rng=(2, 4)),
                   {"op": "read", "region": "a", "range": [3, 8]}])
    assert "PROT_NONE" in str(err)
    # reading read-only pages, and filling them after read-write again, is fine
    scen([mmap(pages=8), mprotect("read"), {"op": "read", "region": "a"},
          mprotect("read-write", rng=(0, 4)), fill("zero", rng=(0, 4))])


def test_write_byte_needs_a_range_and_refuses_unique():
    err = refused([mmap(), {"op": "write_byte", "region": "a", "pattern": "zero"}])
    assert err.field == "range"
    err = refused([mmap(), {"op": "write_byte", "region": "a", "range": [0, 4],
                            "pattern": "unique"}])
    assert err.field == "pattern" and "one byte" in str(err)
    # PROT_NONE pages can be written: through /proc/self/mem
    scen([mmap(), mprotect("none"),
          {"op": "write_byte", "region": "a", "range": [0, 4], "pattern": "zero"}])


def test_mremap_grows_in_place_only_the_last_region_and_moves_only_one_vma():
    grow = {"op": "mremap", "region": "a", "pages": 8}
    err = refused([mmap("a"), mmap("b"), grow])
    assert err.field == "pages" and "move = true" in str(err)
    scen([mmap("a"), mmap("b"), {"op": "munmap", "region": "b"},
          {"op": "mremap", "region": "a", "pages": 2}])          # shrinking is always fine
    s = scen([mmap("a"), mmap("b"), {**grow, "move": True}, grow])  # moved: now the last one
    assert s.region_pages[("main", "a")] == 8
    err = refused([mmap("a"), mprotect("none", rng=(0, 1)), {**grow, "move": True}])
    assert err.field == "region" and "several VMAs" in str(err)
    err = refused([mmap("a"), madvise("mergeable", rng=(1, 3)), {**grow, "move": True}])
    assert "several VMAs" in str(err)
    # attributes made uniform again: one VMA again
    scen([mmap("a"), mprotect("none", rng=(0, 1)), mprotect("read-write", rng=(0, 1)), grow])
    # but not by prctl: ksm_add_vmas() sets VM_MERGEABLE on each VMA in place,
    # without vma_merge() (measured on this host's 6.18: mremap EFAULT, random seed 100011)
    err = refused([mmap("a"), madvise("mergeable", rng=(1, 3)), {"op": "prctl", "merge": True},
                   grow])
    assert "several VMAs" in str(err)


def test_a_forked_child_cannot_touch_what_madv_dontfork_kept_from_it():
    steps = [mmap(pages=8), fill("zero"), madvise("dontfork", rng=(0, 2)),
             madvise("wipeonfork", rng=(2, 4)), {"op": "fork", "child": "c"}]
    err = refused(steps + [fill("zero", rng=(1, 3), proc="c")])
    assert err.step == 5 and "MADV_DONTFORK" in str(err)
    # the wiped range is mapped (empty), and the parent keeps everything
    scen(steps + [fill("zero", rng=(2, 8), proc="c"), fill("zero")])


# -- patterns and contents --------------------------------------------------------------------

def test_write_byte_values_and_contents():
    tag = write_byte_values(parse_pattern("tag:x"), 3)
    assert tag.tolist() == [tag[0]] * 3
    cyc = write_byte_values(parse_pattern("cycle:c:2"), 5)
    assert cyc[0] == cyc[2] == cyc[4] and cyc[1] == cyc[3]
    assert write_byte_values(parse_pattern("zero"), 2).tolist() == [0, 0]
    t = ContentTable()
    a = t.tag("a")
    v = np.array([7, 7, 9, 0], dtype=np.uint8)
    out = t.with_first_byte(np.array([a, a, a, ZERO]), v)
    assert out[0] == out[1] != out[2]       # same old content, same byte: one content
    assert out[3] == ZERO                   # a zero byte into a zero page changes nothing
    assert t.with_first_byte(out[:1], v[:1])[0] == out[0]  # the byte is already there
    # memcmp order: byte 0 decides first
    assert t.compare(int(out[0]), int(out[2])) == -1


# -- emulator ------------------------------------------------------------------------------------

MERGED_PROT_NONE = [mmap(), fill("tag:p"), madvise("mergeable"), scans(2), mprotect("none"),
                    madvise("unmergeable")]


def test_break_ksm_unshares_prot_none_pages_only_with_protnone_follow():
    # 4 identical pages merge into one KSM page (1 shared, 3 sharing); under
    # PROT_NONE, MADV_UNMERGEABLE's break_ksm() finds them through
    # follow_page()/folio_walk from 6.5 on and gives each its own copy
    new = last(predict(scen(MERGED_PROT_NONE), "linux-6.12"), 5)
    assert new["region.main.a.distinct_frames"] == 4
    # 6.1: follow_page() sees no page behind a PROT_NONE PTE: all stay on one frame
    old = last(predict(scen(MERGED_PROT_NONE), "linux-6.1"), 5)
    assert old["region.main.a.distinct_frames"] == 1


def test_a_prot_none_root_ends_every_unstable_search_before_protnone_follow():
    # page 0 (content A) under PROT_NONE, pages 1-2 content B.  Scan 1 records
    # checksums (3 volatile).  Scan 2: A goes into the empty unstable tree as
    # its root; each B search starts at the root, whose page
    # get_mergeable_page() cannot find on 6.1: the search returns NULL, B is
    # neither merged nor inserted
    steps = [mmap(pages=3), fill("tag:A", rng=(0, 1)), fill("tag:B", rng=(1, 3)),
             mprotect("none", rng=(0, 1)), madvise("mergeable"), scans(2)]
    old = last(predict(scen(steps), "linux-6.1"), 5)
    assert (old["global.pages_unshared"], old["global.pages_volatile"],
            old["global.pages_shared"]) == (1, 2, 0)
    # 6.12: A is root, B1 is inserted below it, B2 merges with B1
    new = last(predict(scen(steps), "linux-6.12"), 5)
    assert (new["global.pages_unshared"], new["global.pages_shared"],
            new["global.pages_sharing"]) == (1, 1, 1)
    # 6.1 again, the PROT_NONE page last: B1 is the root, B2 merges with it
    # (B1 leaves the tree), then A is inserted into the empty tree
    steps = [mmap(pages=3), fill("tag:B", rng=(0, 2)), fill("tag:A", rng=(2, 3)),
             mprotect("none", rng=(2, 3)), madvise("mergeable"), scans(2)]
    old = last(predict(scen(steps), "linux-6.1"), 5)
    assert (old["global.pages_unshared"], old["global.pages_shared"],
            old["global.pages_sharing"]) == (1, 1, 1)


def test_write_byte_breaks_the_sharing_and_equal_bytes_merge_again():
    steps = [mmap(), fill("tag:w"), madvise("mergeable"), scans(2),
             {"op": "write_byte", "region": "a", "range": [0, 4], "pattern": "tag:b"},
             SCAN, SCAN]
    points = predict(scen(steps), "linux-6.12")
    assert last(points, 3)["global.pages_sharing"] == 3
    # each write copies the KSM page (do_wp_page()): 4 frames; the counters
    # wait for ksmd
    after = last(points, 4)
    assert (after["region.main.a.distinct_frames"], after["global.pages_sharing"]) == (4, 3)
    # next visit: the items leave the stable tree, the new checksum is recorded
    one = last(points, 5)
    assert (one["global.pages_shared"], one["global.pages_sharing"],
            one["global.pages_volatile"]) == (0, 0, 4)
    # the 4 pages got the same byte: identical again, merged a scan later
    two = last(points, 6)
    assert (two["global.pages_shared"], two["global.pages_sharing"],
            two["region.main.a.distinct_frames"]) == (1, 3, 1)


def test_a_zero_byte_into_ksm_zero_pages_unshares_them_and_they_stay_zero():
    steps = [mmap(), fill("zero"), madvise("mergeable"), scans(3),
             {"op": "write_byte", "region": "a", "range": [0, 2], "pattern": "zero"},
             scans(2)]
    points = predict(scen(steps, {"use_zero_pages": True}), "linux-6.12")
    assert last(points, 3)["global.ksm_zero_pages"] == 4
    # wp_page_copy() of a KSM zero page uncounts it at once
    after = last(points, 4)
    assert (after["global.ksm_zero_pages"], after["region.main.a.zero_pfn"]) == (2, 2)
    # the copies are all zero: checksum recorded, then zero-merged again
    assert last(points, 5)["global.ksm_zero_pages"] == 4


def test_mremap_move_unshares_first_and_the_pages_merge_again_at_the_new_address():
    steps = [mmap(), fill("tag:m"), madvise("mergeable"), scans(2),
             {"op": "mremap", "region": "a", "pages": 4, "move": True}, SCAN, SCAN]
    points = predict(scen(steps), "linux-6.12")
    moved = last(points, 4)
    # move_vma() -> ksm_madvise(MADV_UNMERGEABLE): 4 private copies, counters lazy
    assert (moved["region.main.a.distinct_frames"], moved["global.pages_sharing"]) == (4, 3)
    # scan 1: the old addresses' items are freed (4 gone), 4 new items record checksums
    one = last(points, 5)
    assert (one["global.pages_shared"], one["global.pages_sharing"],
            one["proc.main.ksm_rmap_items"], one["global.pages_volatile"]) == (0, 0, 4, 4)
    two = last(points, 6)
    assert (two["global.pages_shared"], two["global.pages_sharing"]) == (1, 3)


def test_mremap_shrink_drops_the_tail_and_grow_extends_the_mergeable_vma():
    steps = [mmap(), fill("tag:g"), madvise("mergeable"), scans(2),
             {"op": "mremap", "region": "a", "pages": 2}, SCAN,
             {"op": "mremap", "region": "a", "pages": 6}, fill("tag:g", rng=(2, 6)), scans(2)]
    points = predict(scen(steps), "linux-6.12")
    assert last(points, 4)["region.main.a.present"] == 2
    # the tail's 2 items are freed at the next scan: 1 shared, 1 sharing left
    one = last(points, 5)
    assert (one["global.pages_shared"], one["global.pages_sharing"],
            one["proc.main.ksm_rmap_items"]) == (1, 1, 2)
    # the 4 new pages are in the same VM_MERGEABLE VMA; 6.11+ needs 2 visits
    # to join the existing KSM page
    grown = last(points, 8)
    assert (grown["global.pages_shared"], grown["global.pages_sharing"]) == (1, 5)


def test_madv_pageout_reclaims_only_clean_lazy_free_pages_without_swap():
    base = [mmap(pages=8), fill("unique", rng=(0, 4)), fill("tag:k", rng=(4, 8)),
            madvise("mergeable"), scans(2)]
    # PAGEOUT alone: anonymous pages cannot go without swap
    alone = last(predict(scen(base + [madvise("cold"), madvise("pageout")]), "linux-6.12"), 6)
    assert alone["region.main.a.present"] == 8
    # FREE then PAGEOUT: the 4 private pages are discarded; the KSM page is
    # mapped 4 times, so FREE and PAGEOUT both skip it
    freed = predict(scen(base + [madvise("free"), fill("unique", rng=(0, 1)),
                                 madvise("pageout"), SCAN]), "linux-6.12")
    after = last(freed, 7)
    # page 0 was written after FREE: dirty again, it stays
    assert (after["region.main.a.present"], after["region.main.a.distinct_frames"]) == (5, 2)
    assert last(freed, 8)["proc.main.ksm_rmap_items"] == 5


def test_dontfork_and_wipeonfork_ranges_reach_the_child_empty_but_counted():
    steps = [mmap(), fill("zero"), madvise("mergeable"), scans(3),
             madvise("dontfork", rng=(0, 2)), madvise("wipeonfork", rng=(2, 3)),
             {"op": "fork", "child": "c"}, {"op": "exit", "proc": "c"}]
    for profile, forked, exited in (("linux-6.18", 8, 7), ("linux-6.12", 4, 3)):
        points = predict(scen(steps, {"use_zero_pages": True}), profile)
        at_fork = last(points, 6)
        # only page 3's PTE reaches the child, yet dup_mm() copied the count of 4
        assert at_fork["region.c.a.present"] == 1
        assert at_fork["proc.c.ksm_zero_pages"] == 4
        # 6.18's ksm_fork() adds the copied 4 to the global counter (4 -> 8);
        # before 4d6fc29f3634 nothing is added
        assert at_fork["global.ksm_zero_pages"] == forked
        # the child's exit zaps its one KSM zero PTE
        assert last(points, 7)["global.ksm_zero_pages"] == exited
