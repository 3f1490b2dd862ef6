"""ksmbench's own verdict on a behaviour: explicit checks on a real scenario run.

A :class:`Check` names one observation point of a scenario (a step, and a scan
within a scan step), one metric, a comparison and the expected value; the
expected value may be another metric at the same point (``"=present"``).
Each check says *why*: which assertion of the kernel's selftest it mirrors,
or what ksmbench additionally requires.

Judging a check against the observed points gives:

* ``pass`` / ``fail``: both sides were observed and compared;
* ``absent``: the kernel does not provide the metric (e.g. ``ksm_zero_pages``
  before 6.6).  An ``optional`` check that is absent does not count; a
  required one makes the behaviour "n/a" (not judgeable) unless another check
  failed;
* ``missing``: the scenario never reached that point (it failed earlier).

The behaviour's verdict: ``error`` if the scenario could not run, else
``fail`` if any check failed, else ``n/a`` if a required check was absent,
else ``pass``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..observation import ObservationPoint, baseline_of, from_baseline

_OPS = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
        "<": operator.lt, "<=": operator.le}

PASS, FAIL, ABSENT, MISSING = "pass", "fail", "absent", "missing"
#: behaviour verdicts
V_PASS, V_FAIL, V_NA, V_ERROR, V_UNSUPPORTED = "pass", "fail", "n/a", "error", "unsupported"


@dataclass(frozen=True)
class Check:
    step: int
    scan: int | None
    metric: str
    op: str
    expected: int | str   #: an int, or "=<metric>" for another metric at the same point
    why: str
    optional: bool = False

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"unknown comparison {self.op!r}")

    def where(self) -> str:
        return f"step {self.step}" + (f" scan {self.scan}" if self.scan else "")

    def describe(self) -> str:
        right = self.expected[1:] if isinstance(self.expected, str) else str(self.expected)
        extra = " (if the kernel has it)" if self.optional else ""
        return f"after {self.where()}: {self.metric} {self.op} {right}{extra}: {self.why}"


@dataclass(frozen=True)
class CheckResult:
    check: Check
    outcome: str          #: pass | fail | absent | missing
    observed: int | None
    expected: int | None

    def describe(self) -> str:
        c = self.check
        right = c.expected[1:] if isinstance(c.expected, str) else str(c.expected)
        if self.outcome == MISSING:
            return f"{c.where()}: not reached"
        if self.outcome == ABSENT:
            return f"{c.where()}: {c.metric} {c.op} {right}: not provided by this kernel"
        shown = right if not isinstance(c.expected, str) else f"{right} = {self.expected}"
        return f"{c.where()}: {c.metric} = {self.observed}, wanted {c.op} {shown}"


def index_points(points: Iterable[ObservationPoint]) -> dict[tuple[int, int | None], ObservationPoint]:
    """The points by (step, scan), absolute global counters counted from the
    scenario's baseline, as every comparison judges them: a KSM zero page an
    earlier run leaked stays counted until reboot, and is not this scenario's."""
    points = list(points)
    base = baseline_of(points)
    return {(p.step, p.scan): ObservationPoint(p.step, p.op, p.scan,
                                               from_baseline(p.values, base and base.values))
            for p in points}


def judge(check: Check, points: Mapping[tuple[int, int | None], ObservationPoint]) -> CheckResult:
    point = points.get((check.step, check.scan))
    if point is None:
        return CheckResult(check, MISSING, None, None)
    observed = point.values.get(check.metric)
    if isinstance(check.expected, str):
        expected = point.values.get(check.expected.lstrip("="))
    else:
        expected = check.expected
    if observed is None or expected is None:
        return CheckResult(check, ABSENT, observed, expected)
    ok = _OPS[check.op](observed, expected)
    return CheckResult(check, PASS if ok else FAIL, observed, expected)


def verdict(results: Iterable[CheckResult], *, error: str | None = None) -> str:
    results = list(results)
    if error is not None:
        return V_ERROR
    if any(r.outcome == FAIL for r in results):
        return V_FAIL
    if any(r.outcome == MISSING for r in results):
        return V_ERROR
    if any(r.outcome == ABSENT and not r.check.optional for r in results):
        return V_NA
    if not any(r.outcome == PASS for r in results):
        return V_NA
    return V_PASS
