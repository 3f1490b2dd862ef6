"""Differential test: seeded random scenarios on this host's kernel vs the emulator.

Needs root and a writable /sys/kernel/mm/ksm (skipped otherwise); holds the
RunLock while the kernel is used.  On a mismatch the scenario is shrunk (each
candidate re-run on the kernel) and written as a TOML file that reproduces it;
the failure message names the file.

Size: ``KSMBENCH_DIFF_COUNT`` scenarios (default 8, about 10 s here), first
seed ``KSMBENCH_DIFF_SEED`` (default 1300: a batch that holds every op and
tunable added after v1, which a test checks), files written to
``KSMBENCH_DIFF_OUT`` (default: pytest's tmp_path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksmbench.compare.differential import HostRunner, Tally, compare, run_differential
from ksmbench.scenario import model as m
from ksmbench.scenario.generate import leaks_zero_pages, random_scenario, rebuild, shrink, valid
from ksmbench.scenario.loader import parse_scenario
from ksmbench.scenario.patterns import parse_pattern
from ksmbench.scenario.serialise import to_toml

from conftest import RUN_LOCK_WAIT, host_ksm_usable


def test_random_scenarios_are_valid_and_roundtrip_through_toml():
    for seed in range(200):
        scenario = random_scenario(seed)
        again = parse_scenario(to_toml(scenario, "comment\nlines"), source=scenario.source)
        assert again == scenario and again.region_pages == scenario.region_pages


#: the real run's default batch (test_random_scenarios_match_the_host_kernel)
DEFAULT_FIRST, DEFAULT_COUNT = 1300, 8
#: what the generator reaches beyond the v1 ops: the ops, advices and tunables added after v1
ISSUE14 = {"set:use_zero_pages", "set:max_page_sharing", "set:smart_scan",
           "set:merge_across_nodes", "scan:pages", "mprotect", "mremap:move", "mremap:in-place",
           "write_byte", "exec", "uffd_wp", "madvise:free", "madvise:dontfork",
           "madvise:wipeonfork", "madvise:cold", "madvise:pageout",
           "ksm:stable_node_chains_prune_millisecs"}


def features(scenario):
    out = set()
    for st in scenario.steps:
        if isinstance(st, m.Set):
            out.add(f"set:{st.tunable}")
        elif isinstance(st, m.Scan) and st.pages is not None:
            out.add("scan:pages")
        elif isinstance(st, m.Madvise):
            out.add(f"madvise:{st.advice}")
        elif isinstance(st, m.Mremap):
            out.add("mremap:move" if st.move else "mremap:in-place")
        else:
            out.add(st.op)
    if scenario.ksm.stable_node_chains_prune_millisecs:
        out.add("ksm:stable_node_chains_prune_millisecs")
    return out


def test_the_real_runs_seeded_batch_holds_every_new_op_and_tunable():
    seen = set().union(*(features(random_scenario(seed))
                         for seed in range(DEFAULT_FIRST, DEFAULT_FIRST + DEFAULT_COUNT)))
    assert ISSUE14 <= seen, ISSUE14 - seen
    # the same seed gives the same scenario
    assert random_scenario(DEFAULT_FIRST) == random_scenario(DEFAULT_FIRST)


def test_no_zero_pages_are_forked_out_of_dontfork_or_wipeonfork_ranges():
    """The host's ksm_zero_pages would leak until reboot (generate.py's docstring)."""
    hazards = 0
    for seed in range(400):
        s = random_scenario(seed)
        assert not leaks_zero_pages(s.steps, s.ksm)
        hazards += any(isinstance(st, m.Madvise) and st.advice in ("dontfork", "wipeonfork")
                       for st in s.steps) and any(isinstance(st, m.Fork) for st in s.steps)
    assert hazards > 10  # DONTFORK and fork still meet, without zero pages
    steps = [m.Mmap(0, m.MAIN, "a", 4), m.Fill(1, m.MAIN, "a", 0, 4, parse_pattern("zero")),
             m.Madvise(2, m.MAIN, "a", 0, 4, "mergeable"), m.Scan(3, m.MAIN),
             m.Madvise(4, m.MAIN, "a", 0, 2, "wipeonfork"), m.Fork(5, m.MAIN, "c"),
             m.Exit(6, "c")]
    scenario = m.Scenario("leak", "", m.KsmSettings(use_zero_pages=True), tuple(steps))
    assert leaks_zero_pages(steps, scenario.ksm)
    assert rebuild(scenario, steps) is None  # the shrinker never tries it
    assert rebuild(scenario, steps, m.KsmSettings()) is not None
    # use_zero_pages turned on by a step counts as well
    on = [m.Set(0, m.MAIN, "use_zero_pages", 1), *steps]
    assert leaks_zero_pages(on, m.KsmSettings())


def test_shrink_finds_a_small_failing_scenario():
    scenario = random_scenario(7, max_steps=30)
    # a stand-in for "mismatches on the kernel": still has a scan and a unique fill
    def fails(s):
        return (any(isinstance(st, m.Scan) for st in s.steps)
                and any(isinstance(st, m.Fill) and st.pattern.kind == "unique" for st in s.steps))
    if not fails(scenario):
        mmap = scenario.steps[0]
        unique = m.Fill(1, m.MAIN, mmap.region, 0, mmap.pages, parse_pattern("unique"))
        scenario = rebuild(scenario, [mmap, unique, *scenario.steps[1:]])
    small, tried = shrink(scenario, fails, budget=200)
    assert fails(small) and valid(small)
    assert len(small.steps) <= 4 < len(scenario.steps)
    assert tried > 0


def test_shrink_keeps_the_new_ops_valid():
    """Candidates with a step on a region they no longer map are written (and
    refused) on the way: tracking them must not fail (mprotect did)."""
    for seed in range(DEFAULT_FIRST, DEFAULT_FIRST + DEFAULT_COUNT):
        scenario = random_scenario(seed, max_steps=30)
        for op in sorted(features(scenario) & ISSUE14)[:4]:
            small, _ = shrink(scenario, lambda c, op=op: op in features(c), budget=60)
            assert valid(small) and op in features(small)
            assert len(small.steps) < len(scenario.steps)


def test_compare_reports_differences_and_missing_metrics():
    from ksmbench.observation import ObservationPoint

    a = [ObservationPoint(0, "mmap", None, {"x": 1, "y": None, "z": 3, "w": None, "u": 7})]
    b = [ObservationPoint(0, "mmap", None, {"x": 2, "y": 5, "w": None, "u": None}),
         ObservationPoint(1, "fill", None, {"x": 2})]
    cells = compare(a, b)
    # one side only is a mismatch too (y, z, u); both absent (w) is not; a point
    # only the prediction has is reported
    assert [(c.metric, c.observed, c.predicted) for c in cells] == [
        ("x", 1, 2), ("y", None, 5), ("z", 3, None), ("u", 7, None), ("<point>", None, 1)]
    # unless the metric is on the documented unmodelled list
    excused = compare(a, b, unmodelled=lambda metric: metric == "u")
    assert "u" not in {c.metric for c in excused} and len(excused) == 4


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_random_scenarios_match_the_host_kernel(tmp_path):
    from ksmbench.errors import Busy
    from ksmbench.kernel.lock import RunLock

    count = int(os.environ.get("KSMBENCH_DIFF_COUNT", str(DEFAULT_COUNT)))
    first = int(os.environ.get("KSMBENCH_DIFF_SEED", str(DEFAULT_FIRST)))
    out = Path(os.environ.get("KSMBENCH_DIFF_OUT", tmp_path))
    try:
        with RunLock(timeout=RUN_LOCK_WAIT):
            runner = HostRunner()
            tally = Tally()
            checked, findings, errors = run_differential(range(first, first + count), out,
                                                         runner=runner, tally=tally)
    except Busy as exc:
        pytest.skip(f"host KSM is in use: {exc.one_line()}")
    assert not errors, errors
    assert checked == count
    assert tally.cells > 50 * count  # every point's counters, not just a few
    if (first, count) == (DEFAULT_FIRST, DEFAULT_COUNT):  # the new ops ran on the kernel
        assert {"set:use_zero_pages", "set:max_page_sharing", "set:smart_scan",
                "set:merge_across_nodes", "scan:pages", "write_byte", "exec", "uffd_wp",
                "mprotect", "mremap", "madvise:free", "madvise:dontfork", "madvise:wipeonfork",
                "madvise:cold", "madvise:pageout"} <= set(tally.ops)
    assert not findings, "emulator and kernel disagree; shrunk reproducers: " + ", ".join(
        f"{f.path} ({f.cells[0].describe()})" for f in findings)


class _Ksmd:
    """A stand-in for /sys/kernel/mm/ksm, /proc and the tunable journal: run=1
    runs one batch, which completes a full scan when ``completes`` says so."""

    def __init__(self):
        self.full = 0
        self.switches = 0
        self.completes = False

    # sysfs
    def require(self):
        pass

    def has(self, name):
        return False

    def tunable(self, name):
        return "0"

    def read_int(self, name):
        return self.full

    # procfs
    def find_kthread(self, name):
        return 1

    def task_state(self, pid):
        return "S"

    def voluntary_switches(self, pid):
        self.switches += 1
        return self.switches

    # tunable changes
    def set(self, name, value):
        if name == "run" and value == 1 and self.completes:
            self.full += 1


def test_the_stepper_drains_lru_batches_before_a_batch_that_resumes_a_scan(monkeypatch):
    """Pages written between two batches of one scan must not sit in a per-CPU
    LRU batch when ksmd reaches them (stepping._drain_if_resuming; found by
    the differential test: seed 300009 merged 2, then 0, of 26 pages)."""
    from ksmbench.kernel import stepping

    drains = []
    monkeypatch.setattr(stepping.syscalls, "drain_lru_batches", lambda: drains.append(1))
    ksmd = _Ksmd()
    stepper = stepping.ScanStepper(ksmd, ksmd, ksmd)
    stepper.batch(5)                  # a new scan begins: ksmd drains itself
    assert drains == []
    stepper.batch(5)                  # resumes it
    assert len(drains) == 1
    ksmd.completes = True
    stepper.scan()                    # the rest of the scan: resumes it too
    assert len(drains) == 2
    stepper.scan()                    # a whole scan from the list head
    stepper.batch(5)                  # one that completes a scan leaves the cursor at the head
    assert len(drains) == 2
    ksmd.completes = False
    stepper.batch(5)
    stepper.unmerge_all()             # run=2 puts the cursor back at the head
    stepper.batch(5)
    assert len(drains) == 2


REPRODUCERS = sorted((Path(__file__).parent / "differential").glob("*.toml"))


def test_the_emulator_now_predicts_what_the_kernel_showed_in_each_reproducer():
    """A reproducer whose fix was in the emulator (its first line says
    "emulator:") records the kernel's observed values in its comment, as
    ``# step S [scan N] metric: observed X, predicted Y``: the emulator must
    now predict X.  The others were fixed on the kernel side (the stepper)."""
    import re

    from ksmbench.emulator.emulate import ScenarioRun
    from ksmbench.observation import BASELINE

    cell = re.compile(r"^# step (\d+)(?: scan (\d+))? (\S+): observed (-?\d+), predicted", re.M)
    checked = 0
    for path in REPRODUCERS:
        text = path.read_text()
        scenario = parse_scenario(text, source=str(path))
        points = {(p.step, p.scan): p.values for p in ScenarioRun(scenario, "linux-6.18.44").points()
                  if p.op != BASELINE}
        if "emulator:" not in text.splitlines()[1]:
            continue
        for step, scan, metric, observed in cell.findall(text):
            if metric.startswith("global.") and metric != "global.pages_volatile" and \
                    metric not in ("global.pages_unshared", "global.pages_scanned"):
                continue  # absolute counters: the file's comment has them from a live baseline
            got = points[(int(step), int(scan) if scan else None)][metric]
            assert got == int(observed), (path.name, step, scan, metric)
            checked += 1
    assert checked >= 4


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_the_reproducers_match_the_host_kernel():
    """Every reproducer the differential test shrank (tests/differential/),
    three times over: the LRU-batch one mismatched only some of the time."""
    from dataclasses import replace

    from ksmbench.compare.differential import check_scenarios
    from ksmbench.errors import Busy
    from ksmbench.kernel.lock import RunLock

    scenarios = [replace(parse_scenario(path.read_text(), source=str(path)),
                         name=f"{path.stem}-{i}") for path in REPRODUCERS for i in range(3)]
    try:
        with RunLock(timeout=RUN_LOCK_WAIT):
            results = check_scenarios(scenarios, HostRunner(), None)
    except Busy as exc:
        pytest.skip(f"host KSM is in use: {exc.one_line()}")
    for scenario, cells, error in results:
        assert error is None, (scenario.name, error)
        assert not cells, f"{scenario.name}: {cells[0].describe()}"


def test_a_scenario_the_kernel_cannot_run_is_not_applicable_only_where_the_profile_agrees(tmp_path):
    """debian:6.1 refuses every random scenario with prctl (6.4) as a whole;
    such a scenario is counted as not applicable, not as a mismatch of every
    predicted point, unless the profile says the kernel has all it needs."""
    from ksmbench.compare.differential import NOT_APPLICABLE

    class Refusing:
        release, profile = "6.1.0-test", "linux-6.1"

        def run(self, scenarios):
            return {s.name: ([], NOT_APPLICABLE + "PR_SET_MEMORY_MERGE is missing")
                    for s in scenarios}

    seeds = range(DEFAULT_FIRST, DEFAULT_FIRST + DEFAULT_COUNT)
    with_prctl = [seed for seed in seeds if "prctl" in features(random_scenario(seed))]
    assert 0 < len(with_prctl) < DEFAULT_COUNT
    tally = Tally()
    checked, findings, errors = run_differential(seeds, tmp_path, runner=Refusing(),
                                                 tally=tally)
    assert checked == 0 and not findings
    assert [int(n.split(":")[0].split()[1]) for n in tally.not_applicable] == with_prctl
    assert len(errors) == DEFAULT_COUNT - len(with_prctl)
    assert all("has every feature it needs" in e for e in errors)
