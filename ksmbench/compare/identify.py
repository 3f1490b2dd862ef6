"""``ksmbench identify --kernel K``: which KSM behaviours a kernel has, flag by flag.

The built-in suite plus a few probe scenarios (below) run on the kernel; then
every behaviour flag of the emulator (:mod:`ksmbench.emulator.profiles`) is
judged by prediction: starting from the profile its release suggests, the
flag is switched on and off and the two predictions are compared with what
the kernel did.  The setting with fewer disagreeing cells is what the
observations support; equal counts mean the probes do not tell (reported as
such, never guessed).  Flags are revisited until no single change improves
the fit, which gives the *fitted* profile; the named presets are scored too.

This is how a user checks whether a kernel carries a patch, e.g. a Debian
6.12.y kernel and the fork counter fix 4d6fc29f3634 (backported to stable).

A cell counts as disagreeing when both sides have a value and they differ,
or when exactly one side lacks the counter (a missing sysfs file or ksm_stat
line is evidence too), unless the metric is on the documented unmodelled list
(:data:`ksmbench.metrics.UNMODELLED`), the same rule as ``ksmbench run``.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..console import esc, make_console
from ..metrics import judge
from ..observation import BASELINE, TEARDOWN, ObservationPoint, baseline_of, rebase
from ..scenario import builtin_set, builtin_suite
from ..scenario import model as m

def probe_scenarios() -> list[m.Scenario]:
    """Probes for behaviours the built-in suite does not separate (the
    built-in set ``probes``: ksmbench/scenario/probes/, each file says which
    flag it separates and why)."""
    return builtin_set("probes")


@dataclass
class Score:
    compared: int = 0
    differ: int = 0
    presence: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return self.differ + self.presence


_PREDICTIONS: dict[tuple[m.Scenario, frozenset], dict] = {}


def _predicted(scenario: m.Scenario, profile: str, observed_baseline=None) -> dict:
    """Predictions by (scenario, flag set): profiles with the same flags behave
    alike.  Absolute counters start from ``observed_baseline`` (the scenario's
    measured baseline point values), when given."""
    from ..emulator import predict
    from ..emulator.profiles import get_profile

    prof = get_profile(profile)
    key = (scenario, prof.flags)
    if key not in _PREDICTIONS:
        if len(_PREDICTIONS) > 4096:
            _PREDICTIONS.clear()
        _PREDICTIONS[key] = predict(scenario, prof)
    points = _PREDICTIONS[key]
    if observed_baseline is not None:
        points = rebase(points, observed_baseline)
    return {(p.step, p.scan): p for p in points}


def residue(observed: Mapping[str, Sequence[ObservationPoint]], scenarios: Sequence[m.Scenario],
            profile: str, kernel: str = "") -> list:
    """Every scenario's residue (absolute counters not back at their baseline
    after teardown), each with whether ``profile`` predicts it."""
    from ..runner import find_residue

    out = []
    for scenario in scenarios:
        points = observed.get(scenario.name)
        if not points:
            continue
        base = baseline_of(points)
        teardown = next((p for p in points if p.op == TEARDOWN), None)
        pred = _predicted(scenario, profile, base.values if base is not None else None)
        predicted_teardown = pred.get((teardown.step, teardown.scan)) if teardown else None
        out += find_residue(scenario.name, kernel, base, teardown, predicted_teardown, profile)
    return out


def score(observed: Mapping[str, Sequence[ObservationPoint]], scenarios: Sequence[m.Scenario],
          profile: str) -> Score:
    from ..emulator import unmodelled_for

    out = Score()
    for scenario in scenarios:
        points = observed.get(scenario.name)
        if not points:
            continue
        base = baseline_of(points)
        pred = _predicted(scenario, profile, base.values if base is not None else None)
        excused = unmodelled_for(scenario, profile)
        for o in points:
            if o.op == BASELINE:
                continue  # the measured start the predictions were moved to
            p = pred.get((o.step, o.scan))
            if p is None:
                # the kernel got further than the profile allows (e.g. it ran a
                # prctl the profile's kernel would refuse): every value it
                # reported counts against the profile
                missing = sum(1 for v in o.values.values() if v is not None)
                out.presence += missing
                if missing and len(out.examples) < 3:
                    out.examples.append(f"{scenario.name} step {o.step}: observed, not predicted")
                continue
            for metric in {**o.values, **p.values}:
                ov, pv = o.values.get(metric), p.values.get(metric)
                verdict = judge(ov, pv, excused=excused(metric))
                if verdict is None:
                    continue
                if ov is not None and pv is not None:
                    out.compared += 1
                    if not verdict:
                        out.differ += 1
                        if len(out.examples) < 3:
                            out.examples.append(f"{scenario.name} step {o.step}"
                                                f"{' scan ' + str(o.scan) if o.scan else ''} "
                                                f"{metric}: observed {ov}, predicted {pv}")
                else:  # one side only, and not on the unmodelled list
                    out.presence += 1
                    if len(out.examples) < 3:
                        out.examples.append(f"{scenario.name} step {o.step} {metric}: observed "
                                            f"{'absent' if ov is None else ov}, predicted "
                                            f"{'absent' if pv is None else pv}")
    return out


def _with(base: str, flags: Mapping[str, bool]) -> str:
    from ..emulator.profiles import get_profile

    prof = get_profile(base.split(",")[0])
    mods = [("+" if on else "-") + name for name, on in sorted(flags.items())
            if (name in prof.flags) != on]
    return ",".join([base.split(",")[0], *mods])


@dataclass
class FlagVerdict:
    name: str
    expected: bool          # what the release suggests
    supported: bool | None  # what the observations support (None: cannot tell)
    bad_on: int
    bad_off: int
    #: cells compared with the flag on minus with it off (predictions that
    #: only exist with the flag, e.g. rss_anon_scenario_pages with rss_exact)
    extra_on: int = 0

    def describe(self) -> str:
        if self.supported is True:
            return "present"
        if self.supported is False:
            return "absent"
        if self.extra_on > 0:
            return f"consistent with present ({self.extra_on} more cells agree)"
        return "cannot tell"


@dataclass
class Identification:
    release: str | None
    base: str
    fitted: str
    fitted_score: Score
    flags: list[FlagVerdict]
    presets: list[tuple[str, Score]]
    scenarios: int
    points: int
    #: the fitted profile's view of each scenario's residue (runner.Residue)
    residue: list = field(default_factory=list)


def analyse(observed: Mapping[str, Sequence[ObservationPoint]], scenarios: Sequence[m.Scenario],
            release: str | None, *, base: str | None = None, kernel: str = "") -> Identification:
    from ..emulator.profiles import FLAG_NAMES, PRESETS, get_profile, profile_for_release

    base = base or profile_for_release(release or "") or "linux-6.18"
    base_flags = get_profile(base).flags
    setting = {name: name in base_flags for name in FLAG_NAMES}
    cache: dict[str, Score] = {}

    def sc(flags: Mapping[str, bool]) -> Score:
        name = _with(base, flags)
        if name not in cache:
            cache[name] = score(observed, scenarios, name)
        return cache[name]

    # coordinate descent: flip a flag when that fits strictly better
    for _ in range(3):
        changed = False
        for name in FLAG_NAMES:
            here = sc(setting).bad
            flipped = {**setting, name: not setting[name]}
            if sc(flipped).bad < here:
                setting = flipped
                changed = True
        if not changed:
            break
    verdicts = []
    for name in FLAG_NAMES:
        s_on, s_off = sc({**setting, name: True}), sc({**setting, name: False})
        on, off = s_on.bad, s_off.bad
        supported = None if on == off else on < off
        verdicts.append(FlagVerdict(name, name in base_flags, supported, on, off,
                                    s_on.compared - s_off.compared))
    fitted = _with(base, setting)
    presets = [(p, score(observed, scenarios, p)) for p in (*PRESETS, base) if p]
    npoints = sum(len(v) for v in observed.values())
    return Identification(release, base, fitted, sc(setting), verdicts, presets,
                          len(observed), npoints, residue(observed, scenarios, fitted, kernel))


def identify_command(args: Namespace) -> int:
    """Run the probes on each kernel (observations go to a run directory under
    ./results, with the release's profile as prediction), then judge the flags."""

    from ..backends import expand_kernel_specs, resolve_backend
    from ..emulator import Predictor
    from ..kernel.lock import RunLock
    from ..progress import StatusLine
    from ..results import RunDir
    from ..runner import PointCollector, RunRecorder, Runner

    console = make_console()
    scenarios = builtin_suite() + probe_scenarios()
    status = 0
    specs = expand_kernel_specs(args.kernel)
    backends = [resolve_backend(spec, memory=args.memory, cpus=args.cpus, accel=args.accel,
                                modules=args.modules) for spec in specs]
    for backend in backends:
        # before the lock: no root gives run's "needs root ... or use a VM kernel",
        # an unknown Debian series the list of available ones
        backend.preflight()
    from contextlib import nullcontext

    from ..emulator.backend import EmulatorBackend

    from ..matrix import jobs_for

    jobs = jobs_for(args, backends)
    if args.scheduler or jobs > 1:
        return _identify_on_cluster(args, console, scenarios, specs, backends, jobs)
    # the emulator needs no kernel: only real kernels take the machine's RunLock
    real = any(not isinstance(b, EmulatorBackend) for b in backends)
    with RunLock(timeout=args.wait) if real else nullcontext():
        rundir = RunDir(args.out)
        rundir.metadata["command"] = ["ksmbench", *sys.argv[1:]]
        rundir.metadata["scenarios"] = [s.name for s in scenarios]
        console.print(f"identify {rundir.run_id}: {len(scenarios)} scenarios on "
                      f"{esc(', '.join(b.label for b in backends))}; observations -> {esc(rundir.path)}")
        try:
            for backend in backends:
                collected = PointCollector()
                with console.status(f"{esc(backend.label)}: running {len(scenarios)} scenarios") as st:
                    runner = Runner([RunRecorder(rundir, predictor=Predictor(), profile="auto"),
                                     collected,
                                     StatusLine(lambda k, msg: st.update(esc(f"{k}: {msg}")))],
                                    artifacts_root=rundir.path)
                    outcome = runner.run_kernel(backend, scenarios)
                if outcome.error:
                    console.print(f"[red]{esc(backend.label)}: {esc(outcome.error)}[/red]")
                for name, o in outcome.scenarios.items():
                    if o.error:
                        console.print(f"[yellow]{esc(backend.label)}: {esc(f'{name}: {o.error}')}[/yellow]")
                if not collected.points:
                    status = 2
                    continue
                result = analyse(collected.points, scenarios, outcome.info.get("kernel_release"),
                                 kernel=backend.label)
                entry = rundir.kernel_entry(backend.label)
                entry["identify"] = result_dict(result)
                rundir.write_metadata()
                report(console, backend.label, result)
                if result.fitted_score.bad:
                    status = max(status, 1)
        finally:
            rundir.close()
    console.print(f"observations: {esc(rundir.path)}  (re-analyse: python -m ksmbench.compare.identify "
                  f"{esc(rundir.path)})")
    return status


def _identify_on_cluster(args: Namespace, console, scenarios, specs, backends, jobs: int) -> int:
    """--jobs N / --scheduler: the kernels run as in ``ksmbench run``
    (ksmbench.matrix); the flags are then judged from the run directory."""
    from ..emulator import Predictor
    from ..matrix import run_kernels

    rundir, outcomes = run_kernels(args, console=console, scenarios=scenarios, specs=specs,
                                   backends=backends, predictor=Predictor(), jobs=jobs)
    observed, releases = load_rundir(rundir.path)
    status = 0
    for outcome in outcomes:
        if outcome.error:
            console.print(f"[red]{outcome.label}: {outcome.error}[/red]")
        obs = observed.get(outcome.label)
        if not obs:
            status = 2
            continue
        known = [s for s in scenarios if s.name in obs]
        result = analyse(obs, known, releases.get(outcome.label))
        rundir.kernel_entry(outcome.label)["identify"] = result_dict(result)
        rundir.write_metadata()
        report(console, outcome.label, result)
        if result.fitted_score.bad:
            status = max(status, 1)
    console.print(f"observations: {rundir.path}  (re-analyse: python -m ksmbench.compare.identify "
                  f"{rundir.path})")
    return status


def result_dict(r: Identification) -> dict:
    return {
        "release": r.release, "suggested_profile": r.base, "fitted_profile": r.fitted,
        "fitted_disagreeing_cells": r.fitted_score.bad,
        "flags": {v.name: {"release_suggests": v.expected, "observations_support": v.describe(),
                           "bad_on": v.bad_on, "bad_off": v.bad_off} for v in r.flags},
        "profiles": {name: {"compared": sc.compared, "disagree": sc.differ,
                            "presence_differs": sc.presence} for name, sc in r.presets},
        "residue": [x.describe() for x in r.residue],
    }


def load_rundir(path: str) -> tuple[dict[str, dict[str, list[ObservationPoint]]], dict[str, str]]:
    """Observed points per kernel label and scenario, and each kernel's release."""
    import csv
    import json
    from pathlib import Path

    base = Path(path)
    points: dict[tuple, dict] = {}
    order: list[tuple] = []
    with open(base / "observations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["kernel"], row["scenario"], int(row["step"]), row["op"],
                   int(row["scan"]) if row["scan"] else None)
            if key not in points:
                points[key] = {}
                order.append(key)
            points[key][row["metric"]] = int(row["observed"]) if row["observed"] != "" else None
    out: dict[str, dict[str, list[ObservationPoint]]] = {}
    for key in order:
        kernel, scenario, step, op, scan = key
        out.setdefault(kernel, {}).setdefault(scenario, []).append(
            ObservationPoint(step, op, scan, points[key]))
    meta = json.loads((base / "metadata.json").read_text())
    releases = {k["kernel"]: k.get("kernel_release") for k in meta.get("kernels", [])}
    return out, releases


def main(argv: Sequence[str] | None = None) -> int:
    """Re-analyse a run directory written by ``ksmbench identify`` (or ``run``)."""
    import argparse


    ap = argparse.ArgumentParser(prog="python -m ksmbench.compare.identify",
                                 description="judge behaviour flags from a run directory")
    ap.add_argument("rundir")
    ap.add_argument("--base", default=None, help="profile to start from (default: by release)")
    args = ap.parse_args(argv)
    console = make_console()
    observed, releases = load_rundir(args.rundir)
    scenarios = builtin_suite() + probe_scenarios()
    status = 0
    for kernel, obs in observed.items():
        known = [s for s in scenarios if s.name in obs]
        result = analyse(obs, known, releases.get(kernel), base=args.base, kernel=kernel)
        report(console, kernel, result)
        status = max(status, 1 if result.fitted_score.bad else 0)
    return status


def report(console, label: str, r: Identification) -> None:
    from rich.table import Table

    from ..emulator.profiles import FLAG_BY_NAME

    console.print(f"[bold]{esc(label)}[/bold]: kernel {esc(r.release or '?')}; {r.scenarios} scenarios, "
                  f"{r.points} observation points; release suggests profile {r.base}")
    t = Table(title="behaviour flags (cells that disagree with the flag on / off)")
    for col in ("flag", "commit", "since", "release suggests", "observations support",
                "bad on", "bad off"):
        t.add_column(col, justify="right" if col.startswith("bad") else "left")
    for v in r.flags:
        flag = FLAG_BY_NAME[v.name]
        support = v.describe() if v.supported is not None or v.extra_on else "[dim]cannot tell[/dim]"
        if v.supported is not None and v.supported != v.expected:
            support = f"[bold yellow]{support} (unexpected)[/bold yellow]"
        t.add_row(v.name, flag.commit.split("+")[0], f"{flag.since[0]}.{flag.since[1]}",
                  "present" if v.expected else "absent", support, str(v.bad_on), str(v.bad_off))
    console.print(t)
    p = Table(title="profiles")
    for col in ("profile", "cells compared", "disagree", "presence differs"):
        p.add_column(col, justify="left" if col == "profile" else "right")
    for name, s in r.presets:
        p.add_row(esc(name), str(s.compared), str(s.differ), str(s.presence))
    p.add_row(f"[bold]fitted: {esc(r.fitted)}[/bold]", str(r.fitted_score.compared),
              str(r.fitted_score.differ), str(r.fitted_score.presence))
    console.print(p)
    best = min(r.presets, key=lambda ps: ps[1].bad)
    console.print(f"best named profile: {best[0]} ({best[1].bad} disagreeing cells); fitted "
                  f"profile: {r.fitted} ({r.fitted_score.bad})")
    for ex in r.fitted_score.examples:
        console.print(f"  [dim]{esc(ex)}[/dim]")
    for x in r.residue:
        colour = "yellow" if x.explained else "bold red"
        console.print(f"[{colour}]residue:[/{colour}] {esc(x.describe())}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
