"""Running scenarios on backends: the one loop over the event stream.

:class:`Runner` consumes a backend's events (:mod:`ksmbench.observation`),
keeps a per-scenario outcome for the summary and the exit status, and hands
every event to its observers (:class:`Observer`): :class:`RunRecorder` writes
the run directory (every observation row as it arrives, with its predicted
value and match; ``expect`` steps checked), :class:`PointCollector` keeps the
points for callers that judge them themselves, and the progress displays
(:mod:`ksmbench.progress`) show where a run is.  No other code iterates a
backend's stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from .backends.base import Backend
from .errors import KsmbenchError, rebuild
from .metrics import judge, metric_sort_key
from .observation import (ABSOLUTE_METRICS, BASELINE, TEARDOWN, BackendInfo, Event,
                          ObservationPoint, PointObserved, ScenarioFinished, ScenarioStarted,
                          from_baseline, rebase)
from .results import RunDir, now_iso
from .scenario import model as m


class Predictor(Protocol):
    """What the runner needs from the emulator."""

    def profile_for(self, release: str | None, requested: str) -> str | None: ...

    def predict(self, scenario: m.Scenario, profile: str) -> list[ObservationPoint]: ...

    def unmodelled(self, scenario: m.Scenario, profile: str) -> Callable[[str], bool]:
        """metric -> True where the prediction is empty on purpose
        (:data:`ksmbench.metrics.UNMODELLED`)."""
        ...


@dataclass
class Mismatch:
    scenario: str
    kernel: str
    step: int
    scan: int | None
    metric: str
    observed: int | None
    predicted: int | None
    kind: str = "prediction"  # or "expect"

    def describe(self) -> str:
        where = f"step {self.step}" + (f" scan {self.scan}" if self.scan else "")
        what = "expected" if self.kind == "expect" else "predicted"
        return (f"{self.scenario} [{self.kernel}] {where} {self.metric}: observed "
                f"{_show(self.observed)}, {what} {_show(self.predicted)}")


def _show(value: int | None) -> str:
    return "absent" if value is None else str(value)


@dataclass
class Residue:
    """An absolute global counter that a scenario did not bring back to its
    baseline (read at the teardown point), and whether the profile predicted it."""

    scenario: str
    kernel: str
    metric: str
    baseline: int
    after: int
    predicted: int | None
    profile: str | None

    @property
    def explained(self) -> bool:
        return self.predicted is not None and self.predicted == self.after

    def describe(self) -> str:
        counter = self.metric.removeprefix("global.")
        text = (f"scenario {self.scenario} left {counter} at {self.after} "
                f"(baseline {self.baseline}) [{self.kernel}]")
        if self.explained:
            why = _RESIDUE_WHY.get(counter)
            return text + f": predicted by {self.profile}" + (f" ({why})" if why else "")
        if self.predicted is None:
            return text + ": no prediction"
        return text + f": not explained ({self.profile} predicts {self.predicted})"


#: why the model predicts residue in a counter (what the kernel keeps after teardown)
_RESIDUE_WHY = {
    "ksm_zero_pages": "without 4d6fc29f3634 fork does not count a child's inherited KSM zero "
                      "pages, but its exit uncounts them",
    "general_profit": "it counts ksm_zero_pages",
    "stable_node_chains": "a chain whose dups are all gone stays in the stable tree until a "
                          "stable-tree search or insert walks it",
}


def find_residue(scenario: str, kernel: str, baseline: ObservationPoint | None,
                 teardown: ObservationPoint | None, predicted_teardown: ObservationPoint | None,
                 profile: str | None) -> list[Residue]:
    """Residue of one scenario: teardown values of absolute counters that differ
    from the baseline.  ``predicted_teardown`` must already be rebased."""
    if baseline is None or teardown is None:
        return []
    out = []
    pvalues = predicted_teardown.values if predicted_teardown is not None else {}
    for metric in ABSOLUTE_METRICS:
        before, after = baseline.values.get(metric), teardown.values.get(metric)
        if before is None or after is None or before == after:
            continue
        out.append(Residue(scenario, kernel, metric, before, after, pvalues.get(metric), profile))
    return out


@dataclass
class ScenarioOutcome:
    scenario: str
    kernel: str
    points: int = 0
    compared: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    expect_checked: int = 0
    expect_failures: list[Mismatch] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None
    seconds: float = 0.0
    finished: bool = False
    baseline: ObservationPoint | None = None
    residue: list[Residue] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "n/a"
        if self.error or not self.finished:
            return "error"
        if self.mismatches or self.expect_failures:
            return "mismatch"
        return "match" if self.compared or self.expect_checked else "observed"


@dataclass
class KernelOutcome:
    label: str
    profile: str | None
    scenarios: dict[str, ScenarioOutcome] = field(default_factory=dict)
    error: str | None = None
    info: dict = field(default_factory=dict)
    #: the error that ended the stream as (type name, message, hint), for
    #: another process to raise again (:func:`ksmbench.errors.rebuild`)
    failure: tuple[str, str, str | None] | None = None
    #: where an interrupt hit (signal, time, scenario, step, scan); None: it did not
    interrupted: dict | None = None
    #: the backend's ``tunables_after`` once its stream was closed
    tunables_after: dict = field(default_factory=dict)

    def scenario_error(self, name: str) -> str | None:
        """A scenario's error (None: it ran to its end or was skipped); for one
        the stream never finished, the error that ended the stream."""
        o = self.scenarios.get(name)
        if o is not None and (o.finished or o.error is not None):
            return o.error
        return self.error

    def raise_failure(self) -> None:
        """Raise the error that ended the stream again (for callers that stop on it)."""
        if self.failure is not None:
            raise rebuild(*self.failure)


def exit_status(kernels: Iterable[KernelOutcome]) -> int:
    status = 0
    for k in kernels:
        if k.error:
            return 2
        for o in k.scenarios.values():
            if o.verdict == "error":
                return 2
            if o.verdict == "mismatch":
                status = 1
    return status


def _where_interrupted(exc: KeyboardInterrupt, running: str | None,
                       last: tuple[str, int, int | None] | None,
                       by_name: dict[str, m.Scenario]) -> dict:
    """What an interrupt cut short: the signal, the scenario under way and the
    last point measured in it (None: it had measured nothing yet)."""
    import signal

    signum = getattr(exc, "signum", signal.SIGINT)
    where: dict = {"signal": signal.Signals(signum).name, "at": now_iso(),
                   "scenario": None, "after_step": None, "after_scan": None}
    if running is not None:
        where["scenario"] = running
        if last is not None and last[0] == running:
            where["after_step"], where["after_scan"] = last[1], last[2]
            step = by_name[running].steps[last[1]] if running in by_name else None
            if isinstance(step, m.Scan):
                where["scans_in_step"] = step.count
    return where


def _safe_label(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.")[-80:] or "kernel"


def _by_key(points) -> dict[tuple[int, int | None], ObservationPoint]:
    return {(p.step, p.scan): p for p in points}


class Observer:
    """What the :class:`Runner` tells while it consumes one kernel's stream.

    Every method does nothing here; an observer overrides what it needs.  The
    Runner keeps the run's state (``run``: scenarios started and finished,
    backend facts, the error, where an interrupt hit) and calls the observers
    in the order they were given after it has updated that state, so a later
    observer reads what an earlier one added (a progress display reads the
    verdict the :class:`RunRecorder` judged).
    """

    def kernel_started(self, run: KernelOutcome, scenarios: Sequence[m.Scenario]) -> None:
        """Before the backend's stream is opened."""

    def event(self, run: KernelOutcome, event: Event) -> None:
        """One event of the stream, in order."""

    def kernel_ended(self, run: KernelOutcome) -> None:
        """The stream is over (ran out, failed or was interrupted) and closed."""


class Runner:
    """The one consumer of backends' event streams: every command runs kernels
    through it and sees the stream through its observers."""

    def __init__(self, observers: Sequence[Observer], *, artifacts_root: Path | None = None):
        self.observers = list(observers)
        #: each kernel's artifacts (a guest's console log, raw events) go to
        #: ``artifacts_root/<label>``; None: wherever the backend chooses
        self.artifacts_root = artifacts_root

    def run_kernel(self, backend: Backend, scenarios: Sequence[m.Scenario]) -> KernelOutcome:
        run = KernelOutcome(backend.label, None)
        by_name = {s.name: s for s in scenarios}
        #: the last observation point: (scenario, step, scan), to say where an interrupt hit
        last: tuple[str, int, int | None] | None = None
        running: str | None = None  # the scenario started and not finished yet
        for observer in self.observers:
            observer.kernel_started(run, scenarios)
        artifacts = (None if self.artifacts_root is None
                     else self.artifacts_root / _safe_label(backend.label))
        stream = backend.events(scenarios, artifacts_dir=artifacts)
        try:
            for event in stream:
                if isinstance(event, BackendInfo):
                    # "status" is for progress displays only (e.g. a VM booting)
                    run.info.update((k, v) for k, v in event.info.items() if k != "status")
                elif isinstance(event, ScenarioStarted):
                    run.scenarios[event.scenario] = ScenarioOutcome(event.scenario, backend.label)
                    running = event.scenario
                elif isinstance(event, PointObserved):
                    run.scenarios.setdefault(event.scenario,
                                             ScenarioOutcome(event.scenario, backend.label))
                    last = (event.scenario, event.point.step, event.point.scan)
                elif isinstance(event, ScenarioFinished):
                    done = run.scenarios.setdefault(
                        event.scenario, ScenarioOutcome(event.scenario, backend.label))
                    done.error = event.error
                    done.skipped = event.skipped
                    done.seconds = event.seconds
                    done.finished = event.error is None
                    running = None
                for observer in self.observers:
                    observer.event(run, event)
        except KsmbenchError as exc:
            run.error = exc.one_line()
            run.failure = (type(exc).__name__, exc.message, exc.hint)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
            run.interrupted = _where_interrupted(exc, running, last, by_name)
            raise
        finally:
            # end the backend now (a VM is killed), not whenever the generator is collected
            stream.close()
            run.tunables_after = dict(backend.tunables_after)
            for observer in self.observers:
                observer.kernel_ended(run)
        return run


class PointCollector(Observer):
    """Keeps every scenario's observation points, for callers that judge them
    themselves (identify, differential, selftest, validate, the pytest plugin)."""

    def __init__(self) -> None:
        self.points: dict[str, list[ObservationPoint]] = {}

    def event(self, run: KernelOutcome, event: Event) -> None:
        if isinstance(event, PointObserved):
            self.points.setdefault(event.scenario, []).append(event.point)


class RunRecorder(Observer):
    """The run directory's side of the stream: metadata, every observation row
    with its predicted value and match, ``expect`` steps checked.

    For each kernel it asks the emulator (when given) for its predictions,
    rebased on each scenario's measured baseline, and judges every cell; the
    judged counts land in the Runner's scenario outcomes (their verdicts).
    ``rundir`` is a :class:`~ksmbench.results.RunDir` or anything with its
    ``kernel_entry``, ``write_metadata``, ``add_observations`` and
    ``add_expectations`` (a cluster task's sink, :mod:`ksmbench.matrix`).
    """

    def __init__(self, rundir, *, predictor: Predictor | None = None, profile: str = "auto"):
        self.rundir = rundir
        self.predictor = predictor
        self.profile = profile

    def kernel_started(self, run: KernelOutcome, scenarios: Sequence[m.Scenario]) -> None:
        self.entry = self.rundir.kernel_entry(run.label)
        self.by_name = {s.name: s for s in scenarios}
        self.predictions: dict[str, dict[tuple[int, int | None], ObservationPoint]] = {}
        self.predicted_lists: dict[str, list[ObservationPoint]] = {}
        self.excused: dict[str, Callable[[str], bool]] = {}

    def event(self, run: KernelOutcome, event: Event) -> None:
        if isinstance(event, BackendInfo):
            info = {k: v for k, v in event.info.items() if k != "status"}
            if not info:
                return
            self.entry.update(info)
            if run.profile is None and info.get("kernel_release"):
                run.profile = self._choose_profile(info.get("kernel_release"))
                self.entry["emulator_profile"] = run.profile
            self.rundir.write_metadata()
        elif isinstance(event, ScenarioStarted):
            if run.profile and self.predictor is not None:
                scenario = self.by_name[event.scenario]
                self.predicted_lists[event.scenario] = self._predict(scenario, run.profile)
                self.predictions[event.scenario] = _by_key(self.predicted_lists[event.scenario])
                self.excused[event.scenario] = self.predictor.unmodelled(scenario, run.profile)
        elif isinstance(event, PointObserved):
            if event.point.op == BASELINE and event.scenario in self.predicted_lists:
                # predictions of absolute counters start from the measured baseline
                self.predictions[event.scenario] = _by_key(rebase(
                    self.predicted_lists[event.scenario], event.point.values))
            self._record(run.scenarios[event.scenario], self.by_name.get(event.scenario),
                         event.point, self.predictions.get(event.scenario),
                         self.excused.get(event.scenario, lambda metric: False), run.profile)

    def kernel_ended(self, run: KernelOutcome) -> None:
        entry = self.entry
        if run.error:
            entry["error"] = run.error
        entry["ended_at"] = now_iso()
        entry["verdicts"] = {name: o.verdict for name, o in run.scenarios.items()}
        residue = [r.describe() for o in run.scenarios.values() for r in o.residue]
        if residue:
            entry["residue"] = residue
        if run.tunables_after and "ksm_tunables_after" not in entry:
            entry["ksm_tunables_after"] = run.tunables_after  # restored, though the stream was cut short
        if run.interrupted is not None:
            if run.interrupted["scenario"] is not None:
                entry["verdicts"][run.interrupted["scenario"]] = "interrupted"
            entry["interrupted"] = True
            entry["interrupted_at"] = run.interrupted
            self.rundir.metadata["interrupted"] = True
            self.rundir.metadata["interrupted_at"] = {"kernel": run.label, **run.interrupted}
        self.rundir.write_metadata()

    def _choose_profile(self, release: str | None) -> str | None:
        if self.predictor is None:
            return None
        return self.predictor.profile_for(release, self.profile)

    def _predict(self, scenario: m.Scenario, profile: str) -> list[ObservationPoint]:
        try:
            points = self.predictor.predict(scenario, profile)
        except KsmbenchError:
            raise
        except Exception as exc:  # a broken emulator must not turn into "nothing compared"
            raise KsmbenchError(f"the emulator failed on {scenario.name} with profile {profile}: "
                                f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        return list(points)

    def _record(self, outcome: ScenarioOutcome, scenario: m.Scenario | None,
                point: ObservationPoint, predicted: dict | None,
                excused: Callable[[str], bool], profile: str | None = None) -> None:
        """One point's rows.  With predictions, every cell is judged: a value on
        one side only is a mismatch unless the metric is on the documented
        unmodelled list (a point the model never reaches counts too)."""
        outcome.points += 1
        if point.op == BASELINE:
            # the starting point predictions are rebased on: measured, not predicted
            outcome.baseline = point
            self.rundir.add_observations(
                (outcome.scenario, outcome.kernel, point.step, point.op, point.scan, metric,
                 point.values[metric], None, None)
                for metric in sorted(point.values, key=metric_sort_key))
            return
        expected_point = predicted.get((point.step, point.scan)) if predicted is not None else None
        pvalues = expected_point.values if expected_point is not None else {}
        rows = []
        for metric in sorted(set(point.values) | set(pvalues), key=metric_sort_key):
            obs = point.values.get(metric)
            pred = pvalues.get(metric)
            match = None
            if predicted is not None:
                match = judge(obs, pred, excused=excused(metric))
            if match is not None:
                outcome.compared += 1
                if not match:
                    outcome.mismatches.append(Mismatch(outcome.scenario, outcome.kernel, point.step,
                                                       point.scan, metric, obs, pred))
            rows.append((outcome.scenario, outcome.kernel, point.step, point.op, point.scan,
                         metric, obs, pred, match))
        self.rundir.add_observations(rows)
        if point.op == TEARDOWN:
            outcome.residue = find_residue(outcome.scenario, outcome.kernel, outcome.baseline,
                                           point, expected_point, profile)
            return
        if scenario is not None and point.scan is None and 0 <= point.step < len(scenario.steps):
            step = scenario.steps[point.step]
            if isinstance(step, m.Expect):
                self._check_expect(outcome, step, point)

    def _check_expect(self, outcome: ScenarioOutcome, step: m.Expect, point: ObservationPoint) -> None:
        rows = []
        # absolute global counters from the scenario's baseline, as predictions
        # are: what the kernel held before (a leaked ksm_zero_pages) is not the
        # scenario's doing
        base = outcome.baseline.values if outcome.baseline is not None else None
        for metric, expected, observed, holds in step.check(from_baseline(point.values, base)):
            outcome.expect_checked += 1
            if not holds:
                outcome.expect_failures.append(Mismatch(outcome.scenario, outcome.kernel, step.index,
                                                        None, metric, observed, expected, "expect"))
            rows.append((outcome.scenario, outcome.kernel, step.index, metric, expected, observed, holds))
        self.rundir.add_expectations(rows)
