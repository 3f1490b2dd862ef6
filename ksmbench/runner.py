"""Running scenarios on backends: the event stream becomes the results table.

For each kernel the runner asks the emulator (when available) for its
predictions, consumes the backend's events, writes every observation row as it
arrives with its predicted value and match, checks ``expect`` steps, and keeps
a per-scenario outcome for the summary and the exit status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from .errors import KsmbenchError
from .metrics import metric_sort_key
from .observation import (BackendInfo, Event, ObservationPoint, PointObserved,
                          ScenarioFinished, ScenarioStarted)
from .results import RunDir, now_iso
from .scenario import model as m


class Backend(Protocol):
    label: str

    def events(self, scenarios: Sequence[m.Scenario]) -> Iterable[Event]: ...


class Predictor(Protocol):
    """What the runner needs from the emulator."""

    def profile_for(self, release: str | None, requested: str) -> str | None: ...

    def predict(self, scenario: m.Scenario, profile: str) -> list[ObservationPoint]: ...


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


ProgressFn = Callable[[str, str], None]  # (kernel label, message) after each point


def _safe_label(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.")[-80:] or "kernel"


class Runner:
    def __init__(self, rundir: RunDir, *, predictor: Predictor | None = None,
                 profile: str = "auto", progress: ProgressFn | None = None,
                 on_scenario: Callable[[ScenarioOutcome], None] | None = None):
        self.rundir = rundir
        self.predictor = predictor
        self.profile = profile
        self.progress = progress or (lambda kernel, msg: None)
        #: called once a scenario's last row is written (ksmbench.matrix sends
        #: each finished scenario home as one batch)
        self.on_scenario = on_scenario

    def run_kernel(self, backend: Backend, scenarios: Sequence[m.Scenario]) -> KernelOutcome:
        entry = self.rundir.kernel_entry(backend.label)
        outcome = KernelOutcome(backend.label, None)
        by_name = {s.name: s for s in scenarios}
        predictions: dict[str, dict[tuple[int, int | None], ObservationPoint]] = {}
        current: ScenarioOutcome | None = None
        if hasattr(backend, "artifacts_dir"):
            # VM backends keep the guest console log and raw event stream here
            backend.artifacts_dir = self.rundir.path / _safe_label(backend.label)
        stream = backend.events(scenarios)
        try:
            for event in stream:
                if isinstance(event, BackendInfo):
                    info = dict(event.info)
                    status = info.pop("status", None)
                    if status is not None:  # progress only (e.g. a VM booting)
                        self.progress(backend.label, status)
                    if not info:
                        continue
                    entry.update(info)
                    outcome.info.update(info)
                    if outcome.profile is None and info.get("kernel_release"):
                        outcome.profile = self._choose_profile(info.get("kernel_release"))
                        entry["emulator_profile"] = outcome.profile
                    self.rundir.write_metadata()
                elif isinstance(event, ScenarioStarted):
                    current = ScenarioOutcome(event.scenario, backend.label)
                    outcome.scenarios[event.scenario] = current
                    if outcome.profile and self.predictor is not None:
                        predictions[event.scenario] = self._predict(by_name[event.scenario],
                                                                    outcome.profile)
                    self.progress(backend.label, f"{event.scenario}: started")
                elif isinstance(event, PointObserved):
                    if current is None or current.scenario != event.scenario:
                        current = outcome.scenarios.setdefault(
                            event.scenario, ScenarioOutcome(event.scenario, backend.label))
                    self._record(current, by_name.get(event.scenario), event.point,
                                 predictions.get(event.scenario, {}))
                    self.progress(backend.label, f"{event.scenario}: step {event.point.step}")
                elif isinstance(event, ScenarioFinished):
                    done = outcome.scenarios.setdefault(
                        event.scenario, ScenarioOutcome(event.scenario, backend.label))
                    done.error = event.error
                    done.skipped = event.skipped
                    done.seconds = event.seconds
                    done.finished = event.error is None
                    self.progress(backend.label, f"{event.scenario}: {done.verdict}")
                    if self.on_scenario is not None:
                        self.on_scenario(done)
        except KsmbenchError as exc:
            outcome.error = exc.one_line()
            entry["error"] = outcome.error
        finally:
            # end the backend now (a VM is killed), not whenever the generator is collected
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            entry["ended_at"] = now_iso()
            entry["verdicts"] = {name: o.verdict for name, o in outcome.scenarios.items()}
            self.rundir.write_metadata()
        return outcome

    def _choose_profile(self, release: str | None) -> str | None:
        if self.predictor is None:
            return None
        return self.predictor.profile_for(release, self.profile)

    def _predict(self, scenario: m.Scenario, profile: str):
        points = self.predictor.predict(scenario, profile)
        return {(p.step, p.scan): p for p in points}

    def _record(self, outcome: ScenarioOutcome, scenario: m.Scenario | None,
                point: ObservationPoint, predicted: dict) -> None:
        outcome.points += 1
        expected_point = predicted.get((point.step, point.scan))
        pvalues = expected_point.values if expected_point is not None else {}
        rows = []
        for metric in sorted(set(point.values) | set(pvalues), key=metric_sort_key):
            obs = point.values.get(metric)
            pred = pvalues.get(metric)
            match = None
            if obs is not None and pred is not None:
                match = obs == pred
                outcome.compared += 1
                if not match:
                    outcome.mismatches.append(Mismatch(outcome.scenario, outcome.kernel, point.step,
                                                       point.scan, metric, obs, pred))
            rows.append((outcome.scenario, outcome.kernel, point.step, point.op, point.scan,
                         metric, obs, pred, match))
        self.rundir.add_observations(rows)
        if scenario is not None and point.scan is None:
            step = scenario.steps[point.step]
            if isinstance(step, m.Expect):
                self._check_expect(outcome, step, point)

    def _check_expect(self, outcome: ScenarioOutcome, step: m.Expect, point: ObservationPoint) -> None:
        rows = []
        for metric, expected in step.values:
            observed = point.values.get(metric)
            holds = observed == expected
            outcome.expect_checked += 1
            if not holds:
                outcome.expect_failures.append(Mismatch(outcome.scenario, outcome.kernel, step.index,
                                                        None, metric, observed, expected, "expect"))
            rows.append((outcome.scenario, outcome.kernel, step.index, metric, expected, observed, holds))
        self.rundir.add_expectations(rows)
