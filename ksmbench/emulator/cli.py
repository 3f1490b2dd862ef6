"""``ksmbench emulate SCENARIO... --profile NAME --format table|csv``.

Runs as an ordinary user: no root, no KSM, no kernel needed.  ``csv`` prints
the columns of observations.csv with ``observed`` and ``match`` empty and the
emulator's values in ``predicted`` (empty where the profile's kernel lacks the
counter); ``table`` prints one table per scenario, points as columns.

``--profile auto`` (the default) is the profile of this machine's running
kernel, the one ``ksmbench run --kernel host`` compares with.  ``expect``
steps are judged against the prediction: exit 1 when one does not hold.
"""

from __future__ import annotations

import csv
import sys
from argparse import Namespace

from ..metrics import metric_sort_key
from ..results import OBSERVATION_COLUMNS
from ..scenario import resolve_scenarios
from .emulate import ScenarioRun
from .profiles import resolve_profile


def emulate_command(args: Namespace) -> int:
    profile = resolve_profile(args.profile)
    scenarios = resolve_scenarios(list(args.scenarios))
    kernel = f"emulator:{profile.name}"
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(OBSERVATION_COLUMNS)
    status = 0
    for scenario in scenarios:
        run = ScenarioRun(scenario, profile)
        points = list(run.points())
        stopped = [s for s in scenario.steps if not run.supported(s)]
        if args.format == "csv":
            for p in points:
                for metric in sorted(p.values, key=metric_sort_key):
                    value = p.values[metric]
                    writer.writerow([scenario.name, kernel, p.step, p.op,
                                     "" if p.scan is None else p.scan, metric,
                                     "", "" if value is None else value, ""])
        else:
            _print_table(scenario, kernel, points)
        failed = _check_expects(scenario, points)
        if failed:
            status = max(status, 1)
        if stopped:
            print(f"ksmbench: {scenario.name}: stopped at step {stopped[0].index}: op "
                  f"'{stopped[0].op}' is not available on kernels of profile {profile.name}",
                  file=sys.stderr)
            status = 2
    return status


def _check_expects(scenario, points) -> int:
    """Judge the scenario's ``expect`` steps against the prediction; print the
    verdicts (to stderr, so that ``--format csv`` stays a clean table)."""
    from ..console import esc, make_console
    from ..scenario import model as m

    at = {p.step: p for p in points if p.scan is None}
    err = make_console(stderr=True)
    failed = 0
    for step in scenario.steps:
        if not isinstance(step, m.Expect) or step.index not in at:
            continue
        for metric, expected, observed, holds in step.check(at[step.index].values):
            shown = lambda v: "absent" if v is None else str(v)  # noqa: E731
            if holds:
                err.print(f"expect {esc(scenario.name)} step {step.index} {esc(metric)} = "
                          f"{shown(expected)}: [green]holds[/green]")
            else:
                failed += 1
                err.print(f"expect {esc(scenario.name)} step {step.index} {esc(metric)} = "
                          f"{shown(expected)}: [red]does not hold[/red] (predicted {shown(observed)})")
    return failed


def _print_table(scenario, kernel: str, points) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ..console import make_console

    metrics_width = max((len(k) for p in points for k in p.values), default=10)
    width = metrics_width + 4 + sum(_column_width(p) + 3 for p in points)
    # wide enough for every point, on a terminal too: a wrapped table is unreadable
    console = make_console(width=max(width, 80))

    legend = "  (- : no value: the kernel lacks this counter, or it is not modelled)"
    table = Table(title=escape(f"{scenario.name} [{kernel}]") + legend,
                  title_justify="left")
    table.add_column("metric", no_wrap=True)
    for p in points:
        table.add_column(_head(p), justify="right", no_wrap=True, min_width=_column_width(p))
    metrics = sorted({k for p in points for k in p.values}, key=metric_sort_key)
    for metric in metrics:
        cells = []
        for p in points:
            if metric not in p.values:
                cells.append("")
            else:
                v = p.values[metric]
                cells.append("-" if v is None else str(v))
        table.add_row(escape(metric), *cells)
    console.print(table)


def _head(p) -> str:
    return f"{p.step}:{p.op}" + (f"#{p.scan}" if p.scan else "")


def _column_width(p) -> int:
    values = [len(str(v)) for v in p.values.values() if v is not None]
    return max([len(_head(p)), *values])
