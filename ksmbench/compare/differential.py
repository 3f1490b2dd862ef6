"""Differential testing: random scenarios on a real kernel and in the emulator.

``python -m ksmbench.compare.differential --count 50 --seed 1 --out DIR``
runs seeded random scenarios on the host kernel (root, holding the RunLock),
predicts them with the profile that fits the kernel, and for every scenario
with a mismatching cell shrinks it (re-running candidates on the kernel) and
writes the shrunk scenario as a TOML file that reproduces the mismatch.
``tests/test_differential.py`` drives the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..console import esc, make_console
from ..kernel.policy import FOREIGN_USERS, HostPolicy, refusal
from ..metrics import judge
from ..observation import BASELINE, Event, ObservationPoint, ScenarioFinished, baseline_of, rebase
from ..runner import KernelOutcome, Observer, PointCollector, Runner
from ..scenario import model as m
from ..scenario.generate import random_scenario, shrink
from ..scenario.serialise import to_toml


#: how an error string starts for a scenario the kernel cannot run at all (a
#: random scenario with prctl on a kernel before 6.4): not compared, not an error
NOT_APPLICABLE = "n/a: "


@dataclass
class Tally:
    """What a campaign compared: cells judged (both sides have a value, or one
    side and the metric is not excused), and steps by op (with the madvise
    advice and set tunable) in the scenarios checked."""

    cells: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    #: scenarios the kernel could not run (:data:`NOT_APPLICABLE`), and why
    not_applicable: list[str] = field(default_factory=list)

    def add_ops(self, scenario: m.Scenario) -> None:
        for step in scenario.steps:
            key = step.op + {"madvise": f":{getattr(step, 'advice', '')}",
                             "set": f":{getattr(step, 'tunable', '')}",
                             "scan": ":pages" if getattr(step, "pages", None) else ""}.get(step.op, "")
            self.ops[key] = self.ops.get(key, 0) + 1


@dataclass
class Cell:
    step: int
    scan: int | None
    metric: str
    observed: int | None
    predicted: int | None

    def describe(self) -> str:
        where = f"step {self.step}" + (f" scan {self.scan}" if self.scan else "")
        return f"{where} {self.metric}: observed {self.observed}, predicted {self.predicted}"


def compare(observed: Sequence[ObservationPoint], predicted: Sequence[ObservationPoint],
            unmodelled: Callable[[str], bool] = lambda metric: False,
            tally: Tally | None = None) -> list[Cell]:
    """Every cell that does not match: both sides have a value and they differ,
    or only one side has a value (shown with None) and ``unmodelled`` (the
    documented list, :func:`ksmbench.emulator.unmodelled_for`) does not excuse
    the metric; a point only one side has is a ``<point>`` cell.  Predicted
    absolute counters start from the observed baseline point, which is itself
    measured, not compared.  ``tally`` counts the cells judged."""
    base = baseline_of(observed)
    pred = {(p.step, p.scan): p for p in rebase(predicted, base.values if base else None)
            if p.op != BASELINE}
    out: list[Cell] = []
    for o in observed:
        if o.op == BASELINE:
            continue
        p = pred.pop((o.step, o.scan), None)
        if p is None:
            out.append(Cell(o.step, o.scan, "<point>", 1, None))
            continue
        for metric in {**o.values, **p.values}:
            ov, pv = o.values.get(metric), p.values.get(metric)
            verdict = judge(ov, pv, excused=unmodelled(metric))
            if tally is not None and verdict is not None:
                tally.cells += 1
            if verdict is False:
                out.append(Cell(o.step, o.scan, metric, ov, pv))
    for p in pred.values():
        out.append(Cell(p.step, p.scan, "<point>", None, 1))
    return out


class HostRunner:
    """Runs scenarios on this machine's kernel, one session per batch."""

    def __init__(self) -> None:
        from ..kernel.features import kernel_release
        from ..emulator.profiles import profile_for_release

        self.release = kernel_release()
        self.profile = profile_for_release(self.release)

    #: another KSM user (e.g. a QEMU guest started outside ksmbench) makes the
    #: global counters meaningless; wait for it this long, then give up
    busy_timeout = 900.0

    def run(self, scenarios: Sequence[m.Scenario]) -> dict[str, tuple[list[ObservationPoint], str | None]]:
        import time

        from ..backends.host import HostBackend
        from ..errors import Busy

        policy = HostPolicy()
        deadline = time.monotonic() + self.busy_timeout
        pending = list(scenarios)
        results: dict[str, tuple[list[ObservationPoint], str | None]] = {}
        while pending:
            policy.require_ksm_to_ourselves(wait=max(deadline - time.monotonic(), 0.0))
            joined = _JoinedKsm(policy)
            outcome, got = _run_collecting(HostBackend(), pending, joined)
            if outcome.failure is not None and outcome.failure[0] != Busy.__name__:
                outcome.raise_failure()  # Busy: a foreign user came between the wait and the session
            for name, error in joined.scenarios.items():
                got[name] = (got[name][0], error)
            busy = [s for s in pending if s.name not in got
                    or (got[s.name][1] or "").startswith(FOREIGN_USERS)]
            for s in pending:
                if s not in busy:
                    results[s.name] = got[s.name]
            pending = busy
            if pending and time.monotonic() > deadline:  # other KSM users kept coming back
                last = got.get(pending[0].name, ([], None))[1] or FOREIGN_USERS
                raise Busy(f"gave up after {self.busy_timeout:.0f} s: {last}")
        return results


class _JoinedKsm(Observer):
    """Scenarios during which someone (a QEMU guest) joined KSM: its pages are
    in the global counters.  Checked as each scenario finishes, while the
    session's own agents are still the only ksmbench KSM users."""

    def __init__(self, policy) -> None:
        self.policy = policy
        #: scenario -> the refusal naming who joined
        self.scenarios: dict[str, str] = {}

    def event(self, run: KernelOutcome, event: Event) -> None:
        if isinstance(event, ScenarioFinished) and event.error is None:
            users = self.policy.foreign_ksm_users()
            if users:
                self.scenarios[event.scenario] = refusal(users).one_line()


def _run_collecting(backend, scenarios: Sequence[m.Scenario], *observers: Observer
                    ) -> tuple[KernelOutcome, dict[str, tuple[list[ObservationPoint], str | None]]]:
    """The scenarios through the Runner: each one's points and error (None:
    no error; :data:`NOT_APPLICABLE` and the reason: the kernel lacks what it needs)."""
    points = PointCollector()
    outcome = Runner([points, *observers]).run_kernel(backend, scenarios)
    return outcome, {name: (points.points.get(name, []),
                            NOT_APPLICABLE + o.skipped if o.skipped else o.error)
                     for name, o in outcome.scenarios.items()}


class BackendRunner:
    """Runs scenarios on any ``--kernel`` backend (e.g. a Debian kernel in QEMU)."""

    def __init__(self, spec: str, **options) -> None:
        from ..backends import resolve_backend

        self.backend = resolve_backend(spec, **options)
        self.backend.preflight()  # an unknown series: one line, now
        self.release: str | None = None
        self.profile: str | None = None

    def run(self, scenarios: Sequence[m.Scenario]) -> dict[str, tuple[list[ObservationPoint], str | None]]:
        from ..emulator.profiles import profile_for_release

        outcome, got = _run_collecting(self.backend, scenarios)
        if outcome.info.get("kernel_release"):
            self.release = outcome.info["kernel_release"]
            self.profile = self.profile or profile_for_release(self.release)
        outcome.raise_failure()
        return got


@dataclass
class Finding:
    seed: int
    scenario: m.Scenario
    cells: list[Cell]
    path: Path | None = None
    tried: int = 0


def check_scenarios(scenarios: Sequence[m.Scenario], runner, profile: str | None,
                    tally: Tally | None = None) -> list[tuple[m.Scenario, list[Cell], str | None]]:
    results = runner.run(scenarios)
    profile = profile or runner.profile
    from ..emulator.emulate import ScenarioRun

    out = []
    for scenario in scenarios:
        points, error = results.get(scenario.name, ([], "not run"))
        run = ScenarioRun(scenario, profile)
        predicted = list(run.points())
        unsupported = any(not run.supported(s) for s in scenario.steps)
        if error is not None and unsupported and points:
            error = None  # the kernel refused an op its profile lacks (prctl before 6.4)
        if error is not None and error.startswith(NOT_APPLICABLE) and not unsupported:
            # the kernel and the profile disagree on what the kernel has
            error = (f"the kernel refused the scenario ({error[len(NOT_APPLICABLE):]}), but "
                     f"profile {profile} has every feature it needs")
        cells = compare(points, predicted, run.unmodelled, tally) if error is None else []
        if tally is not None and error is None:
            tally.add_ops(scenario)
        out.append((scenario, cells, error))
    return out


def run_differential(seeds: Iterable[int], out_dir: Path, *, runner: HostRunner | None = None,
                     profile: str | None = None, shrink_budget: int = 40,
                     progress: Callable[[str], None] = lambda msg: None,
                     batch: int = 10, max_pages: int = 48, max_steps: int = 18,
                     tally: Tally | None = None,
                     numa_nodes: int = 1, swap: bool = False, thp: bool = False,
                     ) -> tuple[int, list[Finding], list[str]]:
    """Returns (scenarios checked, findings, errors); ``tally`` counts what
    the scenarios compared (shrinking runs not included).  ``thp``: every
    scenario has a THP region (random_scenario)."""
    runner = runner or HostRunner()
    seeds = list(seeds)
    findings: list[Finding] = []
    errors: list[str] = []
    checked = 0
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        scenarios = [random_scenario(seed, max_pages=max_pages, max_steps=max_steps,
                                     numa_nodes=numa_nodes, swap=swap, thp=thp) for seed in chunk]
        results = check_scenarios(scenarios, runner, profile, tally)
        profile = profile or runner.profile
        for seed, (scenario, cells, error) in zip(chunk, results):
            if error is not None and error.startswith(NOT_APPLICABLE):
                if tally is not None:
                    tally.not_applicable.append(f"seed {seed}: {error[len(NOT_APPLICABLE):]}")
                continue
            if error is not None:
                errors.append(f"seed {seed}: {error}")
                continue
            checked += 1
            if cells:
                findings.append(Finding(seed, scenario, cells))
                # written at once: shrinking (a kernel run per candidate) may take long
                out_dir.mkdir(parents=True, exist_ok=True)
                raw = out_dir / f"{scenario.name}-unshrunk.toml"
                raw.write_text(to_toml(scenario, "mismatching cells (before shrinking):\n"
                                       + "\n".join(c.describe() for c in cells[:20])))
                progress(f"seed {seed}: {len(cells)} cells differ, e.g. {cells[0].describe()} "
                         f"-> {raw}")
        progress(f"{checked} scenarios checked, {len(findings)} mismatching")
    for f in findings:
        def still_fails(candidate: m.Scenario) -> bool:
            (_, cells, error), = check_scenarios([candidate], runner, profile)
            return error is None and bool(cells)

        small, f.tried = shrink(f.scenario, still_fails, budget=shrink_budget)
        (_, cells, _), = check_scenarios([small], runner, profile)
        f.scenario, f.cells = small, cells or f.cells
        out_dir.mkdir(parents=True, exist_ok=True)
        f.path = out_dir / f"{small.name}.toml"
        comment = (f"differential mismatch on {runner.release} vs emulator profile {profile}\n"
                   f"shrunk from random seed {f.seed} ({f.tried} candidates tried)\n"
                   + "\n".join(c.describe() for c in f.cells[:10]))
        f.path.write_text(to_toml(small, comment))
        progress(f"seed {f.seed}: shrunk to {len(small.steps)} steps -> {f.path}")
    return checked, findings, errors


def main(argv: Sequence[str] | None = None) -> int:
    from ..kernel.lock import RunLock

    ap = argparse.ArgumentParser(prog="python -m ksmbench.compare.differential",
                                 description="random scenarios: host kernel vs emulator")
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    ap.add_argument("--out", default="differential-failures")
    ap.add_argument("--profile", default=None, help="emulator profile (default: by kernel release)")
    ap.add_argument("--wait", type=float, default=900)
    ap.add_argument("--kernel", default="host",
                    help="host (default) or any --kernel value of ksmbench run, e.g. debian:6.1")
    ap.add_argument("--batch", type=int, default=10, help="scenarios per kernel session / VM boot")
    ap.add_argument("--max-pages", type=int, default=48, help="largest random region")
    ap.add_argument("--max-steps", type=int, default=18, help="random steps after the set-up")
    ap.add_argument("--numa-nodes", type=int, default=1,
                    help="bind random regions to this many NUMA nodes (op mmap, node); a VM "
                         "kernel then boots with the nodes its batch binds to")
    ap.add_argument("--swap", action="store_true",
                    help="scenarios with swap = true and op reclaim (a VM kernel: its zram device)")
    ap.add_argument("--thp", action="store_true",
                    help="give every scenario a THP region (one or two huge pages)")
    args = ap.parse_args(argv)

    err = make_console(stderr=True)
    tally = Tally()
    started = time.monotonic()
    # the lock guards the host's KSM; a guest has its own (as ksmbench run decides)
    lock = RunLock(timeout=args.wait) if args.kernel == "host" else nullcontext()
    with lock, err.status("differential run") as status:
        runner = HostRunner() if args.kernel == "host" else BackendRunner(args.kernel)

        def progress(msg: str) -> None:
            status.update(esc(msg))
            err.log(esc(msg))

        checked, findings, errors = run_differential(
            range(args.seed, args.seed + args.count), Path(args.out), profile=args.profile,
            runner=runner, progress=progress, max_pages=args.max_pages,
            max_steps=args.max_steps, batch=args.batch, tally=tally, numa_nodes=args.numa_nodes,
            swap=args.swap, thp=args.thp)
    for e in errors:
        print("error:", e)
    for f in findings:
        print(f"MISMATCH seed {f.seed}: {f.path}")
        for c in f.cells[:5]:
            print("   ", c.describe())
    seconds = round(time.monotonic() - started, 1)
    print(f"{checked} random scenarios checked, {tally.cells} cells compared, "
          f"{len(findings)} mismatching, {len(errors)} errors, "
          f"{len(tally.not_applicable)} not applicable to this kernel, {seconds} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"kernel": args.kernel, "release": runner.release, "profile": args.profile
               or runner.profile, "seeds": [args.seed, args.seed + args.count - 1],
               "max_pages": args.max_pages, "max_steps": args.max_steps,
               "numa_nodes": args.numa_nodes, "swap": args.swap, "thp": args.thp,
               "scenarios_checked": checked, "cells_compared": tally.cells,
               "mismatching": [{"seed": f.seed, "reproducer": f.path.name if f.path else None,
                                "cells": [asdict(c) for c in f.cells[:10]]} for f in findings],
               "errors": errors, "not_applicable": tally.not_applicable, "seconds": seconds, "steps_by_op": dict(sorted(tally.ops.items()))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if findings else (2 if errors and not checked else 0)


if __name__ == "__main__":
    sys.exit(main())
