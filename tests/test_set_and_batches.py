"""Issue 14, part "tunables and batches": op "set", op "scan" with pages = N and
[ksm] stable_node_chains_prune_millisecs, in the loader and the emulator.

Expected numbers are derived in the comments from mm/ksm.c (6.1, 6.12, 6.18:
ksm_do_scan(), scan_get_next_rmap_item(), should_skip_rmap_item(),
max_page_sharing_store(), stable_node_dup()), not copied from the emulator.
The same scenarios run on real kernels through the built-in suite
(tests/test_host_kernel.py, tests/test_vm_boot.py).
"""

from __future__ import annotations

import pytest

from ksmbench.emulator import predict
from ksmbench.errors import ScenarioError
from ksmbench.metrics import parse_metric
from ksmbench.scenario import builtin, parse_scenario
from ksmbench.scenario import model as m
from ksmbench.scenario.loader import scenario_from_dict


def scen(steps, ksm=None):
    spec = {"name": "t", "step": steps}
    if ksm:
        spec["ksm"] = ksm
    return scenario_from_dict(spec, source="<test>")


def points(s, profile):
    return {(p.step, p.scan): p.values for p in predict(s, profile)}


def region(name, pages, pattern):
    return [{"op": "mmap", "region": name, "pages": pages},
            {"op": "fill", "region": name, "pattern": pattern},
            {"op": "madvise", "region": name, "advice": "mergeable"}]


# -- loader ---------------------------------------------------------------------------------

def test_set_and_partial_scan_load():
    s = scen([{"op": "set", "tunable": "use_zero_pages", "value": True},
              {"op": "set", "tunable": "max_page_sharing", "value": 7},
              {"op": "scan", "pages": 5}],
             ksm={"stable_node_chains_prune_millisecs": 2000})
    assert s.steps[0] == m.Set(0, "main", "use_zero_pages", 1)
    assert s.steps[1] == m.Set(1, "main", "max_page_sharing", 7)
    assert s.steps[2] == m.Scan(2, "main", 1, pages=5) and s.steps[2].op == "scan"
    assert s.ksm.stable_node_chains_prune_millisecs == 2000
    assert s.scan_count == 1  # one observation for the batch


BAD = [
    ({"op": "set", "tunable": "pages_to_scan", "value": 5}, "tunable", "owned by the scan stepper"),
    ({"op": "set", "tunable": "sleep_millisecs", "value": 5}, "tunable", "owned by the scan stepper"),
    ({"op": "set", "tunable": "run", "value": 1}, "tunable", "unmerge_all"),
    ({"op": "set", "tunable": "advisor_mode", "value": 1}, "tunable", "advisor"),
    ({"op": "set", "tunable": "stable_node_chains_prune_millisecs", "value": 0}, "tunable",
     "set it in [ksm]"),
    ({"op": "set", "tunable": "use_zero_page", "value": True}, "tunable", "unknown tunable"),
    ({"op": "set", "tunable": "smart_scan", "value": 1}, "value", "true or false"),
    ({"op": "set", "tunable": "max_page_sharing", "value": 1}, "value", "at least 2"),
    ({"op": "set", "tunable": "max_page_sharing"}, "value", "needs this field"),
    ({"op": "scan", "count": 1, "pages": 4}, "count", "not both"),
    ({"op": "scan", "pages": 0}, "pages", "at least 1"),
]


def test_a_scan_step_without_count_or_pages_is_one_full_scan():
    step = scen([{"op": "scan"}]).steps[-1]
    assert (step.count, step.pages) == (1, None)


@pytest.mark.parametrize("step,field,words", BAD)
def test_bad_set_and_scan_steps_are_one_line_errors(step, field, words):
    with pytest.raises(ScenarioError) as info:
        scen([step])
    line = str(info.value)
    assert "\n" not in line and words in line and info.value.field == field
    assert info.value.step == 0


@pytest.mark.parametrize("msecs,ok", [(0, True), (100, True), (2000, True), (10_000, True),
                                      (3_600_000, True), (50, False), (10_001, False),
                                      (3_599_999, False), (-1, False)])
def test_prune_millisecs_takes_only_values_with_a_deterministic_model(msecs, ok):
    spec = [{"op": "scan", "count": 1}]
    if ok:
        assert scen(spec, ksm={"stable_node_chains_prune_millisecs": msecs})
        return
    with pytest.raises(ScenarioError, match="no deterministic model"):
        scen(spec, ksm={"stable_node_chains_prune_millisecs": msecs})


def test_set_metrics_parse_and_expect_them():
    assert str(parse_metric("set.error")) == "set.error"
    assert str(parse_metric("tunable.smart_scan")) == "tunable.smart_scan"
    with pytest.raises(ValueError, match="unknown tunable"):
        parse_metric("tunable.sleep_millisecs")
    # observed in scenarios with the scan-time advisor (tests/test_advisor.py)
    assert str(parse_metric("tunable.pages_to_scan")) == "tunable.pages_to_scan"
    s = parse_scenario('name = "x"\n[[step]]\nop = "set"\ntunable = "smart_scan"\nvalue = false\n'
                       '[[step]]\nop = "expect"\n"set.error" = 0\n"tunable.smart_scan" = 0\n')
    assert dict(s.steps[1].values) == {"set.error": 0, "tunable.smart_scan": 0}


# -- emulator: partial batches ----------------------------------------------------------------

def test_a_batch_hands_on_n_pages_and_ends_where_a_full_scan_completes():
    # 10 unique pages: a batch of 4 allocates 4 rmap items; 6 more reach the
    # last page, but the scan completes only in the next call of
    # scan_get_next_rmap_item(), i.e. the next batch, which hands on nothing
    s = scen(region("a", 10, "unique") + [{"op": "scan", "pages": 4}, {"op": "scan", "pages": 6},
                                          {"op": "scan", "pages": 3}, {"op": "scan", "count": 1}])
    new, old = points(s, "linux-6.18"), points(s, "linux-6.6")
    assert [new[(i, 1)]["proc.main.ksm_rmap_items"] for i in (3, 4, 5, 6)] == [4, 10, 10, 10]
    assert [new[(i, 1)]["global.full_scans"] for i in (3, 4, 5, 6)] == [0, 0, 1, 2]
    # 730cdc2c72c6 (6.10): one per page handed on
    assert [new[(i, 1)]["global.pages_scanned"] for i in (3, 4, 5, 6)] == [4, 10, 10, 20]
    # before it: "ksm_pages_scanned += scan_npages - npages" after
    # "while (npages-- && ...)": a loop that ran out of pages leaves npages at
    # UINT_MAX, so N + 1; nothing for a batch that returned at a scan's end
    assert [old[(i, 1)]["global.pages_scanned"] for i in (3, 4, 5, 6)] == [5, 12, 12, 12]


def test_pages_smart_scan_skips_do_not_count_toward_a_batch():
    # 8 unique pages then 4 identical ones; after 4 full scans the unique pages
    # are skipped on their 5th visit (age 4, remaining_skips 1), so a batch of 2
    # passes all 8 and hands on pages 8 and 9
    s = scen(region("a", 12, "unique") + [
        {"op": "fill", "region": "a", "range": [8, 12], "pattern": "tag:skip"},
        {"op": "scan", "count": 4}, {"op": "scan", "pages": 2}])
    before, after = points(s, "linux-6.18")[(4, 4)], points(s, "linux-6.18")[(5, 1)]
    assert after["global.pages_skipped"] - before["global.pages_skipped"] == 8
    assert after["global.pages_scanned"] - before["global.pages_scanned"] == 2
    assert after["global.full_scans"] == before["global.full_scans"] == 4


def test_a_child_forked_while_the_cursor_is_inside_the_list_waits_for_the_next_scan():
    # partial-scan-fork-exit: after a batch of 20 the cursor rests in main;
    # __ksm_enter() puts 'late' just behind it, so the batch that completes
    # the scan (step 11) does not visit it, the next full scan (step 12) does
    p = points(builtin("partial-scan-fork-exit"), "linux-6.18")
    assert p[(11, 1)]["proc.late.ksm_rmap_items"] == 0
    assert p[(11, 1)]["global.full_scans"] == p[(9, 1)]["global.full_scans"] + 1
    assert p[(12, 1)]["proc.late.ksm_rmap_items"] == 48
    # the batch of 60 hands on main's 48 pages and kid's first 12 (new
    # content: checksum only, volatile); kid exits with the cursor on it, so
    # its 12 items stay until the next batch, which frees them and completes
    # the scan without handing on a page
    assert p[(6, 1)]["proc.kid.ksm_rmap_items"] == 12
    assert p[(7, None)]["global.pages_volatile"] == 12
    assert p[(8, 1)]["global.pages_volatile"] == 0
    assert p[(8, 1)]["global.full_scans"] == p[(7, None)]["global.full_scans"] + 1
    assert p[(8, 1)]["global.pages_scanned"] == p[(7, None)]["global.pages_scanned"]


# -- emulator: set ------------------------------------------------------------------------------

def test_max_page_sharing_is_refused_while_ksm_pages_exist():
    s = scen(region("a", 20, "tag:mps") + [
        {"op": "scan", "count": 2},
        {"op": "set", "tunable": "max_page_sharing", "value": 4},
        {"op": "unmerge_all"},
        {"op": "set", "tunable": "max_page_sharing", "value": 4},
        {"op": "scan", "count": 2}])
    for profile in ("linux-6.1", "linux-6.12", "linux-6.18"):
        p = points(s, profile)
        assert p[(4, None)]["set.error"] == 16  # -EBUSY: pages_shared is 1
        assert p[(4, None)]["tunable.max_page_sharing"] == 256
        assert p[(6, None)]["set.error"] == 0 and p[(6, None)]["tunable.max_page_sharing"] == 4
        # 20 pages, 4 per KSM page: 5 dups of one chain, 15 sharing
        last = p[(7, 2)]
        assert (last["global.pages_shared"], last["global.pages_sharing"],
                last["global.stable_node_chains"], last["global.stable_node_dups"]) == (5, 15, 1, 5)


def test_smart_scan_set_reads_na_where_the_kernel_lacks_it():
    s = scen([{"op": "set", "tunable": "smart_scan", "value": False}])
    assert points(s, "linux-6.1")[(0, None)]["set.error"] is None
    assert points(s, "linux-6.1")[(0, None)]["tunable.smart_scan"] is None
    assert points(s, "linux-6.7")[(0, None)]["tunable.smart_scan"] == 0


def test_smart_scan_off_freezes_the_skip_schedule():
    # set-smart-scan-midrun: 64 unique pages, skipped on their 5th visit; off
    # for 3 scans (no skip, age and remaining_skips untouched); on again the
    # items continue as on their 6th visit: not skipped (remaining_skips =
    # skip_age(5) = 2), then skipped twice, then not (skip_age(8) = 4), skipped
    p = points(builtin("set-smart-scan-midrun"), "linux-6.18")
    skipped = [p[(4, n)]["global.pages_skipped"] for n in range(1, 6)]
    assert skipped == [0, 0, 0, 0, 64]
    assert [p[(6, n)]["global.pages_skipped"] for n in (1, 2, 3)] == [64, 64, 64]
    assert [p[(8, n)]["global.pages_skipped"] for n in range(1, 7)] == [64, 128, 192, 192, 256, 320]


def test_use_zero_pages_off_keeps_existing_ksm_zero_pages():
    # set-use-zero-pages-flip: 64 KSM zero pages stay through the flip; the 64
    # zero pages written while it is off merge into one KSM page
    p = points(builtin("set-use-zero-pages-flip"), "linux-6.12")
    assert p[(4, None)]["global.ksm_zero_pages"] == 64 and p[(4, None)]["set.error"] == 0
    assert (p[(6, 2)]["global.pages_shared"], p[(6, 2)]["global.pages_sharing"]) == (1, 63)
    assert p[(6, 2)]["global.ksm_zero_pages"] == 64
    # on again: 6.11+ tries the zero page before the stable tree, 6.1 the tree first
    assert p[(9, 3)]["global.ksm_zero_pages"] == 128
    old = points(builtin("set-use-zero-pages-flip"), "linux-6.1")
    assert old[(9, 3)]["global.pages_sharing"] == 127


# -- emulator: the prune clock -------------------------------------------------------------------

def test_the_prune_clock_decides_whether_a_stale_dup_goes_at_a_walk():
    # prune-clock-*: dups K3 (2 items, room), K2, K1 (stale) in hlist order;
    # the second visit of z walks the chain (6.11+, checksum_first).  Due
    # (0 ms, or a batch after the chain's last prune): every dup is looked at
    # and K1 is pruned; not due: the walk stops at K3 and K1 stays
    due = points(builtin("prune-clock-default"), "linux-6.12")[(10, 1)]
    never = points(builtin("prune-clock-never"), "linux-6.12")[(10, 1)]
    assert (due["global.stable_node_dups"], due["global.pages_shared"],
            due["global.pages_sharing"]) == (2, 2, 4)
    assert (never["global.stable_node_dups"], never["global.pages_shared"],
            never["global.pages_sharing"]) == (3, 3, 6)
    zero = scenario_with_prune(builtin("prune-clock-never"), 0)
    assert points(zero, "linux-6.12")[(10, 1)]["global.stable_node_dups"] == 2


def scenario_with_prune(s: m.Scenario, msecs: int) -> m.Scenario:
    from dataclasses import replace

    return replace(s, ksm=replace(s.ksm, stable_node_chains_prune_millisecs=msecs))


def test_per_batch_clock_prunes_once_per_batch():
    from ksmbench.emulator.machine import Ksm, Settings, SNode
    from ksmbench.emulator.profiles import get_profile

    k = Ksm(get_profile("linux-6.18"), Settings(prune="per-batch"))
    chain = SNode(0, 1, is_chain=True)
    k.batches = 3
    chain.prune_batch = 3  # created (or pruned) in this batch
    assert not k._prune_due(chain)
    k.batches = 4
    assert k._prune_due(chain) and chain.prune_batch == 4
    assert not k._prune_due(chain)  # once per batch


# -- the host's side of the prune clock (no kernel needed) ----------------------------------------

class _NoPruneFile:
    """A sysfs without stable_node_chains_prune_millisecs: nothing is written."""

    def has(self, name):
        return False


def test_the_stepper_spaces_batches_by_the_interval_and_refuses_a_slow_batch():
    import time

    from ksmbench.errors import WaitTimeout
    from ksmbench.kernel.stepping import PRUNE_MARGIN, ScanStepper

    stepper = ScanStepper(_NoPruneFile(), None, None)
    stepper.hold_prune_clock(200, "per-batch")
    stepper._after_batch(stepper._before_batch(), "first")  # the first batch waits for nothing
    ended = time.monotonic()
    started = stepper._before_batch()
    assert started - ended >= 0.2 + PRUNE_MARGIN - 0.01  # the whole interval since the last batch
    with pytest.raises(WaitTimeout, match="no longer once per batch"):
        stepper._after_batch(started - 0.2, "step 3")  # a batch as long as the interval
    stepper.hold_prune_clock(3_600_000, "never")
    stepper._clock_start -= 3600  # an hour into the scenario
    with pytest.raises(WaitTimeout, match="chains may now be pruned"):
        stepper._after_batch(stepper._before_batch(), "step 4")
