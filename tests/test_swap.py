"""Swap (top-level ``swap = true``): the format, where a scenario may run, and
the emulator on small cases whose numbers follow by hand from the kernel
paths of README "Swap".  The built-in swap scenarios run in a guest with a
zram swap device in tests/test_vm_boot.py; the recorded guest runs are
re-judged in tests/test_verdicts.py.
"""

from __future__ import annotations

import pytest

from ksmbench.emulator import predict
from ksmbench.errors import NotApplicable, ScenarioError
from ksmbench.kernel.swap import SWAP_DEVICE_ENV, active_swaps
from ksmbench.scenario import builtin_suite, parse_scenario
from ksmbench.scenario.loader import scenario_from_dict
from ksmbench.scenario.serialise import to_toml

PROFILES = ("linux-6.1", "linux-6.12.117", "linux-6.18.44")


def scen(steps, *, swap=True, ksm=None):
    spec = {"name": "t", "step": steps}
    if swap is not None:
        spec["swap"] = swap
    if ksm:
        spec["ksm"] = ksm
    return scenario_from_dict(spec, source="<test>")


def mmap(pages, region="a"):
    return {"op": "mmap", "region": region, "pages": pages}


def step(op, rng=None, **kw):
    out = {"op": op, **kw}
    if rng:
        out["range"] = list(rng)
    return out


MERGEABLE = step("madvise", region="a", advice="mergeable")
PAGEOUT = step("madvise", region="a", advice="pageout")


def last(points, index):
    return [p for p in points if p.step == index][-1].values


# -- the format -------------------------------------------------------------------------------

def test_swap_is_an_optional_top_level_key_that_round_trips():
    with_swap = scen([mmap(4)])
    assert with_swap.swap is True
    text = to_toml(with_swap)
    assert "\nswap = true\n" in text
    assert parse_scenario(text, source="<test>") == with_swap
    # a v1 file, without the key, runs without swap as before, and is written without it
    v1 = scen([mmap(4)], swap=None)
    assert v1.swap is False and "swap" not in to_toml(v1)


def test_swap_must_be_true_or_false():
    with pytest.raises(ScenarioError) as info:
        scen([mmap(4)], swap=1)
    assert "swap" in str(info.value) and "\n" not in str(info.value)


def test_the_built_in_swap_scenarios_ask_for_swap():
    names = {s.name for s in builtin_suite() if s.swap}
    assert names == {"swap-pageout-ksm", "swap-ksm-page-mapped-once", "swap-fork-swapcache",
                     "swap-zero-pages", "swap-reclaim-ksm"}


# -- where a scenario may run -------------------------------------------------------------------

def _swaps(root, *devices):
    lines = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
    lines += [f"{d}                               partition\t1048572\t\t0\t\t-2" for d in devices]
    (root / "swaps").write_text("\n".join(lines) + "\n")


def _session(fake_proc, monkeypatch, device=None):
    from ksmbench.backends.host import HostSession

    if device:
        monkeypatch.setenv(SWAP_DEVICE_ENV, device)
    else:
        monkeypatch.delenv(SWAP_DEVICE_ENV, raising=False)
    return HostSession(proc_root=str(fake_proc))


def test_a_machine_without_swap_reports_swap_scenarios_not_applicable(fake_proc, monkeypatch):
    _swaps(fake_proc)
    assert active_swaps(str(fake_proc)) == []
    session = _session(fake_proc, monkeypatch)
    with pytest.raises(NotApplicable) as info:
        session.check_applicable(scen([mmap(4), PAGEOUT]))
    assert "needs a swap device" in str(info.value)
    session.check_applicable(scen([mmap(4), PAGEOUT], swap=None))  # modelled without swap


def test_a_kernel_without_swap_support_runs_its_other_scenarios(fake_proc, monkeypatch):
    """A kernel built without CONFIG_SWAP (a tinyconfig build that validate
    boots) has no /proc/swaps: no swap is in use, so a pageout scenario runs as
    modelled without swap, and a swap scenario is n/a with the guest's reason."""
    from ksmbench.kernel.swap import SWAP_UNAVAILABLE_ENV

    assert not (fake_proc / "swaps").exists()
    assert active_swaps(str(fake_proc)) == []
    monkeypatch.setenv(SWAP_UNAVAILABLE_ENV, "this kernel has no swap support (CONFIG_SWAP is off)")
    session = _session(fake_proc, monkeypatch)
    session.check_applicable(scen([mmap(4), PAGEOUT], swap=None))
    with pytest.raises(NotApplicable, match="could not make one: this kernel has no swap support"):
        session.check_applicable(scen([mmap(4), PAGEOUT]))


def test_a_guest_with_its_zram_device_runs_swap_scenarios(fake_proc, monkeypatch):
    _swaps(fake_proc)  # the device is off between scenarios
    session = _session(fake_proc, monkeypatch, device="/dev/zram0")
    assert session.swap is not None and session.swap.device == "/dev/zram0"
    session.check_applicable(scen([mmap(4), PAGEOUT]))
    session.check_applicable(scen([mmap(4), PAGEOUT], swap=None))


def test_swap_in_use_makes_pageout_without_swap_not_applicable(fake_proc, monkeypatch):
    _swaps(fake_proc, "/dev/sda2")
    assert active_swaps(str(fake_proc)) == ["/dev/sda2"]
    session = _session(fake_proc, monkeypatch)
    with pytest.raises(NotApplicable) as info:
        session.check_applicable(scen([mmap(4), PAGEOUT], swap=None))
    assert "/dev/sda2" in str(info.value) and "swap = true" in str(info.value)
    session.check_applicable(scen([mmap(4), step("read", region="a")], swap=None))
    session.check_applicable(scen([mmap(4), PAGEOUT]))  # the machine's own swap


# -- the emulator ---------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_pageout_swaps_out_pages_mapped_once_and_keeps_shared_ksm_pages(profile):
    # 4 pages of one content merge into one KSM page mapped 4 times (mapcount
    # 4: skipped), 4 unique pages are mapped once (swapped), 2 read faults map
    # the zero page (no folio: skipped)
    steps = [mmap(10), MERGEABLE, step("fill", (0, 4), region="a", pattern="tag:k"),
             step("fill", (4, 8), region="a", pattern="unique"),
             step("read", (8, 10), region="a"), step("scan", count=2), PAGEOUT,
             step("scan", count=1)]
    with_swap = predict(scen(steps), profile)
    after = last(with_swap, 6)
    assert after["region.main.a.present"] == 6
    assert after["region.main.a.ksm"] == 4 and after["region.main.a.zero_pfn"] == 2
    assert (after["global.pages_shared"], after["global.pages_sharing"]) == (1, 3)
    # the unique pages' rmap items wait in the unstable tree until ksmd passes
    assert after["global.pages_unshared"] == 4
    assert last(with_swap, 7)["global.pages_unshared"] == 0
    # the same steps without swap: nothing anonymous can be reclaimed
    without = predict(scen(steps, swap=None), profile)
    assert last(without, 6)["region.main.a.present"] == 10
    assert last(without, 7)["global.pages_unshared"] == 4


@pytest.mark.parametrize("profile", PROFILES)
def test_a_swapped_page_comes_back_with_its_content(profile):
    # page 0 swaps out with content x; page 1 gets x; the read fault brings
    # page 0 back (a new anonymous folio), and the two merge
    steps = [mmap(2), MERGEABLE, step("fill", (0, 1), region="a", pattern="tag:x"),
             step("madvise", (0, 1), region="a", advice="pageout"),
             step("fill", (1, 2), region="a", pattern="tag:x"),
             step("read", (0, 1), region="a"), step("scan", count=2)]
    points = predict(scen(steps), profile)
    assert last(points, 3)["region.main.a.present"] == 0
    assert last(points, 5)["region.main.a.present"] == 2
    assert last(points, 5)["region.main.a.zero_pfn"] == 0
    end = last(points, 6)
    assert (end["global.pages_shared"], end["global.pages_sharing"]) == (1, 1)


@pytest.mark.parametrize("profile", PROFILES)
def test_a_fork_shares_swap_entries_and_then_one_swap_cache_folio(profile):
    # after fork both PTEs hold the swap entry (count 2): the first read fault
    # leaves the folio in the swap cache and the second maps the same folio,
    # which KSM does not merge with itself; a write copies it
    steps = [mmap(2), MERGEABLE, step("fill", region="a", pattern="unique"), PAGEOUT,
             step("fork", child="c"), step("read", region="a"),
             step("read", region="a", proc="c"), step("scan", count=2),
             step("fill", (0, 1), region="a", proc="c", pattern="tag:w"),
             step("fill", (0, 1), region="a", pattern="tag:w"), step("scan", count=2)]
    points = predict(scen(steps), profile)
    shared = last(points, 7)
    assert shared["region.main.a.present"] == shared["region.c.a.present"] == 2
    assert (shared["global.pages_sharing"], shared["global.pages_unshared"]) == (0, 2)
    end = last(points, 10)
    # page 0 written in both: two copies of w merge; page 1 is still one folio
    assert (end["global.pages_shared"], end["global.pages_sharing"]) == (1, 1)
    assert end["global.pages_unshared"] == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_madvise_free_drops_swap_entries(profile):
    steps = [mmap(4), MERGEABLE, step("fill", region="a", pattern="unique"), PAGEOUT,
             step("madvise", (0, 2), region="a", advice="free"), step("read", region="a")]
    end = last(predict(scen(steps), profile), 5)
    # pages 0-1 read back empty (the zero page), pages 2-3 swap back in
    assert end["region.main.a.present"] == 4
    assert end["region.main.a.zero_pfn"] == 2
    assert end["region.main.a.distinct_frames"] == 2


@pytest.mark.parametrize("profile", PROFILES)
def test_a_ksm_page_mapped_once_is_swapped_and_its_stable_node_goes(profile):
    steps = [mmap(3), MERGEABLE, step("fill", region="a", pattern="tag:k"),
             step("scan", count=2), step("madvise", (1, 3), region="a", advice="dontneed"),
             step("madvise", (0, 1), region="a", advice="pageout"), step("scan", count=1)]
    points = predict(scen(steps), profile)
    assert last(points, 5)["region.main.a.present"] == 0
    # the rmap items stay on the stale node until ksmd passes
    assert (last(points, 5)["global.pages_shared"], last(points, 5)["global.pages_sharing"]) \
        == (1, 2)
    assert (last(points, 6)["global.pages_shared"], last(points, 6)["global.pages_sharing"]) \
        == (0, 0)


# -- op "reclaim" ---------------------------------------------------------------------------------

def test_reclaim_needs_swap_and_a_guest(fake_proc, monkeypatch):
    with pytest.raises(ScenarioError) as info:
        scen([mmap(4), step("reclaim")], swap=None)
    assert "swap = true" in str(info.value) and "step 1" in str(info.value)
    _swaps(fake_proc, "/dev/sda2")  # even with the machine's own swap: no cgroup made there
    session = _session(fake_proc, monkeypatch)
    with pytest.raises(NotApplicable) as na:
        session.check_applicable(scen([mmap(4), step("reclaim")]))
    assert "guest" in str(na.value)


@pytest.mark.parametrize("profile", PROFILES)
def test_a_ksm_pages_swap_entry_comes_back_as_one_copy_per_address(profile):
    # ksm_might_need_to_copy(): the swap-cache folio takes the first faulting
    # PTE's index; the 3 other addresses get copies, which merge again
    steps = [mmap(4), MERGEABLE, step("fill", region="a", pattern="tag:r"),
             step("scan", count=2), step("reclaim"), step("read", region="a"),
             step("scan", count=1)]
    points = predict(scen(steps), profile)
    gone = last(points, 4)  # every PTE of the KSM page is a swap entry; its node is stale
    assert gone["region.main.a.present"] == 0
    assert (gone["global.pages_shared"], gone["global.pages_sharing"]) == (1, 3)
    back = last(points, 5)
    assert back["region.main.a.present"] == 4 and back["region.main.a.distinct_frames"] == 4
    # the rmap items kept the old checksum: the copies merge in the first scan
    end = last(points, 6)
    assert (end["global.pages_shared"], end["global.pages_sharing"]) == (1, 3)


# -- random scenarios with swap (python -m ksmbench.compare.differential --swap) --------------

def test_random_swap_scenarios_load_back_and_both_model_paths_agree():
    from ksmbench.scenario.generate import random_scenario

    reclaims = pageouts = 0
    for seed in range(710000, 710020):
        scenario = random_scenario(seed, swap=True)
        assert scenario.swap
        assert parse_scenario(to_toml(scenario), source=scenario.source) == scenario
        reclaims += sum(s.op == "reclaim" for s in scenario.steps)
        pageouts += sum(getattr(s, "advice", None) == "pageout" for s in scenario.steps)
        for profile in ("linux-6.1", "linux-6.12.117"):
            fast = [p.values for p in predict(scenario, profile)]
            assert fast == [p.values for p in predict(scenario, profile, fast=False)], seed
    assert reclaims >= 5 and pageouts >= 3
    plain = random_scenario(710000)
    assert not plain.swap and not any(s.op == "reclaim" for s in plain.steps)


def test_reclaim_needs_the_multigen_lru(fake_proc, monkeypatch, tmp_path):
    from ksmbench.kernel import swap

    switch = tmp_path / "enabled"
    switch.write_text("0x0000\n")  # Debian 6.1's default
    assert not swap.multigen_lru_on(switch)
    switch.write_text("0x0007\n")
    assert swap.multigen_lru_on(switch)
    assert not swap.multigen_lru_on(tmp_path / "absent")  # no CONFIG_LRU_GEN
    _swaps(fake_proc)
    session = _session(fake_proc, monkeypatch, device="/dev/zram0")
    monkeypatch.setattr(swap, "multigen_lru_on", lambda: False)
    with pytest.raises(NotApplicable) as info:
        session.check_applicable(scen([mmap(4), step("reclaim")]))
    assert "multi-gen LRU" in str(info.value)
    monkeypatch.setattr(swap, "multigen_lru_on", lambda: True)
    session.check_applicable(scen([mmap(4), step("reclaim")]))


class _ScriptedProcfs:
    """Walk counts and RssAnon values read in turn, as the agent reads them."""

    def __init__(self, walks, counters):
        self.walks, self.counters = list(walks), list(counters)

    def anonymous_pages(self, pid):
        return self.walks.pop(0)

    def rss_anon_pages(self, pid):
        return self.counters.pop(0)


def test_the_rss_pair_is_kept_only_when_walks_and_counters_agree():
    """After op reclaim the agent's interpreter faults its own pages back while
    it reads: a window whose counter reads disagree (the one-page-low RssAnon
    once seen on Debian 6.12) is read again; a steady difference is kept."""
    from ksmbench.backends.agent import Agent

    class Reader:
        _rss_pair = Agent._rss_pair

    r = Reader()
    # counter 499 then 500 under steady walks: read again, keep the agreeing window
    r.procfs = _ScriptedProcfs([500] * 6, [499, 500, 500, 500])
    assert r._rss_pair() == (500, 500)
    # a walk that moves: read again
    r.procfs = _ScriptedProcfs([500, 501, 501, 501, 501, 501], [500, 501, 501, 501])
    assert r._rss_pair() == (501, 501)
    # a counter steadily one below the walks is measured, not hidden
    r.procfs = _ScriptedProcfs([500] * 3, [499, 499])
    assert r._rss_pair() == (499, 500)
    # never agreeing: bounded (8 windows), the last values
    r.procfs = _ScriptedProcfs([500] * 24, [1, 2] * 8)
    assert r._rss_pair() == (1, 500)


def test_after_op_reclaim_the_scenario_rss_cell_is_not_predicted():
    """metrics.UNMODELLED: with op reclaim the scenario RSS cell has no
    prediction on any kernel (and is excused), every other cell has one."""
    from ksmbench.emulator.emulate import unmodelled_for

    suite = {s.name: s for s in builtin_suite()}
    reclaim, pageout = suite["swap-reclaim-ksm"], suite["swap-pageout-ksm"]
    for profile in PROFILES:
        points = predict(reclaim, profile)
        rss = [v for p in points for k, v in p.values.items()
               if k.endswith(".rss_anon_scenario_pages")]
        assert rss and all(v is None for v in rss)
        assert all(p.values["global.pages_sharing"] is not None for p in points)
        assert unmodelled_for(reclaim, profile)("proc.c.rss_anon_scenario_pages")
        assert not unmodelled_for(reclaim, profile)("region.c.a.present")
    exact = [v for p in predict(pageout, "linux-6.18.44") for k, v in p.values.items()
             if k.endswith(".rss_anon_scenario_pages")]
    assert exact and all(v is not None for v in exact)
