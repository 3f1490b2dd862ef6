"""Real-kernel tests on this host: the whole built-in suite against the
emulator, every cell; the measured per-scan table, exactly; and the zero-page
series' behaviours, as this kernel's fitted profile says it has them (the
checks in kernel_expectations.py hold on 6.1 and 6.12 as well as on 6.18)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import host_ksm_usable
from kernel_expectations import (CHECKS, Cells, assert_every_cell_matches, fitted_flags, load,
                                 needs_swap, not_applicable)
from ksmbench.scenario import builtin_suite

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")]

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """The whole built-in suite on this host, judged by `ksmbench run`."""
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([*KSMBENCH, "run", "--kernel", "host", "--wait", "900", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout  # 1: judged below, cell by cell
    rundir = next(out.iterdir())
    df = load(rundir / "observations.csv")
    return rundir, df, proc


@pytest.fixture(scope="module")
def flags(observed):
    """This kernel's behaviours, fitted to its own observations (identify), not 6.18's."""
    _, df, _ = observed
    return fitted_flags(df, os.uname().release)


def test_every_cell_of_the_suite_matches_the_emulator(observed, flags):
    import json

    rundir, df, proc = observed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    meta = json.loads((rundir / "metadata.json").read_text())
    suite = {s.name for s in builtin_suite()}
    na = not_applicable(builtin_suite(), flags)  # prctl before 6.4, the advisor before 6.8
    na |= needs_swap(builtin_suite())  # ksmbench adds no swap to the host
    assert meta["verdicts"] == {name: "n/a" if name in na else "match" for name in suite}
    assert set(df.scenario) == suite - na
    compared = assert_every_cell_matches(df, meta["emulator_profile"])
    assert compared > 0.45 * len(df), (compared, len(df))


def test_a_forced_profile_without_a_counter_the_kernel_has_mismatches(tmp_path, flags):
    # on 6.6+ the kernel counts ksm_zero_pages and linux-6.1 predicts none; on an
    # older kernel it is the other way round
    forced = "linux-6.1" if "zero_page_tracking" in flags else "linux-6.18"
    proc = subprocess.run([*KSMBENCH, "run", "--kernel", "host", "--wait", "900", "--out",
                           str(tmp_path), "--profile", forced, "zero-pages"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ksm_zero_pages" in proc.stdout and "absent" in proc.stdout


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_kernel_behaviour(observed, flags, check):
    _, df, _ = observed
    check(Cells(df), flags)


def test_expectations_were_checked(observed):
    rundir, _, _ = observed
    exp = pd.read_csv(rundir / "expectations.csv")
    assert len(exp) >= 8
    assert exp.holds.all(), exp[~exp.holds]


def test_metadata(observed):
    import json

    rundir, df, _ = observed
    meta = json.loads((rundir / "metadata.json").read_text())
    assert meta["backend"] == "host"
    assert meta["kernel_release"] == os.uname().release
    assert meta["ksm_tunables_before"] == meta["ksm_tunables_after"]
    assert meta["started_at"] and meta["ended_at"]
    assert set(df.kernel) == {"host"}


def test_every_scenario_has_a_baseline_and_a_teardown(observed, flags):
    _, df, _ = observed
    cell = Cells(df)
    by_name = {s.name: s for s in builtin_suite()}  # the advisor's pages_to_scan is observed too
    for scenario in sorted(set(df.scenario)):
        rows = df[df.scenario == scenario]
        base = rows[rows.op == "baseline"]
        # the absolute counters only, at step -1, measured and not predicted
        assert set(base.step) == {-1} and len(base) == 8, scenario
        assert base.predicted.isna().all() and base.match.isna().all()
        down = rows[rows.op == "teardown"]
        advisor = {"tunable.pages_to_scan"} if by_name[scenario].ksm.advisor else set()
        assert set(down.metric) - {m for m in down.metric if m.startswith("global.")} == advisor
        down = down[down.metric.str.startswith("global.")]
        assert len(down) == 11 and down.step.nunique() == 1, scenario  # every global counter
        assert int(down.step.iloc[0]) == rows[~rows.op.isin(["baseline", "teardown"])].step.max() + 1
        assert (down.match.astype(str).str.lower() == "true").all(), down
        if "fork_counter_fix" not in flags:
            continue  # without 4d6fc29f3634 fork-inherited KSM zero pages leave a residue
        # every process has exited and ksmd has scanned: no rmap item, no KSM page,
        # no KSM zero page is left (Cells reads them from the scenario's baseline)
        for metric in ("global.pages_shared", "global.pages_sharing", "global.pages_unshared",
                       "global.pages_volatile", "global.ksm_zero_pages", "global.general_profit",
                       "global.stable_node_dups"):
            after = cell(scenario, metric, int(down.step.iloc[0]))
            assert after == 0, (scenario, metric, "baseline", cell(scenario, metric, -1))
