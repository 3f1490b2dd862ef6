"""identify's analysis on observations with known behaviour.

The "kernel" here is the emulator itself with a chosen profile (observations
the model predicts for that profile); identify must recover the flags that
profile differs in from what the release string suggests.  The real-kernel
run is `ksmbench identify --kernel host` (see the report).
"""

from __future__ import annotations

import pytest

from ksmbench.emulator import predict
from ksmbench.identify import analyse, probe_scenarios, score
from ksmbench.scenario import builtin_suite


@pytest.fixture(scope="module")
def scenarios():
    return builtin_suite() + probe_scenarios()


def observe_as(profile, scenarios):
    return {s.name: predict(s, profile) for s in scenarios}


def verdicts(result):
    return {v.name: v.supported for v in result.flags}


def test_a_debian_612_without_the_fork_backport_is_recognised(scenarios):
    obs = observe_as("linux-6.12.57,-fork_counter_fix", scenarios)
    result = analyse(obs, scenarios, "6.12.57+deb13-amd64")
    v = verdicts(result)
    assert result.base == "linux-6.12.57"
    assert v["fork_counter_fix"] is False          # what differs from the release
    assert v["checksum_first"] is True and v["smart_scan"] is True
    assert v["zero_page_tracking"] is True and v["ksm_stat_involvement"] is False
    assert result.fitted_score.bad == 0
    assert "-fork_counter_fix" in result.fitted


@pytest.mark.parametrize("truth,release", [("linux-6.6", "6.6.30"), ("linux-6.1", "6.1.0-28-amd64"),
                                           ("linux-6.18", "6.18.44-fc-v657"),
                                           ("linux-6.11", "6.18.1")])
def test_fitted_profile_reproduces_the_observations(scenarios, truth, release):
    obs = observe_as(truth, scenarios)
    result = analyse(obs, scenarios, release)
    assert result.fitted_score.bad == 0, result.fitted_score.examples
    assert score(obs, scenarios, result.fitted).bad == 0
    best = min(result.presets, key=lambda p: p[1].bad)
    assert best[1].bad == 0


def test_probes_separate_the_flags_the_suite_cannot(scenarios):
    # each probe changes at least one cell when its flag flips
    for flag in ("checksum_first", "merge_any_kept", "fork_counter_fix"):
        on = observe_as(f"linux-6.18,+{flag}", probe_scenarios())
        assert score(on, probe_scenarios(), f"linux-6.18,-{flag}").bad > 0, flag


def test_identify_command_records_and_reanalyses(tmp_path, capsys):
    from argparse import Namespace

    from ksmbench.identify import identify_command, load_rundir, main

    args = Namespace(kernel=["emulator:linux-6.12.57,-fork_counter_fix"], memory="2G", cpus=2,
                     accel="auto", modules=None, wait=0, out=str(tmp_path))
    # the emulator's release string names 6.12.57, whose profile has the fork fix:
    # the observations say otherwise, so the fitted profile differs (status 0: it fits)
    assert identify_command(args) == 0
    out = capsys.readouterr().out
    assert "fork_counter_fix" in out and "absent" in out
    rundir = next(tmp_path.iterdir())
    observed, releases = load_rundir(rundir)
    label = "emulator:linux-6.12.57,-fork_counter_fix"
    assert releases[label] == "6.12.57-emulator"
    assert {"fork-after-merge", "probe-checksum-first"} <= set(observed[label])
    assert main([str(rundir)]) == 0
