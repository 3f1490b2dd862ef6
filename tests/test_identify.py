"""identify's analysis judged on what real kernels did.

The observations are the recorded reference run (``results/reference/``: the
built-in suite on this host's 6.18.44, Debian 6.1.176 and Debian 6.12.117),
not the emulator standing in for a kernel.  What identify must find there is
known from the kernels themselves: 6.1 predates the zero-page series (no
ksm_zero_pages file); Debian 6.12.117's fs/proc/page.c has the KPF_KSM test of
dee3d0bef2b0, and its selftests show the stable backport of the fork counter
fix 4d6fc29f3634 (a forked child's ksm_merging_pages starts at 0); on this
host the kpageflags fix is in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmbench.emulator import predict
from ksmbench.compare.identify import analyse, load_rundir, probe_scenarios, score
from ksmbench.scenario import builtin_suite

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "20261129-021707-c61b"


@pytest.fixture(scope="module")
def scenarios():
    return builtin_suite() + probe_scenarios()


@pytest.fixture(scope="module")
def recorded():
    return load_rundir(REFERENCE)


def observe_as(profile, scenarios):
    return {s.name: predict(s, profile) for s in scenarios}


def verdicts(result):
    return {v.name: v.supported for v in result.flags}


def test_debian_6_1_is_recognised_as_pre_series(recorded):
    observed, releases = recorded
    result = analyse(observed["debian:6.1"], builtin_suite(), releases["debian:6.1"])
    v = verdicts(result)
    assert result.base == "linux-6.1"
    assert v["zero_page_tracking"] is False and v["ksm_profit"] is False
    assert v["smart_scan"] is False and v["pages_scanned"] is False
    assert v["fork_counter_fix"] is False and v["kpf_ksm_all_anon"] is False
    assert v["ksm_stat"] is True
    assert result.fitted_score.bad == 0, result.fitted_score.examples
    presets = dict(result.presets)
    assert presets["linux-6.1"].bad == 0
    assert all(presets[p].bad > 0 for p in ("linux-6.6", "linux-6.12", "linux-6.18"))


def test_debian_6_12_backports_are_found_from_a_plain_6_12_start(recorded):
    """Started from linux-6.12.0 (no stable backports), the real observations
    show the fork counter fix and the kpageflags bug."""
    observed, releases = recorded
    obs = observed["debian:6.12"]
    result = analyse(obs, builtin_suite(), releases["debian:6.12"], base="linux-6.12.0")
    v = verdicts(result)
    assert "fork_counter_fix" not in result.base
    assert v["fork_counter_fix"] is True          # the stable backport, unexpected from 6.12.0
    assert v["kpf_ksm_all_anon"] is True          # every anon page reads KPF_KSM there
    assert v["zero_page_tracking"] is True and v["smart_scan"] is True
    assert v["ksm_stat_involvement"] is False      # 6.14
    assert result.fitted_score.bad == 0, result.fitted_score.examples
    assert "+fork_counter_fix" in result.fitted
    assert dict(result.presets)["linux-6.12"].bad > 0


def test_a_profile_wrong_for_a_guest_is_corrected_by_its_observations(recorded):
    """From the host's profile (the kpageflags fix in), 6.12's cells say the bug is there."""
    observed, releases = recorded
    obs = observed["debian:6.12"]
    result = analyse(obs, builtin_suite(), releases["debian:6.12"], base="linux-6.18.44")
    assert verdicts(result)["kpf_ksm_all_anon"] is True
    assert score(obs, builtin_suite(), "linux-6.18.44").bad > 100
    assert result.fitted_score.bad == 0


def test_this_hosts_recorded_kernel_fits_its_release_profile(recorded):
    observed, releases = recorded
    result = analyse(observed["host"], builtin_suite(), releases["host"])
    v = verdicts(result)
    assert result.fitted == result.base == "linux-6.18.44"
    assert v["ksm_stat_involvement"] is True and v["fork_counter_fix"] is True
    assert v["kpf_ksm_all_anon"] is False
    presets = dict(result.presets)
    assert all(presets[p].bad > 0 for p in ("linux-6.1", "linux-6.6", "linux-6.7", "linux-6.11",
                                            "linux-6.12"))


def test_probes_separate_the_flags_the_suite_cannot(scenarios):
    # each probe changes at least one cell when its flag flips
    for flag in ("checksum_first", "merge_any_kept", "fork_counter_fix"):
        on = observe_as(f"linux-6.18,+{flag}", probe_scenarios())
        assert score(on, probe_scenarios(), f"linux-6.18,-{flag}").bad > 0, flag


def test_identify_command_records_and_reanalyses(tmp_path, capsys):
    from argparse import Namespace

    from ksmbench.compare.identify import identify_command, load_rundir, main

    args = Namespace(kernel=["emulator:linux-6.12.57,-fork_counter_fix"], memory="2G", cpus=2,
                     accel="auto", modules=None, wait=0, out=str(tmp_path), jobs=None,
                     scheduler=None)
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
