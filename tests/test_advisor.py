"""The scan-time advisor (advisor_mode = "scan-time", 6.8, 4e5fa4f5eff6): its
spelling in [ksm], its model, the host's checks of the model's inputs, and
the host kernel against the model.

Expected values are worked out in the comments from scan_time_advisor() in
mm/ksm.c (the same in 6.8, 6.12 and 7.3), in the kernel's unsigned integer
arithmetic, not copied from the model:

    factor = target * 100 / scan_time            (0 -> 1)
    change = ewma(prev_change, scan_time * 100 / last_scan_time)
             with ewma(p, c) = (70 * p + 30 * c) / 100, last = scan_time at first
    pages  = pages_to_scan * 100 / factor * change / 100
    ppc    = pages_to_scan / cpu_percent         (0 -> 1)
    pages  = min(max(min(pages, ppc * max_cpu), ppc * 10), max_pages)
"""

from __future__ import annotations

import pytest

from conftest import host_ksm_usable
from ksmbench.emulator import predict
from ksmbench.emulator import advisor as adv
from ksmbench.emulator.advisor import Advisor, AdvisorCheck
from ksmbench.errors import ScenarioError
from ksmbench.kernel.stepping import AdvisorScan
from ksmbench.scenario import builtin, load_scenario, parse_scenario
from ksmbench.scenario import model as m
from ksmbench.scenario import named_set_dir
from ksmbench.scenario.loader import scenario_from_dict
from ksmbench.scenario.serialise import to_toml

PTS = "tunable.pages_to_scan"
#: the named set "advisor" (exact where ksmd uses under 10 ms of CPU per scan)
#: and the suite's advisor-batches (exact anywhere)
SET = ("advisor-scan-time", "advisor-clamps", "advisor-target")
NAMES = ("advisor-batches",) + SET


def scenario(name):
    if name in SET:
        return load_scenario(named_set_dir("advisor") / f"{name}.toml")
    return builtin(name)


def scen(steps, ksm=None):
    spec = {"name": "t", "step": steps}
    if ksm is not None:
        spec["ksm"] = ksm
    return scenario_from_dict(spec, source="<test>")


MERGE8 = [{"op": "mmap", "region": "a", "pages": 8},
          {"op": "fill", "region": "a", "pattern": "tag:x"},
          {"op": "madvise", "region": "a", "advice": "mergeable"}]


# -- the formula -------------------------------------------------------------------------------

def test_switching_on_sets_min_pages_and_a_fast_scan_multiplies_by_ten_up_to_max():
    a = Advisor(min_pages=500, max_pages=30000, max_cpu=70, target_scan_time=200)
    assert a.pages_to_scan == 500  # set_advisor_defaults()
    # first scan, ksmd's CPU since boot large: ppc 1; factor 20000;
    # 500*100/20000 = 2, change ewma(0, 100) = 30, 2*30/100 = 0; max(min(0, 70), 10) = 10
    assert a.after_scan(1, None) == 10
    # cpu_percent 1: ppc = 10; 10*100/20000 = 0; max(min(0, 700), 100) = 100
    assert a.after_scan(1, 1) == 100
    assert a.after_scan(1, 1) == 1000
    # 1000*100/20000 = 5; change ewma(51, 100) = 65; 5*65/100 = 3; max(3, 10000)
    assert a.after_scan(1, 1) == 10000
    assert a.after_scan(1, 1) == 30000  # 100000 capped by max_pages
    assert a.change == 82  # 30, 51, 65, 75, 82


def test_a_slow_or_busy_scan_follows_the_target():
    a = Advisor(min_pages=1000, max_pages=30000, max_cpu=70, target_scan_time=200)
    # scan_time 50 s, cpu_percent 20: factor 200*100/50 = 400; change ewma(0, 100) = 30;
    # 1000*100/400 = 250, *30/100 = 75; ppc 1000/20 = 50: min(75, 3500) = 75, max(75, 500) = 500
    assert a.after_scan(50, 20) == 500
    # scan_time 100 s (twice the last): factor 200; change ewma(30, 200) = 81;
    # 500*100/200 = 250, *81/100 = 202; ppc 500/5 = 100: min(202, 7000), max(202, 1000) = 1000
    assert a.after_scan(100, 5) == 1000
    # cpu_percent 80, scan_time 400 s: factor 50; change ewma(81, 400) = 176;
    # 1000*100/50 = 2000, *176/100 = 3520; ppc 12: min(3520, 840) = 840, max(840, 120) = 840
    assert a.after_scan(400, 80) == 840
    assert (a.change, a.scan_time) == (176, 400)


def test_reset_zeroes_the_context():
    a = Advisor(min_pages=7)
    a.after_scan(1, None)
    a.reset()
    assert (a.pages_to_scan, a.change, a.scan_time, a.scans) == (7, 0, 0, 0)


# -- the scenario spelling -------------------------------------------------------------------------

def test_the_advisor_is_spelled_in_ksm_and_round_trips():
    s = scen(MERGE8 + [{"op": "scan", "count": 2}],
             ksm={"advisor_mode": "scan-time", "advisor_min_pages_to_scan": 1,
                  "advisor_max_pages_to_scan": 900, "advisor_max_cpu": 40,
                  "advisor_target_scan_time": 3})
    assert s.ksm.advisor and s.ksm.advisor_max_pages_to_scan == 900
    text = to_toml(s)
    assert 'advisor_mode = "scan-time"' in text
    assert parse_scenario(text, source="<again>").ksm == s.ksm
    # a v1 file without them means what it meant: no advisor
    assert not scen(MERGE8).ksm.advisor


BAD = [
    ({"advisor_mode": "scan_time"}, [], "ksm.advisor_mode", "one of 'none', 'scan-time'"),
    ({"advisor_mode": True}, [], "ksm.advisor_mode", "a string"),
    ({"advisor_mode": "scan-time", "advisor_min_pages_to_scan": 0}, [],
     "ksm.advisor_min_pages_to_scan", "at least 1"),
    ({"advisor_mode": "scan-time", "advisor_target_scan_time": 0}, [],
     "ksm.advisor_target_scan_time", "refuses 0"),
    ({"advisor_mode": "scan-time", "stable_node_chains_prune_millisecs": 500}, [],
     "ksm.stable_node_chains_prune_millisecs", "per-batch prune clock"),
    ({"advisor_mode": "scan-time"}, [{"op": "scan", "pages": 3}], "pages", "belongs to the advisor"),
    ({}, [{"op": "set", "tunable": "advisor_mode", "value": 1}], "tunable", "set it in [ksm]"),
    ({}, [{"op": "set", "tunable": "advisor_max_cpu", "value": 1}], "tunable", "set it in [ksm]"),
]


@pytest.mark.parametrize("ksm,extra,field,words", BAD)
def test_bad_advisor_settings_are_one_line_errors(ksm, extra, field, words):
    with pytest.raises(ScenarioError) as info:
        scen(MERGE8 + extra, ksm=ksm)
    line = str(info.value)
    assert "\n" not in line and words in line and info.value.field == field, line


# -- the model ------------------------------------------------------------------------------

def test_before_6_8_the_scenario_is_not_applicable_in_the_model():
    s = scenario("advisor-scan-time")
    from ksmbench.emulator.emulate import ScenarioRun

    run = ScenarioRun(s, "linux-6.7")
    assert [p.op for p in run.points()] == ["baseline"]
    assert not any(run.supported(step) for step in s.steps)
    assert all(ScenarioRun(s, "linux-6.8").supported(step) for step in s.steps)


def test_the_emulator_backend_reports_n_a_before_6_8_as_the_host_does(tmp_path):
    from ksmbench.emulator.backend import EmulatorBackend
    from ksmbench.observation import PointObserved, ScenarioFinished

    for profile, verdict in (("linux-6.7", "n/a"), ("linux-6.8", None)):
        events = list(EmulatorBackend(profile).events([scenario("advisor-batches")]))
        done = [e for e in events if isinstance(e, ScenarioFinished)][0]
        points = [e for e in events if isinstance(e, PointObserved)]
        if verdict:
            assert done.skipped and "scan-time advisor (6.8)" in done.skipped and not points
        else:
            assert done.skipped is None and done.error is None and len(points) == 13


def test_counters_do_not_depend_on_the_advisor_where_pages_scanned_is_fixed():
    on = scenario("advisor-scan-time")
    off = scen(MERGE8 + [{"op": "scan", "count": 6}, {"op": "expect", "global.pages_shared": 1}])
    for profile in ("linux-6.12", "linux-6.18"):
        a = {(p.step, p.scan): {k: v for k, v in p.values.items() if k != PTS}
             for p in predict(on, profile)}
        b = {(p.step, p.scan): p.values for p in predict(off, profile)}
        assert a == b


def test_before_the_pages_scanned_fix_the_advisors_batches_count():
    # 6.8.0-6.8.11 (no 730cdc2c72c6): the first scan of advisor-scan-time is
    # 1-page batches; each of the 8 that hands on a page and does not complete
    # the scan adds 1 + 1 (the counter wraps), the 9th completes it and adds 0
    points = {(p.step, p.scan): p.values for p in predict(scenario("advisor-scan-time"), "linux-6.8")}
    assert points[(3, 1)]["global.pages_scanned"] == 16
    # from then on a batch of 10 or more pages completes each scan: nothing more
    assert points[(3, 6)]["global.pages_scanned"] == 16
    fixed = {(p.step, p.scan): p.values for p in predict(scenario("advisor-scan-time"), "linux-6.12")}
    assert [fixed[(3, n)]["global.pages_scanned"] for n in (1, 2, 6)] == [8, 16, 48]


def test_the_built_in_scenarios_predict_the_worked_out_sequences():
    def seq(name):
        return [p.values[PTS] for p in predict(scenario(name), "linux-6.18") if p.op == "scan"]

    assert seq("advisor-scan-time") == [10, 100, 1000, 10000, 30000, 30000]
    # min 100, target 1 s: factor 100, 100*100/100*30/100 = 30, min(30, 1*20) = 20,
    # max(20, 10) = 20; then ppc = pages_to_scan: x10 (200, 2000), 20000 capped at 5000
    assert seq("advisor-clamps") == [20, 200, 2000, 5000]
    # min 100, target 1 s, max_cpu 70: 30 (the EWMA's first 30% of the target
    # rate, under max_cpu), then 300, 3000
    assert seq("advisor-target") == [30, 300, 3000]
    # min 1, max 10: 10 from the first scan on (per_page_cost >= 1, floor >= 10)
    assert seq("advisor-batches") == [10] * 5


def test_the_named_set_and_the_suite():
    from ksmbench.scenario import builtin_names, resolve_scenarios

    assert [x.name for x in resolve_scenarios(["advisor"])] == sorted(SET)
    assert "advisor-batches" in builtin_names() and not set(SET) & set(builtin_names())


def test_random_scenarios_with_the_advisor_are_exact_anywhere():
    from ksmbench.scenario.generate import random_scenario

    seen = 0
    for seed in range(400000, 400200):
        s = random_scenario(seed)
        if not s.ksm.advisor:
            continue
        seen += 1
        assert s.ksm.advisor_max_pages_to_scan <= 10
        assert not any(isinstance(step, m.Scan) and step.pages is not None for step in s.steps)
        # whatever the scan times and CPU shares, the advisor ends at its cap
        c = AdvisorCheck(Advisor(s.ksm.advisor_min_pages_to_scan, s.ksm.advisor_max_pages_to_scan,
                                 s.ksm.advisor_max_cpu, s.ksm.advisor_target_scan_time))
        for _ in range(3):
            assert c.after_scan(range(1, 4), (0, 10**9), None) is None
        assert c.model.pages_to_scan == s.ksm.advisor_max_pages_to_scan
    assert 10 <= seen <= 50


def test_the_advisor_leaves_the_other_seeds_scenarios_alone(monkeypatch):
    from ksmbench.scenario import generate

    before = {seed: generate.random_scenario(seed) for seed in range(400000, 400060)}
    monkeypatch.setattr(generate, "ADVISOR_SHARE", 0.0)  # as before the advisor existed
    for seed, s in before.items():
        if not s.ksm.advisor:
            assert generate.random_scenario(seed) == s


# -- the host's check of the model's inputs -------------------------------------------------------

def record(seconds=0.05, last_kick=10**11, parked=10**11 + 10**6):
    return AdvisorScan(batches=1, seconds=seconds, cpu_first_kick=last_kick,
                       cpu_last_kick=last_kick, cpu_parked=parked, pages_to_scan=None)


def test_what_a_measured_scan_bounds():
    assert list(record(seconds=1.99).scan_times()) == [1]  # 0 and 1 s both count as 1
    assert list(record(seconds=3.2).scan_times()) == [1, 2, 3]
    first = record(last_kick=5 * 10**9, parked=5 * 10**9 + 3 * 10**6)
    assert first.cpu_ns(None) == (5 * 10**9, 5 * 10**9 + 3 * 10**6)  # all since boot
    later = record(last_kick=5 * 10**9 + 9 * 10**6, parked=5 * 10**9 + 11 * 10**6)
    # from the previous scan's end (between its last kick and its parking)
    assert later.cpu_ns(first) == (6 * 10**6, 11 * 10**6)
    assert AdvisorScan(1, 0.1, None, None, None, None).cpu_ns(first) is None


def check(**knobs):
    return AdvisorCheck(Advisor(**knobs))


def test_inputs_that_leave_one_outcome_pass():
    c = check(min_pages=100, max_pages=30000, max_cpu=20, target_scan_time=1)
    # first scan, ksmd ran 113 s since boot: cpu_percent 11300, per_page_cost 1: 20
    assert c.after_scan(range(1, 2), (113 * 10**9, 113 * 10**9 + 10**6), 20) is None
    # 0.2-3 ms of CPU: cpu_percent 1: 200
    assert c.after_scan(range(1, 2), (2 * 10**5, 3 * 10**6), 200) is None


def test_inputs_that_allow_another_outcome_stop_the_run():
    c = check(min_pages=100, max_pages=30000, max_cpu=20, target_scan_time=1)
    # ksmd has used 0.5 s since boot: cpu_percent 50, per_page_cost 2:
    # min(30, 2*20) = 30, max(30, 2*10) = 30, not 20
    why = c.after_scan(range(1, 2), (500 * 10**6, 501 * 10**6), 30)
    assert why and "could be 30 " in why and "modelled 20" in why
    c = check(min_pages=1)
    c.after_scan(range(1, 2), (10**10, 10**10 + 10**6), 10)
    # 5-25 ms of CPU: cpu_percent 1 or 2, per_page_cost 10 or 5: 100 or 50
    why = c.after_scan(range(1, 2), (5 * 10**6, 25 * 10**6), 100)
    assert why and "could be 50, 100" in why


def test_a_scan_of_two_seconds_matters_only_where_it_changes_the_outcome():
    # min 100, target 1: at scan_time 2 the factor halves: 100*100/50*30/100 = 60
    c = check(min_pages=100, target_scan_time=1)
    assert "could be 30, 60" in c.after_scan(range(1, 3), (10**11, 10**11 + 10**6), 30)
    # max_pages 10: 10 whatever the time and the CPU
    c = check(min_pages=1, max_pages=10)
    assert c.after_scan(range(1, 6), (10**6, 10**11), 10) is None
    assert c.after_scan(range(1, 6), (0, 10**10), 10) is None


def test_a_kernel_computing_otherwise_is_left_to_the_cells():
    c = check(min_pages=100, max_cpu=20, target_scan_time=1)
    # 55 is no outcome of any measured input: not a timing problem, a mismatch
    assert c.after_scan(range(1, 2), (113 * 10**9, 113 * 10**9 + 10**6), 55) is None
    assert c.states == {c.model.state()}


# -- the host kernel ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host_run():
    """The built-in advisor scenarios in one host session: the observations,
    what was measured around each scan, and the tunables before and after."""
    from ksmbench.backends.host import HostSession
    from ksmbench.errors import Busy
    from ksmbench.kernel.lock import RunLock
    from ksmbench.kernel.sysfs import KsmSysfs
    from conftest import RUN_LOCK_WAIT

    out = {}
    try:
        with RunLock(timeout=RUN_LOCK_WAIT):
            sysfs = KsmSysfs()
            if not sysfs.has("advisor_mode"):
                pytest.skip("this kernel has no scan-time advisor (6.8+)")
            before = sysfs.tunables()
            with HostSession() as session:
                for name in NAMES:
                    points = list(session.run(scenario(name)))
                    out[name] = (points, list(session.stepper.advisor_scans))
            after = sysfs.tunables()
    except Busy as exc:
        pytest.skip(f"host KSM is in use: {exc.one_line()}")
    return out, before, after


root = pytest.mark.root
ksm_writable = pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")


def judged(points, scenario):
    """(cells judged, cells that differ), as `ksmbench run` judges them."""
    from ksmbench.compare.differential import Tally, compare
    from ksmbench.emulator import unmodelled_for

    tally = Tally()
    cells = compare(points, predict(scenario, _profile()), unmodelled_for(scenario, _profile()),
                    tally)
    return tally.cells, len(cells)


@root
@ksm_writable
@pytest.mark.parametrize("name", NAMES)
def test_host_observations_match_the_model_and_the_inputs_were_measured(host_run, name):
    out, _, _ = host_run
    points, scans = out[name]
    cells, differ = judged(points, scenario(name))
    assert differ == 0 and cells > 150
    observed = [p.values[PTS] for p in points if p.op == "scan"]
    # one record per full scan, the teardown's included, each inside the model's inputs
    assert len(scans) == len(observed) + 1
    assert [s.pages_to_scan for s in scans[:-1]] == observed
    assert all(s.seconds < 2 and s.cpu_parked - s.cpu_first_kick < 10**7 for s in scans)
    if name == "advisor-scan-time":
        # 8 pages in 1-page batches: 8 hand one on, the 9th finds the list end
        assert [s.batches for s in scans[:2]] == [9, 1]


def _profile():
    import os

    from ksmbench.emulator.profiles import profile_for_release

    return profile_for_release(os.uname().release) or "linux-6.18"


@root
@ksm_writable
@pytest.mark.parametrize("variant", ["no_cpu_floor", "first_scan_cpu_1", "ewma_50"])
def test_a_kernel_whose_advisor_differs_would_mismatch(host_run, monkeypatch, variant):
    """The comparison can fail: the same observations judged against advisors
    that differ in one detail (the 10% CPU floor, the first scan's CPU input,
    the EWMA weight) mismatch in tunable.pages_to_scan."""
    out, _, _ = host_run
    if variant == "no_cpu_floor":
        monkeypatch.setattr(adv, "MIN_CPU", 5)
    elif variant == "ewma_50":
        monkeypatch.setattr(adv, "EWMA_WEIGHT", 50)
    else:
        real = Advisor.after_scan
        monkeypatch.setattr(Advisor, "after_scan",
                            lambda self, scan_time=1, cpu_percent=1: real(self, scan_time, 1))
    differ = sum(judged(out[name][0], scenario(name))[1]
                 for name in NAMES)
    assert differ > 0


@root
@ksm_writable
def test_the_host_tunables_come_back(host_run):
    _, before, after = host_run
    assert after == before
    assert after["advisor_mode"] == "none"

