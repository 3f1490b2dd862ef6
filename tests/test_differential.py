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

from ksmbench.differential import HostRunner, compare, run_differential
from ksmbench.scenario.generate import random_scenario, shrink, to_scenario, to_toml, valid
from ksmbench.scenario.loader import parse_scenario

from conftest import RUN_LOCK_WAIT, host_ksm_usable


def test_random_scenarios_are_valid_and_roundtrip_through_toml():
    for seed in range(200):
        spec = random_scenario(seed)
        scenario = to_scenario(spec)
        again = parse_scenario(to_toml(spec, "comment\nlines"), source="<roundtrip>")
        assert again.steps == scenario.steps and again.ksm == scenario.ksm


def test_shrink_finds_a_small_failing_scenario():
    spec = random_scenario(7, max_steps=30)
    # a stand-in for "mismatches on the kernel": still has a fork and a scan
    def fails(s):
        ops = [st["op"] for st in s["step"]]
        return "scan" in ops and any(st["op"] == "fill" and "unique" in st["pattern"]
                                     for st in s["step"])
    if not fails(spec):
        spec["step"].insert(1, {"op": "fill", "region": "r1", "pattern": "unique"})
    small, tried = shrink(spec, fails, budget=200)
    assert fails(small) and valid(small)
    assert len(small["step"]) <= 4 < len(spec["step"])
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
