"""Verdicts without a kernel: the recorded reference run re-judged by the
current emulator, every cell; one-sided cells; the unmodelled list.

``results/reference/20261201-201124-cd3f`` holds what eight real kernels did
with the built-in suite and identify's probes (this host's 6.18.44 and
Debian's 6.1, 6.12, 6.16, 6.17, 6.18, 7.2 and 7.3; THP, swap and advisor
scenarios included), baseline and teardown points included.  Replaying it through ``ksmbench run``'s own Runner judges every
recorded cell against today's emulator in well under a second, so a profile
that is wrong only for a guest kernel fails here without booting it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from ksmbench.compare.differential import compare
from ksmbench.emulator import Predictor, predict, unmodelled_for
from ksmbench.compare.identify import load_rundir, score
from ksmbench.metrics import RSS_ANON, UNMODELLED, judge, unmodelled, unmodelled_markdown
from ksmbench.observation import BackendInfo, PointObserved, ScenarioFinished, ScenarioStarted
from ksmbench.pytest_plugin import KsmEmulator, ScenarioResult, comparable
from ksmbench.results import RunDir
from ksmbench.runner import RunRecorder, Runner, exit_status
from ksmbench.scenario import builtin_suite

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference" / "20261201-201124-cd3f"
#: runs of scenarios added to the suite after REFERENCE was recorded, on the
#: same kernels (none today: REFERENCE holds the whole suite)
SUPPLEMENTS: tuple[Path, ...] = ()


class Replay:
    """A backend that replays recorded observations (what a kernel did)."""

    def __init__(self, label: str, release: str, points: dict, skipped: dict[str, str]):
        self.label = label
        self.release = release
        self.points = points
        self.skipped = skipped
        self.tunables_after: dict[str, str] = {}

    def preflight(self) -> None:
        pass

    def events(self, scenarios, *, artifacts_dir=None):
        yield BackendInfo({"backend": "replay", "kernel_release": self.release})
        for s in scenarios:
            yield ScenarioStarted(s.name, len(s.steps), s.scan_count)
            for p in self.points.get(s.name, []):
                yield PointObserved(s.name, p)
            yield ScenarioFinished(s.name, skipped=self.skipped.get(s.name))


@pytest.fixture(scope="module")
def reference():
    observed, releases = load_rundir(REFERENCE)
    meta = json.loads((REFERENCE / "metadata.json").read_text())
    # the built-in suite only: an identify run also holds its probe scenarios
    suite = {s.name for s in builtin_suite()}
    observed = {k: {n: pts for n, pts in by.items() if n in suite} for k, by in observed.items()}
    verdicts = {k["kernel"]: {n: v for n, v in k["verdicts"].items() if n in suite}
                for k in meta["kernels"]}
    for extra in SUPPLEMENTS:
        more, more_releases = load_rundir(extra)
        # the same kernels (a supplement may leave out the host, judged live)
        assert more_releases and all(releases.get(k) == r for k, r in more_releases.items()), \
            f"{extra.name} ran on other kernels"
        assert not any(set(more[k]) & set(observed[k]) for k in more), "a scenario twice"
        # the built-in suite only: a supplement may also hold named sets (ltp),
        # whose LTP expectations are not all meant for every kernel
        for k in more:
            observed[k].update({n: pts for n, pts in more[k].items() if n in suite})
        for k in json.loads((extra / "metadata.json").read_text())["kernels"]:
            verdicts[k["kernel"]].update({n: v for n, v in k["verdicts"].items() if n in suite})
    return observed, releases, verdicts


def recorded_suite(reference, kernel):
    """The built-in scenarios the reference run recorded on ``kernel``: the
    suite as it was then (scenarios added since are judged by the live tests,
    test_host_kernel.py and test_vm_boot.py)."""
    return [s for s in builtin_suite() if s.name in reference[2][kernel]]


def replay(reference, kernel, tmp_path, profile="auto"):
    observed, releases, verdicts = reference
    skipped = {name: "recorded as n/a" for name, v in verdicts[kernel].items() if v == "n/a"}
    backend = Replay(kernel, releases[kernel], observed[kernel], skipped)
    rundir = RunDir(tmp_path)
    try:
        return Runner([RunRecorder(rundir, predictor=Predictor(), profile=profile)]).run_kernel(
            backend, recorded_suite(reference, kernel))
    finally:
        rundir.close()


@pytest.mark.parametrize("kernel,profile", [
    ("host", "linux-6.18.44"),
    ("debian:6.1", "linux-6.1"),
    ("debian:6.12", "linux-6.12.117"),
    ("debian:6.16", "linux-6.16.12"),
    ("debian:6.17", "linux-6.17.13"),
    ("debian:6.18", "linux-6.18.15"),
    ("debian:7.2", "linux-7.2.13"),
    ("debian:7.3", "linux-7.3.4"),
])
def test_reference_run_rejudged_cell_by_cell(reference, tmp_path, kernel, profile):
    started = time.monotonic()
    outcome = replay(reference, kernel, tmp_path)
    seconds = time.monotonic() - started
    observed, _, verdicts = reference
    assert outcome.profile == profile
    # the whole built-in suite was recorded on this kernel (n/a: it lacks an interface)
    scenarios = {s.name: s for s in recorded_suite(reference, kernel)}
    suite = set(scenarios)
    assert len(suite) >= 22
    assert set(outcome.scenarios) == suite
    not_run = {n for n, v in verdicts[kernel].items() if v == "n/a"}
    assert set(observed[kernel]) == suite - not_run
    problems = [mm.describe() for o in outcome.scenarios.values() for mm in o.mismatches]
    assert problems == [], f"{len(problems)} cells mismatch, e.g. {problems[:5]}"
    assert exit_status([outcome]) == 0
    recorded = sum(len(p.values) for pts in observed[kernel].values() for p in pts
                   if p.op != "baseline")
    assert recorded > 4000
    compared = sum(o.compared for o in outcome.scenarios.values())
    # every recorded cell is judged, except the unmodelled ones, the counters
    # this kernel lacks (absent on both sides) and the baseline (measured, the
    # start predictions are moved to)
    excused = sum(1 for name, pts in observed[kernel].items()
                  for p in pts if p.op != "baseline"
                  for metric, v in p.values.items()
                  if v is None or unmodelled_for(scenarios[name], profile)(metric))
    assert compared == recorded - excused
    assert compared > 0.45 * recorded
    assert seconds < 5, f"re-judging took {seconds:.1f} s"
    for name, o in outcome.scenarios.items():
        assert o.verdict == ("n/a" if name in not_run else "match"), name


def flags_of(profile):
    from ksmbench.emulator.profiles import get_profile

    return get_profile(profile).flags


# -- one side only --------------------------------------------------------------------------------

def test_forced_pre_series_profile_mismatches_on_a_6_18_kernel(reference, tmp_path):
    """ksm_zero_pages (and the 6.4+ counters) on the kernel, absent in linux-6.1."""
    outcome = replay(reference, "host", tmp_path, profile="linux-6.1")
    zero = outcome.scenarios["zero-pages"]
    assert zero.verdict == "mismatch"
    metrics = {mm.metric for mm in zero.mismatches}
    assert {"global.ksm_zero_pages", "proc.main.ksm_zero_pages", "global.general_profit"} <= metrics
    assert all(mm.predicted is None for mm in zero.mismatches
               if mm.metric.endswith("ksm_zero_pages"))
    assert exit_status([outcome]) == 1


def test_every_comparison_counts_a_one_sided_cell(reference):
    """run (above), identify, differential and the plugin's comparable agree."""
    observed, _, _ = reference
    s = next(x for x in builtin_suite() if x.name == "zero-pages")
    points = observed["host"]["zero-pages"]
    pred = predict(s, "linux-6.1")
    cells = compare(points, pred, unmodelled_for(s, "linux-6.1"))
    assert any(c.metric == "global.ksm_zero_pages" and c.predicted is None for c in cells)
    sc = score({"zero-pages": points}, [s], "linux-6.1")
    assert sc.presence >= len(points)  # at least ksm_zero_pages at every point
    assert score({"zero-pages": points}, [s], "linux-6.18.44").bad == 0
    kernel = ScenarioResult("zero-pages", "host", points)
    diffs = comparable(kernel, KsmEmulator("host").predict(s, "linux-6.1"))
    assert any(d[2] == "global.ksm_zero_pages" and d[4] is None for d in diffs)
    assert comparable(kernel, KsmEmulator("host").predict(s, "linux-6.18.44")) == []
    # the emulator predicting no ksm_zero_pages at all: the kernel's values are mismatches
    blanked = [type(p)(p.step, p.op, p.scan, {**p.values, "global.ksm_zero_pages": None})
               for p in predict(s, "linux-6.18.44")]
    assert any(c.metric == "global.ksm_zero_pages" for c in
               compare(points, blanked, unmodelled_for(s, "linux-6.18.44")))


def test_judge_and_the_unmodelled_list():
    assert judge(5, 5) is True and judge(5, 6) is False
    assert judge(None, None) is None
    assert judge(512, None) is False and judge(None, 0) is False
    assert judge(512, None, excused=True) is None
    assert unmodelled(f"proc.main.{RSS_ANON}") is not None
    on_616 = flags_of("linux-6.16")
    assert unmodelled("proc.main.rss_anon_scenario_pages", flags=on_616) is None
    assert unmodelled("proc.main.rss_anon_scenario_pages",
                      flags=flags_of("linux-6.12")) is not None
    assert unmodelled("global.ksm_zero_pages", flags=on_616) is None
    assert unmodelled("region.main.a.ksm", flags=on_616, thp=True) is not None
    assert unmodelled("global.full_scans", flags=on_616, thp=True) is None
    # after op reclaim: only the scenario RSS cell, on every kernel
    assert unmodelled("proc.c.rss_anon_scenario_pages", flags=on_616, reclaim=True) is not None
    assert unmodelled("region.c.a.present", flags=on_616, reclaim=True) is None
    assert unmodelled("global.pages_sharing", flags=on_616, reclaim=True) is None
    # every flag the list names exists
    from ksmbench.emulator.profiles import FLAG_NAMES

    assert {e.without_flag for e in UNMODELLED if e.without_flag} <= set(FLAG_NAMES)


def test_readme_shows_exactly_the_unmodelled_list():
    text = (ROOT / "README.md").read_text()
    start = text.index("Not modelled (predicted as no value).")
    block = text[start:].split("\n\n")[1]  # the bullets after the introduction
    bullets = [" ".join(b.split()) for b in re.split(r"\n(?=- )", block.strip())]
    assert bullets == [" ".join(line.split()) for line in unmodelled_markdown()]


# -- no predictor, no verdict ------------------------------------------------------------------

def test_run_without_a_loadable_emulator_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    from ksmbench import cli

    monkeypatch.setitem(sys.modules, "ksmbench.emulator", None)  # import fails
    status = cli.main(["run", "--kernel", "host", "zero-pages", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "emulator cannot be loaded" in err, err
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_run_with_a_predictor_that_fails_to_build_exits_2(monkeypatch, capsys, tmp_path):
    import ksmbench.emulator as emulator
    from ksmbench import cli

    class Broken:
        def __init__(self):
            raise RuntimeError("profile table is corrupt")

    monkeypatch.setattr(emulator, "Predictor", Broken)
    status = cli.main(["run", "--kernel", "emulator:linux-6.18", "zero-pages",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "profile table is corrupt" in err


def test_a_prediction_that_crashes_mid_run_is_an_error_not_a_match(tmp_path):
    from ksmbench.emulator.backend import EmulatorBackend

    class Crashing(Predictor):
        def predict(self, scenario, profile):
            raise ZeroDivisionError("oops")

    rundir = RunDir(tmp_path)
    outcome = Runner([RunRecorder(rundir, predictor=Crashing())]).run_kernel(EmulatorBackend("linux-6.18"),
                                                              builtin_suite()[:2])
    rundir.close()
    assert exit_status([outcome]) == 2
    assert "ZeroDivisionError" in outcome.error


# -- the host-kernel checks hold on the recorded 6.1 and 6.12 kernels too -------------------------

@pytest.fixture(scope="module")
def reference_frames(reference):
    from kernel_expectations import fitted_flags, load

    _, releases, _ = reference
    df = load(REFERENCE / "observations.csv")
    return {k: (df[df.kernel == k], fitted_flags(df[df.kernel == k], releases[k]))
            for k in releases}


@pytest.mark.parametrize("kernel", ["host", "debian:6.1", "debian:6.12"])
def test_host_kernel_checks_hold_on_every_recorded_kernel(reference_frames, kernel):
    """tests/test_host_kernel.py's expectations come from the fitted profile:
    applied to what 6.1 and 6.12 really did, they hold there too."""
    from kernel_expectations import CHECKS, Cells, assert_every_cell_matches

    df, flags = reference_frames[kernel]
    expected = {"host": {"zero_page_tracking", "smart_scan", "rss_exact"},
                "debian:6.1": {"ksm_stat"},
                "debian:6.12": {"zero_page_tracking", "kpf_ksm_all_anon", "fork_counter_fix"}}
    assert expected[kernel] <= flags
    if kernel == "debian:6.1":
        assert "zero_page_tracking" not in flags and "ksm_profit" not in flags
    for check in CHECKS:
        check(Cells(df), flags)
    assert assert_every_cell_matches(df, {"host": "linux-6.18.44", "debian:6.1": "linux-6.1",
                                          "debian:6.12": "linux-6.12.117"}[kernel]) > 2000


def test_run_reports_one_sided_cells_and_exits_1(capsys, tmp_path):
    """`ksmbench run` itself: a kernel with ksm_zero_pages (here the emulator's
    6.18 standing in as a backend) judged against a forced linux-6.1."""
    import csv

    from ksmbench import cli

    status = cli.main(["run", "--kernel", "emulator:linux-6.18", "zero-pages", "--profile",
                       "linux-6.1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "mismatch" in out and "global.ksm_zero_pages: observed 0, predicted absent" in out
    (rundir,) = tmp_path.iterdir()
    rows = list(csv.DictReader(open(rundir / "observations.csv")))
    zero = [r for r in rows if r["metric"] == "global.ksm_zero_pages" and r["op"] != "baseline"]
    assert zero and all(r["observed"] != "" and r["predicted"] == "" and r["match"] == "false"
                        for r in zero)
    # not modelled without rss_exact (linux-6.1): the value is recorded, not judged
    rss = [r for r in rows if r["metric"].endswith(".rss_anon_scenario_pages")]
    assert rss and all(r["observed"] != "" and r["predicted"] == "" and r["match"] == ""
                       for r in rss)
