"""Differential test: seeded random scenarios on this host's kernel vs the emulator.

Needs root and a writable /sys/kernel/mm/ksm (skipped otherwise); holds the
RunLock while the kernel is used.  On a mismatch the scenario is shrunk (each
candidate re-run on the kernel) and written as a TOML file that reproduces it;
the failure message names the file.

Size: ``KSMBENCH_DIFF_COUNT`` scenarios (default 8, about 10 s here), first
seed ``KSMBENCH_DIFF_SEED`` (default 1000), files written to
``KSMBENCH_DIFF_OUT`` (default: pytest's tmp_path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksmbench.compare.differential import HostRunner, compare, run_differential
from ksmbench.scenario import model as m
from ksmbench.scenario.generate import random_scenario, rebuild, shrink, valid
from ksmbench.scenario.loader import parse_scenario
from ksmbench.scenario.patterns import parse_pattern
from ksmbench.scenario.serialise import to_toml

from conftest import RUN_LOCK_WAIT, host_ksm_usable


def test_random_scenarios_are_valid_and_roundtrip_through_toml():
    for seed in range(200):
        scenario = random_scenario(seed)
        again = parse_scenario(to_toml(scenario, "comment\nlines"), source=scenario.source)
        assert again == scenario and again.region_pages == scenario.region_pages


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

    count = int(os.environ.get("KSMBENCH_DIFF_COUNT", "8"))
    first = int(os.environ.get("KSMBENCH_DIFF_SEED", "1000"))
    out = Path(os.environ.get("KSMBENCH_DIFF_OUT", tmp_path))
    try:
        with RunLock(timeout=RUN_LOCK_WAIT):
            runner = HostRunner()
            checked, findings, errors = run_differential(range(first, first + count), out,
                                                         runner=runner)
    except Busy as exc:
        pytest.skip(f"host KSM is in use: {exc.one_line()}")
    assert not errors, errors
    assert checked == count
    assert not findings, "emulator and kernel disagree; shrunk reproducers: " + ", ".join(
        f"{f.path} ({f.cells[0].describe()})" for f in findings)
