"""Unit tests of the emulator on small cases checked by hand against mm/ksm.c.

Every expected number here is derived in the comment next to it from the
kernel code path (or from docs/emulator.md, "Rules of thumb", which gives
the kernel's own selftest formulas and a table measured on the host), not
copied from the emulator.
"""

from __future__ import annotations

import csv
import io
import random
from argparse import Namespace

import pytest

from ksmbench.emulator import EmulatorBackend, Predictor, predict
from ksmbench.emulator.content import ContentTable
from ksmbench.emulator.profiles import get_profile, profile_for_release
from ksmbench.emulator.rbtree import RBNode, RBRoot
from ksmbench.errors import UsageError
from ksmbench.observation import PointObserved, ScenarioFinished, ScenarioStarted
from ksmbench.scenario import builtin_suite
from ksmbench.scenario.loader import scenario_from_dict
from ksmbench.scenario.patterns import FillId, key_bytes, parse_pattern


def scen(steps, ksm=None, name="t"):
    spec = {"name": name, "step": steps}
    if ksm:
        spec["ksm"] = ksm
    return scenario_from_dict(spec, source="<test>")


def at(points, step, scan=None):
    for p in points:
        if p.step == step and p.scan == scan:
            return p.values
    raise KeyError((step, scan))


def region(name, pages, pattern, merge=True, proc=None, rng=None):
    steps = [{"op": "mmap", "region": name, "pages": pages},
             {"op": "fill", "region": name, "pattern": pattern}]
    if rng:
        steps[1]["range"] = rng
    if merge:
        steps.append({"op": "madvise", "region": name, "advice": "mergeable"})
    if proc:
        for s in steps:
            s["proc"] = proc
    return steps


# -- merging identical pages (docs/emulator.md; ksm_tests assert_ksm_pages_count) -------------

@pytest.mark.parametrize("n,maxs", [(10, 256), (16, 16), (17, 16), (18, 16), (50, 16), (33, 16),
                                    (7, 2), (6, 3), (512, 256)])
def test_n_identical_pages_after_two_scans(n, maxs):
    pts = predict(scen(region("a", n, "tag:x") + [{"op": "scan", "count": 2}],
                       ksm={"max_page_sharing": maxs}), "linux-6.18")
    v = at(pts, 3, 2)
    # scan 1 records checksums; scan 2: page 0 into the unstable tree, page 1 merges with
    # it (a new KSM page), later pages are appended until max_page_sharing, then the
    # next pair makes a new dup.  ksm_tests: N mod M in {0,1} -> floor(N/M) KSM pages,
    # else floor(N/M)+1; a lone leftover stays in the unstable tree.
    full, rem = divmod(n, maxs)
    shared = full + (1 if rem >= 2 else 0)
    assert v["global.pages_shared"] == shared
    assert v["global.pages_sharing"] == n - shared - (1 if rem == 1 else 0)
    assert v["global.pages_unshared"] == (1 if rem == 1 else 0)
    assert v["global.stable_node_chains"] == (1 if shared > 1 else 0)
    assert v["global.stable_node_dups"] == (shared if shared > 1 else 0)
    assert v["global.pages_volatile"] == 0
    assert v["region.main.a.distinct_frames"] == shared + (1 if rem == 1 else 0)


def test_ten_pages_profit_as_in_the_notes():
    pts = predict(scen(region("a", 10, "tag:ten") + [{"op": "scan", "count": 2}]), "linux-6.18")
    # "N=10, M=256 gives shared 1, sharing 9, general_profit = 9*4096 - 10*64 = 36224"
    assert at(pts, 3, 2)["global.general_profit"] == 36224
    # per process: (merging 10) * 4096 - 10 * 64
    assert at(pts, 3, 2)["proc.main.ksm_process_profit"] == 10 * 4096 - 640
    # after scan 1 every item is volatile: -N*64
    assert at(pts, 3, 1)["global.general_profit"] == -640
    assert at(pts, 3, 1)["global.pages_volatile"] == 10


def test_mixed_region_reference_table():
    """The table measured on the 6.18 host (docs/emulator.md), scan by scan."""
    pts = predict(builtin_suite()[[s.name for s in builtin_suite()].index("mixed-region")],
                  "linux-6.18")
    want = {  # scan: shared, sharing, unshared, volatile, zero, profit, chains, dups, items
        1: (0, 0, 0, 3000, 0, -192000, 0, 0, 3000),
        2: (4, 996, 1000, 1000, 1000, 7983616, 1, 4, 3000),
        3: (4, 996, 1000, 0, 1000, 8047616, 1, 4, 2000),
        4: (4, 996, 1000, 0, 1000, 8047616, 1, 4, 2000),
        5: (4, 996, 0, 1000, 1000, 8047616, 1, 4, 2000),
    }
    for scan, row in want.items():
        v = at(pts, 5, scan)
        got = tuple(v[f"global.{k}"] for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                                "pages_volatile", "ksm_zero_pages", "general_profit",
                                                "stable_node_chains", "stable_node_dups"))
        assert got + (v["proc.main.ksm_rmap_items"],) == row, scan
    # smart_scan skips the 1000 unique pages on scan 5
    assert at(pts, 5, 5)["global.pages_skipped"] == 1000
    assert at(pts, 5, 2)["proc.main.ksm_process_profit"] == 8000000


# -- zero pages ------------------------------------------------------------------------------------

def test_zero_pages_lifecycle_and_versions():
    s = scen(region("a", 40, "zero") + [{"op": "scan", "count": 3},
                                        {"op": "madvise", "region": "a", "range": [0, 10],
                                         "advice": "unmergeable"},
                                        {"op": "fill", "region": "a", "range": [10, 15],
                                         "pattern": "tag:w"},
                                        {"op": "madvise", "region": "a", "range": [15, 20],
                                         "advice": "dontneed"},
                                        {"op": "unmerge_all"}],
             ksm={"use_zero_pages": True})
    new = predict(s, "linux-6.18")
    # scan 2: replaced by the zero page, counted, items stay (volatile); scan 3: items freed
    assert at(new, 3, 2)["global.ksm_zero_pages"] == 40
    assert at(new, 3, 2)["global.pages_volatile"] == 40
    assert at(new, 3, 2)["proc.main.rss_anon_scenario_pages"] == 0
    assert at(new, 3, 3)["proc.main.ksm_rmap_items"] == 0
    assert at(new, 3, 3)["global.general_profit"] == 40 * 4096
    # MADV_UNMERGEABLE unshares 10 at once (79271476b336), a write fault 5, DONTNEED 5
    assert at(new, 4)["global.ksm_zero_pages"] == 30
    assert at(new, 4)["region.main.a.zero_pfn"] == 30
    assert at(new, 5)["global.ksm_zero_pages"] == 25
    assert at(new, 6)["global.ksm_zero_pages"] == 20
    assert at(new, 6)["region.main.a.present"] == 35
    # run=2 unshares the rest
    assert at(new, 7)["global.ksm_zero_pages"] == 0
    assert at(new, 7)["region.main.a.zero_pfn"] == 0
    old = predict(s, "linux-6.1")
    # before 6.6: no counter, and neither unmergeable nor run=2 unshare zero pages
    assert at(old, 3, 3)["global.ksm_zero_pages"] is None
    assert at(old, 3, 3)["proc.main.ksm_zero_pages"] is None
    assert at(old, 4)["region.main.a.zero_pfn"] == 40
    # 40 zero PTEs - 5 rewritten - 5 zapped by DONTNEED; run=2 leaves the other 30
    assert at(old, 7)["region.main.a.zero_pfn"] == 30
    assert at(old, 7)["region.main.a.present"] == 35


def test_read_fault_zero_pages_are_not_ksm():
    pts = predict(scen([{"op": "mmap", "region": "a", "pages": 8}, {"op": "read", "region": "a"},
                        {"op": "madvise", "region": "a", "advice": "mergeable"},
                        {"op": "scan", "count": 2},
                        {"op": "madvise", "region": "a", "advice": "unmergeable"}],
                       ksm={"use_zero_pages": True}), "linux-6.18")
    v = at(pts, 4)
    assert v["region.main.a.zero_pfn"] == 8 and v["global.ksm_zero_pages"] == 0
    assert at(pts, 3, 2)["proc.main.ksm_rmap_items"] == 0  # the zero page is never scanned


# -- merge order across versions -----------------------------------------------------------------

def test_checksum_first_merges_new_duplicate_one_scan_later():
    steps = region("a", 8, "tag:p") + [{"op": "scan", "count": 2}] + region("b", 2, "tag:p") + [
        {"op": "scan", "count": 2}]
    s = scen(steps)
    # before 6.11 the stable tree comes first: a new page equal to a KSM page merges at once
    assert at(predict(s, "linux-6.7"), 7, 1)["global.pages_sharing"] == 9
    # since 6.11 (ac90c56bbd73) the first visit only records the checksum
    assert at(predict(s, "linux-6.11"), 7, 1)["global.pages_sharing"] == 7
    assert at(predict(s, "linux-6.11"), 7, 2)["global.pages_sharing"] == 9


def test_smart_scan_schedule():
    pts = predict(scen(region("a", 4, "unique") + [{"op": "scan", "count": 14}]), "linux-6.7")
    skipped = [at(pts, 3, n)["global.pages_skipped"] for n in range(1, 15)]
    inc = [b - a for a, b in zip([0] + skipped, skipped)]
    # processed 1-4, skip 5, process 6, skip 7-8, process 9, skip 10-13, process 14
    assert [n + 1 for n, d in enumerate(inc) if d] == [5, 7, 8, 10, 11, 12, 13]
    assert all(at(predict(scen(region("a", 4, "unique") + [{"op": "scan", "count": 14}]),
                          "linux-6.6"), 3, n)["global.pages_skipped"] is None for n in (1, 14))


def test_pages_scanned_before_the_fix_stays_zero_when_each_batch_ends_a_scan():
    s = scen(region("a", 5, "tag:q") + [{"op": "scan", "count": 2}])
    assert at(predict(s, "linux-6.6"), 3, 2)["global.pages_scanned"] == 0
    assert at(predict(s, "linux-6.11"), 3, 2)["global.pages_scanned"] == 10


# -- fork ---------------------------------------------------------------------------------------

def test_fork_counters_by_version():
    steps = region("a", 16, "tag:f") + region("z", 8, "zero") + [
        {"op": "scan", "count": 3}, {"op": "fork", "child": "c"}, {"op": "exit", "proc": "c"}]
    s = scen(steps, ksm={"use_zero_pages": True})
    new = predict(s, "linux-6.18")
    fork = at(new, 7)
    # 4d6fc29f3634: the child starts with no items and no merging pages, and its
    # inherited KSM zero PTEs are added to the global counter
    assert fork["proc.c.ksm_rmap_items"] == 0 and fork["proc.c.ksm_merging_pages"] == 0
    assert fork["proc.c.ksm_zero_pages"] == 8
    assert fork["global.ksm_zero_pages"] == 16
    assert at(new, 8)["global.ksm_zero_pages"] == 8  # the child's exit zaps its 8
    old = predict(s, "linux-6.6")
    fork = at(old, 7)
    # 6.6-6.17: dup_mm() copied the parent's counters; the global one was not raised
    assert fork["proc.c.ksm_rmap_items"] == fork["proc.main.ksm_rmap_items"] == 16
    assert fork["proc.c.ksm_merging_pages"] == 16
    assert fork["global.ksm_zero_pages"] == 8
    assert at(old, 8)["global.ksm_zero_pages"] == 0  # ... so the child's exit undercounts


def test_forked_ksm_pages_join_the_stable_node_even_beyond_max():
    steps = region("a", 4, "tag:m") + [{"op": "scan", "count": 2}, {"op": "fork", "child": "c"},
                                       {"op": "scan", "count": 1}]
    v = at(predict(scen(steps, ksm={"max_page_sharing": 4}), "linux-6.18"), 5, 1)
    # the child's 4 mappings are appended to the full KSM page (max_page_sharing_bypass)
    assert v["global.pages_shared"] == 1 and v["global.pages_sharing"] == 7


# -- stale nodes, chains ---------------------------------------------------------------------------

def test_cow_of_every_mapping_makes_the_node_stale_and_it_goes_at_once():
    steps = region("a", 6, "tag:s") + [{"op": "scan", "count": 2},
                                       {"op": "fill", "region": "a", "pattern": "unique"},
                                       {"op": "scan", "count": 1}]
    pts = predict(scen(steps), "linux-6.18")
    assert at(pts, 4)["global.pages_sharing"] == 5  # counters lag until ksmd visits
    v = at(pts, 5, 1)
    # the first visit finds the KSM page freed: remove_node_from_stable_tree() drops all 6
    assert v["global.pages_shared"] == 0 and v["global.pages_sharing"] == 0
    assert v["global.pages_volatile"] == 6


def test_chain_collapses_when_one_dup_is_left():
    # 6 pages, max 2: three dups in a chain; CoW two dups' pages away; the chain is
    # pruned on the next stable-tree walk and, with one dup left, collapsed
    steps = region("a", 6, "tag:c") + [{"op": "scan", "count": 2},
                                       {"op": "fill", "region": "a", "range": [0, 4],
                                        "pattern": "tag:d"},
                                       {"op": "scan", "count": 3}]
    pts = predict(scen(steps, ksm={"max_page_sharing": 2}), "linux-6.18")
    assert (at(pts, 3, 2)["global.stable_node_chains"], at(pts, 3, 2)["global.stable_node_dups"]) == (1, 3)
    # scan 1 after the writes: items of the two stale dups are removed with them
    v = at(pts, 5, 1)
    assert v["global.stable_node_dups"] == 1 and v["global.pages_shared"] == 1
    # scan 2: the rewritten pages (checksum now stable) walk the stable tree through the
    # chain: one live dup -> collapsed (chains 0, dups 0); they merge among themselves
    v = at(pts, 5, 2)
    assert v["global.stable_node_chains"] == 1  # new content d: its own chain of 2 dups
    assert v["global.pages_shared"] == 3


# -- profiles, content order, rbtree ---------------------------------------------------------------

@pytest.mark.parametrize("release,profile", [
    ("6.18.44-fc-v657", "linux-6.18.44"), ("6.1.0-28-amd64", "linux-6.1"),
    ("6.12.57+deb13-amd64", "linux-6.12.57"), ("7.2.13-amd64", "linux-7.2.13")])
def test_profile_for_release(release, profile):
    assert Predictor().profile_for(release, "auto") == profile


def test_stable_backports_in_profiles():
    assert "fork_counter_fix" in get_profile("linux-6.12.57").flags
    assert "fork_counter_fix" not in get_profile("linux-6.12.10").flags
    assert "fork_counter_fix" not in get_profile("linux-6.11").flags
    assert "checksum_first" not in get_profile("linux-6.18,-checksum_first").flags
    assert profile_for_release("garbage") is None
    with pytest.raises(UsageError, match="known"):
        Predictor().check_profile("linux-5.x")
    with pytest.raises(UsageError, match="flag"):
        get_profile("linux-6.6,+nonsense")


def test_content_keys_order_like_memcmp():
    table = ContentTable()
    fill = FillId("s", 3)
    ids = list(table.fill(parse_pattern("unique"), 40, fill))
    names = [f"t{i}" for i in range(20)]
    ids += [table.tag(n) for n in names]
    keys = {cid: ("unique", "s", 3, cid - ids[0]) for cid in ids[:40]}
    keys.update({table.tag(n): ("tag", n) for n in names})
    keys[0] = ("zero",)
    ordered = sorted(keys, key=lambda c: key_bytes(keys[c]))
    assert sorted(keys, key=lambda c: table.key(c)) == ordered
    a, b = random.Random(1).sample(ordered, 2)
    assert table.compare(a, b) == (1 if key_bytes(keys[a]) > key_bytes(keys[b]) else -1)


def test_rbtree_keeps_invariants_and_order():
    rng = random.Random(5)

    class N(RBNode):
        __slots__ = ("key",)

    root, nodes = RBRoot(), {}
    for step in range(3000):
        if nodes and rng.random() < 0.4:
            key = rng.choice(list(nodes))
            root.erase(nodes.pop(key))
        else:
            key = rng.random()
            node = N()
            node.key = key
            parent, left, cur = None, False, root.node
            while cur is not None:
                parent, left = cur, key < cur.key
                cur = cur.rb_left if left else cur.rb_right
            root.link(node, parent, left)
            nodes[key] = node
        if step % 100 == 0:
            root.check()
            assert [n.key for n in root.inorder()] == sorted(nodes)
    # replace keeps shape and colour
    some = next(iter(nodes.values()))
    new = N()
    new.key = some.key
    red, left, right = some.rb_red, some.rb_left, some.rb_right
    root.replace(some, new)
    assert (new.rb_red, new.rb_left, new.rb_right) == (red, left, right)
    root.check()


# -- front ends ------------------------------------------------------------------------------------

def test_fast_and_reference_paths_agree_on_the_suite():
    for s in builtin_suite():
        for prof in ("linux-6.18", "linux-6.6", "linux-7.3"):
            fast = predict(s, prof, fast=True)
            slow = predict(s, prof, fast=False)
            assert [(p.step, p.scan, p.values) for p in fast] == \
                   [(p.step, p.scan, p.values) for p in slow], (s.name, prof)


def test_emulator_backend_event_stream():
    suite = [s for s in builtin_suite() if not s.ksm.advisor][:3]  # the advisor is 6.8+
    events = list(EmulatorBackend("linux-6.6").events(suite))
    assert events[0].info["backend"] == "emulator"
    assert [type(e) for e in events[1:4]][0] is ScenarioStarted
    finished = [e for e in events if isinstance(e, ScenarioFinished)]
    assert [f.scenario for f in finished] == [s.name for s in suite]
    assert all(f.error is None for f in finished)
    points = [e for e in events if isinstance(e, PointObserved)]
    # per scenario: baseline, one per non-scan step, one per scan, teardown
    assert len(points) == sum(2 + len(s.steps) - sum(1 for t in s.steps if t.op == "scan")
                              + s.scan_count for s in suite)
    firsts = [p.point.op for p in points if p.point.step == -1]
    lasts = [p.point for p in points if p.point.op == "teardown"]
    assert firsts == ["baseline"] * len(suite)
    assert [p.step for p in lasts] == [len(s.steps) for s in suite]


def test_prctl_stops_predictions_on_kernels_without_it():
    s = scen([{"op": "mmap", "region": "a", "pages": 2}, {"op": "prctl", "merge": True},
              {"op": "scan", "count": 1}])
    # the baseline point and step 0; no teardown (the scenario cannot finish)
    assert [p.op for p in predict(s, "linux-6.1")] == ["baseline", "mmap"]
    events = list(EmulatorBackend("linux-6.1").events([s]))
    assert "not supported" in events[-1].error


def test_emulate_command_csv(capsys):
    from ksmbench.emulator.cli import emulate_command

    status = emulate_command(Namespace(scenarios=["zero-pages"], profile="linux-6.1", format="csv"))
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["scenario", "kernel", "step", "op", "scan", "metric", "observed",
                             "predicted", "match"]
    assert all(r["observed"] == "" and r["match"] == "" for r in rows)
    assert {r["kernel"] for r in rows} == {"emulator:linux-6.1"}
    zero = [r for r in rows if r["metric"] == "global.ksm_zero_pages"]
    assert zero and all(r["predicted"] == "" for r in zero)  # 6.1 lacks the counter
    assert any(r["metric"] == "proc.main.ksm_rmap_items" and r["predicted"] == "512" for r in rows)


def test_emulator_is_a_backend_for_run(tmp_path):
    """The emulator as a `--kernel emulator:<profile>` backend goes through the
    same Runner; judged against a profile that differs in one flag, the cells
    that flag changes are mismatches (a prediction against itself proves
    nothing, so the other profile is the check)."""
    from ksmbench.backends import resolve_backend
    from ksmbench.results import RunDir
    from ksmbench.runner import RunRecorder, Runner, exit_status

    suite = builtin_suite()
    backend = resolve_backend("emulator:linux-6.7")
    assert backend.label == "emulator:linux-6.7"
    rundir = RunDir(tmp_path / "auto")
    outcome = Runner([RunRecorder(rundir, predictor=Predictor())]).run_kernel(backend, suite)
    rundir.close()
    assert outcome.profile == "linux-6.7"  # --profile auto read the backend's release
    assert sum(o.compared for o in outcome.scenarios.values()) > 2000
    # linux-6.6 lacks smart_scan (5e924ff54d08): pages_skipped exists on one side only
    rundir = RunDir(tmp_path / "forced")
    forced = Runner([RunRecorder(rundir, predictor=Predictor(), profile="linux-6.6")]).run_kernel(
        resolve_backend("emulator:linux-6.7"), suite)
    rundir.close()
    bad = {mm.metric for o in forced.scenarios.values() for mm in o.mismatches}
    assert "global.pages_skipped" in bad
    assert forced.scenarios["smart-scan-skip"].verdict == "mismatch"
    assert exit_status([forced]) == 1


# -- 7.3: rmap items leaving the stable tree start over (stable_item_reset) ----------------------

def test_cow_same_content_remerges_one_scan_later_since_7_3():
    # 16 pages of one content merge on scan 2 (1 shared + 15 sharing).  A
    # write of the same bytes CoW-breaks 8 of them.  Next scan, each of the 8
    # items is still STABLE on a page that is not KSM: cmp_and_merge_page()
    # removes it from the tree, then compares oldchecksum with the page's
    # checksum.  7.2: oldchecksum is the pre-merge checksum of the same bytes,
    # so the page goes on to the stable tree search and merges (15 sharing).
    # 7.3: remove_rmap_item_from_tree() zeroed linear_page_index, i.e.
    # oldchecksum, so the visit only records the checksum: 8 volatile, 7
    # sharing; they merge on the scan after (15 again).
    steps = region("a", 16, "tag:same") + [
        {"op": "scan", "count": 2},
        {"op": "fill", "region": "a", "range": [0, 8], "pattern": "tag:same"},
        {"op": "scan", "count": 2}]
    old = predict(scen(steps), "linux-7.2")
    new = predict(scen(steps), "linux-7.3")
    assert [at(old, 5, n)["global.pages_sharing"] for n in (1, 2)] == [15, 15]
    assert [at(new, 5, n)["global.pages_sharing"] for n in (1, 2)] == [7, 15]
    assert at(new, 5, 1)["global.pages_volatile"] == 8
    assert get_profile("linux-7.3").has("stable_item_reset")
    assert not get_profile("linux-7.2.13").has("stable_item_reset")


def test_cow_broken_item_ages_from_zero_since_7_3():
    # smart_scan: 8 pages merge on scan 2 (visits at age 0 and 1: age 2), are
    # KSM on scan 3 (never aged), then get unique content.  7.2: visit 1 after
    # the write reads age 2 (-> 3, not skipped), visit 2 age 3 sets
    # remaining_skips = skip_age(3) = 1, visit 3 skips all 8 pages.  7.3: all 8
    # pages left the KSM page, so it is freed and its stable node stale.  Visit 1
    # of the first item finds it STABLE (not aged, not skipped); removing it
    # prunes the stale node, which zeroes all 8 items (remove_node_from_stable_
    # tree()).  The other 7 are then plain items at age 0: visits 1-3 age them
    # to 3, visit 4 sets remaining_skips, visit 5 skips 7 pages.  The first one
    # is a scan behind: skipped on visit 6 (when the 7 others, their skip used
    # up, are visited again: age 4 sets remaining_skips = 1).
    steps = region("a", 8, "tag:age8") + [
        {"op": "scan", "count": 3},
        {"op": "fill", "region": "a", "pattern": "unique"},
        {"op": "scan", "count": 6}]
    old = predict(scen(steps, ksm={"smart_scan": True}), "linux-7.2")
    new = predict(scen(steps, ksm={"smart_scan": True}), "linux-7.3")
    assert [at(old, 5, n)["global.pages_skipped"] for n in range(1, 7)] == [0, 0, 8, 8, 16, 24]
    assert [at(new, 5, n)["global.pages_skipped"] for n in range(1, 7)] == [0, 0, 0, 0, 7, 8]


# -- baseline and teardown -------------------------------------------------------------------------

def _fork_zero_steps():
    # 8 KSM zero pages (use_zero_pages), then a fork: the child maps the same 8
    # dirty zero PTEs; both processes exit at teardown
    return region("a", 8, "zero") + [{"op": "scan", "count": 2}, {"op": "fork", "child": "c"}]


def test_teardown_without_fork_counter_fix_leaves_zero_pages_negative():
    # before 4d6fc29f3634 fork does not add the child's 8 KSM zero pages to
    # ksm_zero_pages, but zapping them on exit subtracts them: 8 - 16 = -8, and
    # general_profit follows (-8 * 4096; no rmap items left after the scan)
    s = scen(_fork_zero_steps(), ksm={"use_zero_pages": True})
    for profile, zero in (("linux-6.16", -8), ("linux-6.18", 0)):
        pts = predict(s, profile)
        assert pts[0].op == "baseline" and pts[0].values["global.ksm_zero_pages"] == 0
        last = pts[-1]
        assert (last.op, last.step) == ("teardown", len(s.steps))
        assert last.values["global.ksm_zero_pages"] == zero, profile
        assert last.values["global.general_profit"] == zero * 4096
        assert last.values["global.pages_shared"] == 0
        assert not any(k.startswith(("proc.", "region.")) for k in last.values)


class _ShiftedEmulator:
    """The emulator as a 'kernel' whose absolute counters start from a residue
    left by an earlier scenario (ksm_zero_pages -128, as on Debian 6.16.12)."""

    label = "shifted"
    tunables_after: dict[str, str] = {}

    def __init__(self, profile, shift):
        self.inner = EmulatorBackend(profile)
        self.shift = shift

    def preflight(self) -> None:
        pass

    def events(self, scenarios, *, artifacts_dir=None):
        from ksmbench.observation import ObservationPoint

        for e in self.inner.events(scenarios):
            if isinstance(e, PointObserved):
                v = {k: (x + self.shift[k] if k in self.shift and x is not None else x)
                     for k, x in e.point.values.items()}
                e = PointObserved(e.scenario, ObservationPoint(e.point.step, e.point.op,
                                                               e.point.scan, v))
            yield e


def test_predictions_start_from_the_measured_baseline_and_residue_is_attributed(tmp_path):
    from ksmbench.results import RunDir, read_observations
    from ksmbench.runner import RunRecorder, Runner

    shift = {"global.ksm_zero_pages": -128, "global.general_profit": -128 * 4096}
    s = scen(_fork_zero_steps(), ksm={"use_zero_pages": True}, name="fork-zero")
    rundir = RunDir(tmp_path)
    outcome = Runner([RunRecorder(rundir, predictor=Predictor(), profile="linux-6.16")]).run_kernel(
        _ShiftedEmulator("linux-6.16", shift), [s])
    rundir.close()
    o = outcome.scenarios["fork-zero"]
    assert o.mismatches == [] and o.verdict == "match"
    # the scenario's own residue: -8 on top of the -128 it started from, predicted
    [r] = [r for r in o.residue if r.metric == "global.ksm_zero_pages"]
    assert (r.baseline, r.after, r.explained) == (-128, -136, True)
    assert "scenario fork-zero left ksm_zero_pages at -136" in r.describe()
    df = read_observations(rundir.path / "observations.csv")
    base = df[df["op"] == "baseline"]
    assert set(base["step"]) == {-1} and base["predicted"].isna().all()
    assert len(df[df["op"] == "teardown"]) == 11  # every global counter

    # a profile with the fork fix does not predict the residue: a finding
    rundir = RunDir(tmp_path / "b")
    outcome = Runner([RunRecorder(rundir, predictor=Predictor(), profile="linux-6.18")]).run_kernel(
        _ShiftedEmulator("linux-6.16", shift), [s])
    rundir.close()
    o = outcome.scenarios["fork-zero"]
    [r] = [r for r in o.residue if r.metric == "global.ksm_zero_pages"]
    assert not r.explained and "not explained (linux-6.18 predicts -128)" in r.describe()


# -- exec and userfaultfd-wp ----------------------------------------------------------

def _prctl_fork_exec_then_merge():
    return scen([{"op": "prctl", "merge": True}, {"op": "fork", "child": "c"},
                 {"op": "exec", "proc": "c"},
                 {"op": "mmap", "proc": "c", "region": "b", "pages": 8},
                 {"op": "fill", "proc": "c", "region": "b", "pattern": "tag:x"},
                 {"op": "scan", "count": 2}])


def test_exec_keeps_merge_any_by_version():
    s = _prctl_fork_exec_then_merge()
    # 6.18: kept across exec (3c6f33b7273a), registered at exec (3a9e567ca45f)
    new = predict(s, "linux-6.18")
    assert at(new, 2)["proc.c.ksm_merge_any"] == 1
    assert at(new, 5, 2)["region.c.b.distinct_frames"] == 1
    assert at(new, 5, 2)["global.pages_sharing"] == 7
    # 6.7-6.9: the flag survives, but the exec'd mm has no slot: nothing is scanned
    mid = predict(s, "linux-6.8")
    assert at(mid, 5, 2)["global.pages_sharing"] == 0
    assert at(mid, 5, 2)["proc.c.ksm_rmap_items"] == 0
    # 6.6: MMF_VM_MERGE_ANY was not in MMF_INIT_MASK: exec drops it
    old = predict(s, "linux-6.6")
    assert at(old, 5, 2)["region.c.b.distinct_frames"] == 8
    # the registered-at-exec behaviour only matters with the flag kept
    assert "ksm_execve" in get_profile("linux-6.10").flags
    assert "merge_any_exec" not in get_profile("linux-6.6").flags


def test_exec_drops_the_mappings_and_ksmd_frees_the_old_items_later():
    steps = region("a", 16, "tag:e") + region("z", 4, "zero") + [
        {"op": "scan", "count": 2}, {"op": "exec"}, {"op": "scan", "count": 1}]
    pts = predict(scen(steps, ksm={"use_zero_pages": True}), "linux-6.18")
    before, after, scanned = at(pts, 6, 2), at(pts, 7), at(pts, 8, 1)
    assert before["global.pages_sharing"] == 15 and before["global.ksm_zero_pages"] == 4
    # exit_mmap() of the old mm: KSM zero pages go at once, the rest waits for ksmd
    assert after["global.ksm_zero_pages"] == 0
    assert after["global.pages_sharing"] == 15
    assert after["proc.main.ksm_rmap_items"] == 0
    assert not any(k.startswith("region.main.") for k in after)
    assert scanned["global.pages_sharing"] == 0 and scanned["global.pages_volatile"] == 0


def _uffd_unmerge(protect_range=None):
    wp = {"op": "uffd_wp", "region": "a"}
    if protect_range:
        wp["range"] = protect_range
    return scen(region("a", 8, "tag:u") + [{"op": "scan", "count": 2}, wp,
                                           {"op": "madvise", "region": "a",
                                            "advice": "unmergeable"},
                                           {"op": "scan", "count": 1}])


def test_uffd_wp_unmerge_by_version():
    s = _uffd_unmerge()
    # 6.2+ (6cce3314b928): an unshare fault, which uffd-wp does not intercept
    assert at(predict(s, "linux-6.12"), 5)["region.main.a.distinct_frames"] == 8
    # 6.1: the fake write fault fails; the pages stay merged, and once ksmd has
    # dropped their rmap items no counter shows them
    old = predict(s, "linux-6.1")
    assert at(old, 5)["region.main.a.distinct_frames"] == 1
    assert at(old, 6, 1)["global.pages_sharing"] == 0
    assert at(old, 6, 1)["region.main.a.distinct_frames"] == 1
    # a partly protected range: only the protected pages stay merged on 6.1
    half = at(predict(_uffd_unmerge([0, 4]), "linux-6.1"), 5)
    assert half["region.main.a.distinct_frames"] == 5


def test_uffd_wp_bit_is_lost_when_ksm_replaces_the_pte():
    # protected before merging: replace_page() builds the new PTE without the
    # uffd-wp bit (mm/ksm.c has no userfaultfd handling), except for the page
    # that becomes the KSM page in place, which keeps its PTE
    s = scen(region("a", 8, "tag:w") + [{"op": "uffd_wp", "region": "a"},
                                         {"op": "scan", "count": 2},
                                         {"op": "madvise", "region": "a",
                                          "advice": "unmergeable"}])
    v = at(predict(s, "linux-6.1"), 5)
    assert v["region.main.a.distinct_frames"] == 8 - 1 + 1  # 7 unshared copies + the KSM page
    assert v["region.main.a.ksm"] == 1


def test_new_ops_agree_on_fast_and_reference_paths():
    for s in (_prctl_fork_exec_then_merge(), _uffd_unmerge([2, 6])):
        for prof in ("linux-6.1", "linux-6.8", "linux-6.18"):
            fast = predict(s, prof, fast=True)
            slow = predict(s, prof, fast=False)
            assert [(p.step, p.scan, p.values) for p in fast] == \
                   [(p.step, p.scan, p.values) for p in slow], (s.name, prof)
