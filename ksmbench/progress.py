"""Running one kernel's scenarios with a progress bar: shared by ``ksmbench
run`` and ``selftest`` (which records ksmbench's own verdicts
beside the kernel's selftests)."""

from __future__ import annotations


def run_kernel_with_progress(console, rundir, backend, scenarios, predictor, profile):
    """Run ``scenarios`` on one backend into ``rundir``, with a progress bar of
    points (steps and scans) and the kernel's error or journal repair printed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .console import esc
    from .observation import expected_points
    from .runner import Runner

    expected = {s.name: expected_points(s) for s in scenarios}
    seen: dict[str, int] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.fields[kernel]}", style="bold", markup=False), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.description}", markup=False),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("starting", total=sum(expected.values()), kernel=backend.label)

        def tick(kernel: str, message: str) -> None:
            name, _, what = message.partition(": ")
            advance = 0
            if name in expected and what.startswith("step "):
                advance = 1
            elif name in expected and what != "started":
                # finished (or skipped, or failed): count the points it will not produce
                advance = max(expected[name] - seen.get(name, 0), 0)
            seen[name] = seen.get(name, 0) + advance
            progress.update(task, advance=advance, description=message)

        runner = Runner(rundir, predictor=predictor, profile=profile, progress=tick)
        outcome = runner.run_kernel(backend, scenarios)
        progress.update(task, description="done" if not outcome.error else "failed")
    if outcome.error:
        console.print(f"[red]{esc(backend.label)}: {esc(outcome.error)}[/red]")
    if outcome.info.get("repaired"):
        console.print(f"[yellow]{esc(outcome.info['repaired'])}[/yellow]")
    return outcome
