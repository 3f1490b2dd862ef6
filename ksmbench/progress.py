"""Progress displays: observers of the Runner (:class:`ksmbench.runner.Observer`)
that read the typed events, never text the runner formatted.

* :func:`progress_message`: the one line a display shows for an event.
* :class:`StatusLine`: hands that line to a callback (a spinner's status, a log).
* :class:`ProgressBar`: a rich progress bar of points (steps and scans).
* :func:`run_kernel_with_progress`: one kernel into a run directory with a bar,
  shared by ``ksmbench run`` and ``selftest``.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .observation import (BackendInfo, Event, PointObserved, ScenarioFinished, ScenarioStarted,
                          expected_points)
from .runner import KernelOutcome, Observer, RunRecorder, Runner
from .scenario import model as m


def progress_message(run: KernelOutcome, event: Event) -> str | None:
    """What a display says on ``event``: a backend's status (e.g. a VM
    booting), ``<scenario>: started``, ``<scenario>: step N`` or
    ``<scenario>: <verdict>``; None when the event says nothing new."""
    if isinstance(event, BackendInfo):
        return event.info.get("status")
    if isinstance(event, ScenarioStarted):
        return f"{event.scenario}: started"
    if isinstance(event, PointObserved):
        return f"{event.scenario}: step {event.point.step}"
    if isinstance(event, ScenarioFinished):
        return f"{event.scenario}: {run.scenarios[event.scenario].verdict}"
    return None


class StatusLine(Observer):
    """Calls ``show(kernel label, message)`` with every event's progress message."""

    def __init__(self, show: Callable[[str, str], None]):
        self.show = show

    def event(self, run: KernelOutcome, event: Event) -> None:
        message = progress_message(run, event)
        if message is not None:
            self.show(run.label, message)


class LogLines(Observer):
    """Where no terminal shows the bar (CI, a pipe, a log file), a rich bar is
    drawn only once, at the end: print one line per backend status and per
    finished scenario instead, so a long run shows how far it got."""

    def __init__(self, console):
        self.console = console

    def event(self, run: KernelOutcome, event: Event) -> None:
        if isinstance(event, (BackendInfo, ScenarioFinished)):
            message = progress_message(run, event)
            if message is not None:
                done = sum(1 for o in run.scenarios.values() if o.finished)
                self.console.print(f"{run.label}: {message} ({done} done)", markup=False,
                                   highlight=False)


class ProgressBar(Observer):
    """One rich progress task per kernel, counting points (steps and scans): a
    scenario that ends early (skipped, failed) counts the points it will not
    produce, so the bar ends full."""

    def __init__(self, progress, scenarios: Sequence[m.Scenario]):
        self.progress = progress
        self.expected = {s.name: expected_points(s) for s in scenarios}
        self.task = None

    def kernel_started(self, run: KernelOutcome, scenarios: Sequence[m.Scenario]) -> None:
        self.seen: dict[str, int] = {}
        self.task = self.progress.add_task("starting", total=sum(self.expected.values()),
                                           kernel=run.label)

    def event(self, run: KernelOutcome, event: Event) -> None:
        message = progress_message(run, event)
        if message is None:
            return
        advance = 0
        if isinstance(event, PointObserved) and event.scenario in self.expected:
            advance = 1
        elif isinstance(event, ScenarioFinished) and event.scenario in self.expected:
            advance = max(self.expected[event.scenario] - self.seen.get(event.scenario, 0), 0)
        if advance:
            self.seen[event.scenario] = self.seen.get(event.scenario, 0) + advance
        self.progress.update(self.task, advance=advance, description=message)

    def kernel_ended(self, run: KernelOutcome) -> None:
        if run.interrupted is None:  # an interrupt leaves the bar where it stopped
            self.progress.update(self.task, description="done" if not run.error else "failed")


def run_kernel_with_progress(console, rundir, backend, scenarios, predictor, profile,
                             observers: Sequence[Observer] = ()) -> KernelOutcome:
    """Run ``scenarios`` on one backend into ``rundir``, with a progress bar of
    points (steps and scans) and the kernel's error or journal repair printed.
    ``observers`` see the stream too (after the run directory's recorder)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .console import esc

    with Progress(SpinnerColumn(), TextColumn("{task.fields[kernel]}", style="bold", markup=False), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.description}", markup=False),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        recorder = RunRecorder(rundir, predictor=predictor, profile=profile)
        display: Observer = (ProgressBar(progress, scenarios) if console.is_terminal
                             else LogLines(console))
        runner = Runner([recorder, *observers, display], artifacts_root=rundir.path)
        outcome = runner.run_kernel(backend, scenarios)
    if outcome.error:
        console.print(f"[red]{esc(backend.label)}: {esc(outcome.error)}[/red]")
    if outcome.info.get("repaired"):
        console.print(f"[yellow]{esc(outcome.info['repaired'])}[/yellow]")
    return outcome
