"""Both verdicts for every peer on one kernel, and whether they agree.

Selftest verdicts: ``pass``, ``fail``, ``skip``, ``xfail`` (from KTAP or the
legacy output), ``timeout`` (killed at the time limit), ``not run`` (the
program ended, or was killed, before reaching this test), ``absent`` (the
linux-source used has no such program or test), ``error`` (no verdict:
the program crashed, or the kernel could not be reached).

ksmbench verdicts: ``pass``, ``fail``, ``n/a`` (a required counter is not
provided by this kernel), ``unsupported`` (the kernel refused the scenario's
operation, e.g. PR_SET_MEMORY_MERGE before 6.4), ``error``, and ``none``
(no counterpart).

Agreement: ``agree`` for pass/pass, fail/fail and skip/unsupported;
``DISAGREE`` for pass/fail and fail/pass; ``-`` when one side has no
comparable verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..sources.kernel_tools import SelftestBuild
from ..observation import ObservationPoint
from . import checks as ck
from .catalogue import FUNCTIONAL, Peer
from .execute import Execution
from .ktap import ParsedOutput, parse_output

AGREE, DISAGREE, NOT_COMPARABLE = "agree", "DISAGREE", "-"


@dataclass
class SelftestVerdict:
    verdict: str
    detail: str = ""       #: the selftest's message, or why there is no verdict


@dataclass
class PeerRow:
    peer: Peer
    kernel: str
    selftest: SelftestVerdict
    ours: str
    results: list[ck.CheckResult] = field(default_factory=list)
    ours_detail: str = ""

    @property
    def agreement(self) -> str:
        return agreement(self.selftest.verdict, self.ours)

    def to_json(self) -> dict:
        return {
            "kernel": self.kernel, "selftest": self.peer.selftest,
            "command": self.peer.command_id if self.peer.program else None,
            "behaviour": self.peer.behaviour, "scenario": self.peer.scenario,
            "selftest_verdict": self.selftest.verdict, "selftest_detail": self.selftest.detail,
            "ksmbench_verdict": self.ours, "ksmbench_detail": self.ours_detail,
            "agreement": self.agreement,
            "checks": [{"check": r.check.describe(), "outcome": r.outcome,
                        "observed": r.observed, "expected": r.expected} for r in self.results],
        }


def agreement(selftest: str, ours: str) -> str:
    if (selftest, ours) in (("pass", "pass"), ("fail", "fail"), ("skip", "unsupported")):
        return AGREE
    if (selftest, ours) in (("pass", "fail"), ("fail", "pass")):
        return DISAGREE
    return NOT_COMPARABLE


# -- the selftest side ------------------------------------------------------------------

def selftest_verdict(peer: Peer, build: SelftestBuild | None,
                     executions: Mapping[str, Execution], error: str | None) -> SelftestVerdict:
    if not peer.program:
        return SelftestVerdict("none", peer.note)
    if build is not None and peer.program in build.missing:
        return SelftestVerdict("absent", build.missing[peer.program])
    if (build is not None and peer.test and peer.program == FUNCTIONAL
            and peer.test not in build.functional_tests):
        return SelftestVerdict("absent", f"{build.source} has no {peer.test}")
    run = executions.get(peer.command_id)
    if run is None:
        return SelftestVerdict("error", error or "not run")
    parsed = parse_output(run.output, run.returncode)
    if peer.test is None:
        return _single(parsed, run)
    for result in parsed.results:
        if result.name == peer.test:
            return SelftestVerdict(result.verdict, result.message)
    if run.timed_out and peer.test in parsed.unfinished:
        return SelftestVerdict("timeout", run.error or "killed at the time limit")
    if peer.test in parsed.unfinished:
        why = f"no result line ({_ended(run)})"
        if parsed.repeated:
            why += (f"; test numbers {', '.join(map(str, parsed.repeated))} are reported twice: "
                    "a forked child returned into main() and ran the remaining tests")
        return SelftestVerdict("error", why)
    return SelftestVerdict("not run", f"the program ended first ({_ended(run)})")


def _single(parsed: ParsedOutput, run: Execution) -> SelftestVerdict:
    if parsed.results:
        r = parsed.results[-1]
        return SelftestVerdict(r.verdict, r.message)
    if run.timed_out:
        return SelftestVerdict("timeout", run.error or "killed at the time limit")
    if parsed.skipped:
        return SelftestVerdict("skip", parsed.skipped)
    return SelftestVerdict("error", f"no verdict in its output ({_ended(run)})")


def _ended(run: Execution) -> str:
    if run.timed_out:
        return "killed at the time limit"
    if run.error:
        return run.error
    if run.returncode is not None and run.returncode < 0:
        return f"killed by signal {-run.returncode}"
    return f"exit {run.returncode}"


# -- ksmbench's side ----------------------------------------------------------------------

def ksmbench_verdict(peer: Peer, points: Sequence[ObservationPoint] | None,
                     scenario_error: str | None) -> tuple[str, list[ck.CheckResult], str]:
    if peer.scenario is None:
        return "none", [], peer.note
    if points is None and scenario_error is None:
        return ck.V_ERROR, [], "the scenario did not run"
    indexed = ck.index_points(points or [])
    results = [ck.judge(c, indexed) for c in peer.checks]
    if scenario_error is not None:
        if _unsupported(scenario_error):
            return ck.V_UNSUPPORTED, results, scenario_error
        return ck.V_ERROR, results, scenario_error
    verdict = ck.verdict(results)
    if verdict == ck.V_FAIL:
        detail = "; ".join(r.describe() for r in results if r.outcome == ck.FAIL)
    elif verdict == ck.V_NA:
        detail = "; ".join(r.describe() for r in results
                           if r.outcome == ck.ABSENT and not r.check.optional)
    else:
        passed = sum(r.outcome == ck.PASS for r in results)
        absent = sum(r.outcome == ck.ABSENT for r in results)
        detail = f"{passed}/{len(results)} checks hold"
        if absent:
            detail += f" ({absent} optional not provided by this kernel)"
    return verdict, results, detail


def _unsupported(error: str) -> bool:
    """The kernel refused an operation it does not have (EINVAL from prctl before 6.4)."""
    return "EINVAL" in error and ("prctl" in error or "PR_SET_MEMORY_MERGE" in error)


def compare(peers: Sequence[Peer], kernel: str, *, build: SelftestBuild | None,
            executions: Mapping[str, Execution], selftest_error: str | None,
            points: Mapping[str, Sequence[ObservationPoint]],
            scenario_errors: Mapping[str, str | None]) -> list[PeerRow]:
    rows = []
    for peer in peers:
        st = selftest_verdict(peer, build, executions, selftest_error)
        ours, results, detail = ksmbench_verdict(
            peer, points.get(peer.scenario) if peer.scenario else None,
            scenario_errors.get(peer.scenario) if peer.scenario else None)
        rows.append(PeerRow(peer, kernel, st, ours, results, detail))
    return rows
