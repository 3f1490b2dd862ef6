"""Verdicts in the formats CI farms read: kselftest KTAP and JUnit XML.

Both are made from one view of a run, :class:`RunView`: one :class:`Cell`
per scenario x kernel, with its verdict, every ``expect`` check and every
cell that differs from the prediction.  The view is read from a run
directory (metadata.json, observations.csv, expectations.csv), so
``ksmbench run --format ktap`` and ``ksmbench report --format ktap RUNDIR``
print the same text for the same run.

* :mod:`.ktap_out`: KTAP version 1, one test per scenario x kernel.
* :mod:`.junit_out`: JUnit XML, one testsuite per kernel.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UsageError, os_boundary


@dataclass(frozen=True)
class ExpectCheck:
    step: int
    metric: str
    expected: str
    observed: str
    holds: bool


@dataclass(frozen=True)
class Difference:
    step: int
    scan: int | None
    metric: str
    observed: str
    predicted: str


@dataclass
class Cell:
    scenario: str
    kernel: str
    verdict: str                  #: match | observed | mismatch | error | n/a | not run
    reason: str | None = None     #: why n/a, error or not run
    seconds: float | None = None
    compared: int = 0
    expects: list[ExpectCheck] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict in ("match", "observed")


@dataclass
class RunView:
    run_id: str
    kernels: list[str]
    scenarios: list[str]
    cells: list[Cell]             #: scenario-major: every kernel of a scenario together

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "skip": 0, "error": 0}
        for c in self.cells:
            out[_kind(c)] += 1
        return out


def _kind(cell: Cell) -> str:
    if cell.verdict == "n/a":
        return "skip"
    if cell.verdict in ("error", "not run"):
        return "error"
    return "pass" if cell.passed else "fail"


def record_details(rundir, outcomes) -> None:
    """Keep what only the in-memory outcomes know (why a scenario was n/a or
    failed, how long it took) in metadata.json, so a run directory alone
    gives the full view later."""
    for k in outcomes:
        entry = rundir.kernel_entry(k.label)
        entry["scenario_details"] = {
            name: {"seconds": round(o.seconds, 3), "reason": o.skipped or o.error}
            for name, o in k.scenarios.items()}
    rundir.write_metadata()


def read_run(path: str | os.PathLike) -> RunView:
    """The view of one run directory."""
    base = Path(path)
    meta_path = base / "metadata.json"
    if not meta_path.is_file():
        raise UsageError(f"{base}: not a run directory (no metadata.json)",
                         hint="give a directory written by ksmbench run")
    with os_boundary(f"reading {meta_path}"):
        meta = json.loads(meta_path.read_text())
    kernels = [k["kernel"] for k in meta.get("kernels", [])]
    scenarios = list(meta.get("scenarios") or [])
    expects: dict[tuple[str, str], list[ExpectCheck]] = {}
    for row in _rows(base / "expectations.csv"):
        expects.setdefault((row["scenario"], row["kernel"]), []).append(
            ExpectCheck(int(row["step"]), row["metric"], row["expected"], row["observed"],
                        row["holds"] == "true"))
    compared: dict[tuple[str, str], int] = {}
    differences: dict[tuple[str, str], list[Difference]] = {}
    for row in _rows(base / "observations.csv"):
        key = (row["scenario"], row["kernel"])
        if key[0] not in scenarios:
            scenarios.append(key[0])
        if row["match"] == "":
            continue
        compared[key] = compared.get(key, 0) + 1
        if row["match"] == "false":
            differences.setdefault(key, []).append(
                Difference(int(row["step"]), int(row["scan"]) if row["scan"] else None,
                           row["metric"], row["observed"], row["predicted"]))
    cells = []
    by_kernel = {k["kernel"]: k for k in meta.get("kernels", [])}
    for scenario in scenarios:
        for kernel in kernels:
            entry = by_kernel[kernel]
            verdict = (entry.get("verdicts") or {}).get(scenario)
            details = (entry.get("scenario_details") or {}).get(scenario, {})
            reason = details.get("reason")
            if verdict is None:
                verdict = "not run"
                reason = entry.get("error") or "the run ended before this scenario"
            cells.append(Cell(scenario, kernel, verdict, reason, details.get("seconds"),
                              compared.get((scenario, kernel), 0),
                              expects.get((scenario, kernel), []),
                              differences.get((scenario, kernel), [])))
    return RunView(meta.get("run_id", base.name), kernels, scenarios, cells)


def read_runs(paths: Sequence[str | os.PathLike]) -> RunView:
    """Several run directories as one view (e.g. one run per kernel)."""
    views = [read_run(p) for p in paths]
    if len(views) == 1:
        return views[0]
    kernels, scenarios, cells = [], [], []
    for v in views:
        kernels += [k for k in v.kernels if k not in kernels]
        scenarios += [s for s in v.scenarios if s not in scenarios]
        cells += v.cells
    order = {s: i for i, s in enumerate(scenarios)}
    cells.sort(key=lambda c: order[c.scenario])
    return RunView("+".join(v.run_id for v in views), kernels, scenarios, cells)


def _rows(path: Path) -> Iterable[dict]:
    if not path.is_file():
        return []
    with os_boundary(f"reading {path}"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
