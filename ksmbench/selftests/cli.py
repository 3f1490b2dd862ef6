"""``ksmbench selftest``: the kernel's own KSM selftests beside ksmbench's verdicts.

For each ``--kernel``:

1. build ksm_tests and ksm_functional_tests from the Debian linux-source
   closest to that kernel (cached; ``--source`` picks another series);
2. run them on that kernel (the host, or a guest booted for it), each inside
   the tunables undo stack and under a time limit (:mod:`.execute`);
3. run the corresponding ksmbench scenarios on the same kernel through the
   Runner and the kernel's backend, and judge them with the checks written
   down in :mod:`.catalogue`;
4. print, per selftest, both verdicts and whether they agree.

Everything is kept in one run directory: ``observations.csv`` (the
scenarios, as ``ksmbench run`` writes it), ``selftests/<kernel>/*.log`` (what
each selftest printed), ``peers.csv`` and ``selftests.json`` (both verdicts
and every check).

Exit status: 0 every comparable pair agrees; 1 some disagree; 2 a kernel's
selftests or scenarios could not be run.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..backends import add_vm_options
from ..console import esc, make_console
from ..errors import KsmbenchError, UsageError
from ..sources.kernel_tools import SelftestBuild, closest_series, ksm_selftests
from . import catalogue
from .catalogue import PEERS, Peer
from .compare import DISAGREE, PeerRow, compare
from .execute import DEFAULT_TIMEOUT, Command, Execution, preflight, run_commands, write_plan

PEER_COLUMNS = ("kernel", "selftest", "source", "selftest_verdict", "scenario", "ksmbench_verdict",
                "agreement", "selftest_detail", "ksmbench_detail")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ksmbench selftest", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run the kernel's own KSM selftests (ksm_tests, ksm_functional_tests, built
from the closest Debian linux-source) on each kernel, and print their verdicts
beside ksmbench's verdicts for the same behaviours.""",
        epilog="""\
exit status:
  0  every selftest and ksmbench agree
  1  some disagree (listed at the end)
  2  a kernel's selftests or scenarios could not be run""")
    p.add_argument("--kernel", action="append", metavar="KERNEL",
                   help="host, debian:<major.minor>, or a bzImage path (repeatable; default: host)")
    p.add_argument("--source", action="append", default=[], metavar="[KERNEL=]SERIES",
                   help="build the selftests from linux-source-SERIES instead of the closest one "
                        "(for every kernel, or for KERNEL only), e.g. --source host=7.2")
    p.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run to finish instead of refusing")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"time limit per selftest program (default {DEFAULT_TIMEOUT:.0f}; "
                        "times 10 in TCG guests)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="only peers whose selftest or scenario contains TEXT (repeatable)")
    p.add_argument("--list", action="store_true",
                   help="print the selftest/scenario pairs and their checks, and exit")
    add_vm_options(p)
    return p


def _console():
    return make_console()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    peers = select_peers(args.only)
    console = _console()
    if args.list:
        print_catalogue(console, peers)
        return 0
    from ..backends import expand_kernel_specs, resolve_backend
    from ..kernel.lock import RunLock
    from ..results import RunDir

    kernels = expand_kernel_specs(args.kernel)
    if len(set(kernels)) != len(kernels):
        raise UsageError("a --kernel is given twice")
    sources = parse_sources(args.source, kernels)
    backends = [resolve_backend(k, memory=args.memory, cpus=args.cpus, accel=args.accel,
                                modules=args.modules) for k in kernels]
    for backend in backends:
        backend.preflight()
    scenarios = [catalogue.scenario(name) for name in catalogue.scenarios_needed(peers)]
    rundir = RunDir(args.out)
    rundir.metadata["command"] = ["ksmbench", "selftest", *(argv or sys.argv[2:])]
    rundir.metadata["scenarios"] = [s.name for s in scenarios]
    rundir.metadata["selftests"] = {}
    console.print(f"selftest run {rundir.run_id}: {len(peers)} selftest/scenario pairs on "
                  f"{esc(', '.join(b.label for b in backends))} -> {esc(rundir.path)}")
    reports: list[KernelReport] = []
    peers_file = open(rundir.path / "peers.csv", "w", newline="")
    writer = csv.writer(peers_file)
    writer.writerow(PEER_COLUMNS)
    try:
        for spec, backend in zip(kernels, backends):
            # the host's KSM is shared: one run at a time (guests have their own KSM)
            report = KernelReport(backend.label, spec)
            build_selftests(console, report, sources.get(spec))  # before the lock: may download
            guard = RunLock(timeout=args.wait) if spec == "host" else nullcontext()
            with guard:
                run_kernel(console, rundir, report, backend, peers, scenarios, args)
            reports.append(report)
            for row in report.rows:
                writer.writerow(_csv_row(row, report))
            peers_file.flush()
            rundir.metadata["selftests"][report.label] = report.summary()
            rundir.write_metadata()
            (rundir.path / "selftests.json").write_text(
                json.dumps([r.to_json() for r in reports], indent=1) + "\n")
            print_kernel(console, report)
    finally:
        peers_file.close()
        rundir.close()
    status = exit_status(reports)
    print_disagreements(console, reports)
    console.print(f"results: {esc(rundir.path)}  (exit {status})")
    return status


# -- arguments -----------------------------------------------------------------------

def select_peers(only: Sequence[str]) -> list[Peer]:
    if not only:
        return list(PEERS)
    chosen = [p for p in PEERS if any(t in p.selftest or t in (p.scenario or "")
                                      or t in p.command_id for t in only)]
    if not chosen:
        raise UsageError(f"--only {' '.join(only)} matches no selftest or scenario",
                         hint="see ksmbench selftest --list")
    return chosen


def parse_sources(values: Sequence[str], kernels: Sequence[str]) -> dict[str, str]:
    """``--source`` values -> {kernel spec: series}; a bare SERIES applies to every kernel."""
    out: dict[str, str] = {}
    for value in values:
        kernel, _, series = value.rpartition("=")
        if not re.fullmatch(r"\d+\.\d+", series):
            raise UsageError(f"--source {value}: SERIES must be major.minor, e.g. 6.12")
        if kernel:
            if kernel not in kernels:
                raise UsageError(f"--source {value}: {kernel} is not one of the --kernel values")
            out[kernel] = series
        else:
            for k in kernels:
                out.setdefault(k, series)
    return out


def kernel_series(spec: str) -> str:
    """The series whose linux-source is closest to this kernel's selftests."""
    from ..kernel.features import kernel_release

    if spec == "host":
        return closest_series(kernel_release())
    m = re.fullmatch(r"debian:(\d+\.\d+)", spec)
    if m:
        return m[1]
    from ..backends.vm.kernels import image_release

    release = image_release(Path(spec).expanduser())
    if release is None:
        raise UsageError(f"--kernel {spec}: cannot read the image's release to pick a "
                         "linux-source", hint=f"pass --source {spec}=<major.minor>")
    return closest_series(release)


# -- one kernel --------------------------------------------------------------------------

@dataclass
class KernelReport:
    label: str
    spec: str
    build: SelftestBuild | None = None
    build_error: str | None = None
    selftest_error: str | None = None
    scenario_error: str | None = None
    executions: list[Execution] = field(default_factory=list)
    kernel_release: str | None = None
    accelerator: str | None = None
    repaired: str | None = None
    rows: list[PeerRow] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.build.source if self.build else "-"

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.agreement] = counts.get(r.agreement, 0) + 1
        return {"kernel_release": self.kernel_release, "accelerator": self.accelerator,
                "selftest_source": self.source, "agreement": counts,
                "errors": [e for e in (self.build_error, self.selftest_error, self.scenario_error)
                           if e]}

    def to_json(self) -> dict:
        return {"kernel": self.label, **self.summary(),
                "executions": [{**e.to_json(), "output": None,
                                "left_changed": e.left_changed} for e in self.executions],
                "peers": [r.to_json() for r in self.rows]}


def build_selftests(console, report: KernelReport, source: str | None) -> None:
    """The selftests from the linux-source closest to the kernel (or ``--source``)."""
    try:
        series = source or kernel_series(report.spec)
        with console.status(esc(f"{report.label}: building the KSM selftests from linux-source "
                                f"closest to {series}")):
            report.build = ksm_selftests(series)
        console.print(esc(f"{report.label}: selftests from {report.build.source}"
                          + (f" (closest to {series})"
                             if report.build.package != f"linux-source-{series}" else "")
                          + "".join(f"; {why}" for why in report.build.missing.values())))
    except KsmbenchError as exc:
        report.build_error = exc.one_line()
        console.print(f"[red]{esc(report.label)}: {esc(report.build_error)}[/red]")


def run_kernel(console, rundir, report: KernelReport, backend, peers: list[Peer], scenarios,
               args) -> KernelReport:
    """The selftests, then ksmbench's scenarios, on one kernel; then both verdicts."""
    from ..backends.vm.kernels import safe_name

    spec = report.spec
    kdir = rundir.path / "selftests" / safe_name(backend.label)
    kdir.mkdir(parents=True, exist_ok=True)
    # 1. the selftests
    if report.build is not None:
        commands = selftest_commands(report.build, peers, kdir)
        try:
            if spec == "host":
                run_on_host(console, report, commands, args.timeout)
            else:
                run_in_vm(console, report, spec, commands, kdir, args)
        except KsmbenchError as exc:
            report.selftest_error = exc.one_line()
            console.print(f"[red]{esc(backend.label)}: selftests: {esc(report.selftest_error)}[/red]")
        for e in report.executions:
            if e.left_changed:
                shown = ", ".join(f"{k}={v[1]} (was {v[0]})" for k, v in e.left_changed.items())
                console.print(f"  {esc(e.id)} left {esc(shown)}: restored")
    # 2. ksmbench's scenarios on the same kernel, through the Runner
    from ..progress import run_kernel_with_progress
    from ..runner import PointCollector

    collected = PointCollector()
    outcome = run_kernel_with_progress(console, rundir, backend, scenarios, None, "auto",
                                       observers=[collected])
    if outcome.error:
        report.scenario_error = outcome.error
    report.kernel_release = report.kernel_release or outcome.info.get("kernel_release")
    report.accelerator = outcome.info.get("accelerator", report.accelerator or
                                          ("none (host)" if spec == "host" else None))
    # 3. both verdicts
    report.rows = compare(peers, backend.label, build=report.build,
                          executions={e.id: e for e in report.executions},
                          selftest_error=report.selftest_error or report.build_error,
                          points=collected.points,
                          scenario_errors={s.name: outcome.scenario_error(s.name) for s in scenarios})
    return report


def selftest_commands(build: SelftestBuild, peers: list[Peer], kdir: Path) -> list[Command]:
    commands = []
    for peer in catalogue.commands_needed(peers):
        binary = build.binaries.get(peer.program)
        if binary is None:
            continue
        slug = re.sub(r"[^A-Za-z0-9]+", "_", peer.command_id).strip("_")
        commands.append(Command(peer.command_id, (str(binary), *peer.args), str(build.directory),
                                str(kdir / f"{slug}.log")))
    return commands


def run_on_host(console, report: KernelReport, commands: list[Command], timeout: float) -> None:
    from ..kernel.features import kernel_release
    from ..kernel.procfs import ProcFS
    from ..kernel.sysfs import KsmSysfs

    sysfs, procfs = KsmSysfs(), ProcFS()
    report.kernel_release = kernel_release()
    report.accelerator = "none (host)"
    report.repaired = preflight(sysfs, procfs)
    if report.repaired:
        console.print(f"[yellow]{esc(report.repaired)}[/yellow]")
    with console.status(f"{esc(report.label)}: selftests") as status:
        report.executions = run_commands(
            commands, timeout=timeout, sysfs=sysfs, procfs=procfs,
            progress=lambda msg: status.update(esc(f"{report.label}: {msg}")))


def run_in_vm(console, report: KernelReport, spec: str, commands: list[Command], kdir: Path,
              args) -> None:
    from ..backends.vm import run_in_guest
    from ..backends.vm.boot import TCG_TIME_SCALE

    plan, result_file = kdir / "plan.json", kdir / "result.json"
    result_file.unlink(missing_ok=True)
    write_plan(plan, commands, args.timeout)
    # the guest's own per-program limits (scaled under TCG) come first; this one
    # only catches a guest that stopped making progress altogether
    budget = 120.0 + len(commands) * args.timeout * TCG_TIME_SCALE
    with console.status(f"{esc(report.label)}: booting and running the selftests in the guest"):
        guest = run_in_guest(spec, [sys.executable, "-m", "ksmbench.selftests.execute",
                                    str(plan), str(result_file)],
                             shared_dir=kdir, memory=args.memory, cpus=args.cpus, accel=args.accel,
                             timeout=budget, console_log=kdir / "console.log",
                             modules=args.modules)
    report.kernel_release = guest.kernel_release
    report.accelerator = guest.accelerator
    try:
        data = json.loads(result_file.read_text())
    except (OSError, ValueError):
        tail = (guest.stderr.strip().splitlines() or ["no output"])[-1]
        raise KsmbenchError(f"the selftest runner in the guest wrote no results (exit "
                            f"{guest.returncode}): {tail[:200]}",
                            hint=f"console log: {kdir / 'console.log'}") from None
    report.executions = [Execution.from_json(e) for e in data.get("executions", [])]
    report.repaired = data.get("repaired")
    report.kernel_release = data.get("kernel_release") or report.kernel_release
    if data.get("error"):
        raise KsmbenchError(f"in the guest: {data['error']}")


# -- output -------------------------------------------------------------------------------

_COLOURS = {"pass": "green", "agree": "green", "fail": "red", "DISAGREE": "bold red",
            "error": "red", "timeout": "red", "skip": "yellow", "unsupported": "yellow",
            "n/a": "dim", "absent": "dim", "none": "dim", "not run": "dim", "-": "dim"}


def _c(text: str) -> str:
    colour = _COLOURS.get(text)
    return f"[{colour}]{esc(text)}[/]" if colour else esc(text)


def print_kernel(console, report: KernelReport) -> None:
    from rich.table import Table

    title = (f"{report.label}: kernel {report.kernel_release or '?'}, accelerator "
             f"{report.accelerator or '?'}, selftests from {report.source}")
    table = Table(title=esc(title), title_justify="left")
    for col in ("selftest", "verdict", "ksmbench scenario", "verdict", "agreement"):
        table.add_column(col)
    for row in report.rows:
        table.add_row(esc(row.peer.selftest), _c(row.selftest.verdict), esc(row.peer.scenario or "-"),
                      _c(row.ours), _c(row.agreement))
    console.print(table)
    for e in (report.build_error, report.selftest_error, report.scenario_error):
        if e:
            console.print(f"[red]{esc(report.label)}: {esc(e)}[/red]")


def print_disagreements(console, reports: list[KernelReport]) -> None:
    rows = [r for rep in reports for r in rep.rows if r.agreement == DISAGREE]
    if not rows:
        console.print("no disagreements between the selftests and ksmbench")
        return
    console.print(f"[bold red]{len(rows)} disagreement(s):[/]")
    for r in rows:
        console.print("  " + esc(f"[{r.kernel}] {r.peer.selftest} ({r.selftest.verdict}: "
                                 f"{r.selftest.detail or '-'}) vs {r.peer.scenario} ({r.ours}: "
                                 f"{r.ours_detail})"))
        if r.peer.note:
            console.print(f"    note: {esc(r.peer.note)}")


def print_catalogue(console, peers: list[Peer]) -> None:
    for p in peers:
        console.print(f"[bold]{esc(p.selftest)}[/bold]"
                      + esc((f"  ({p.command_id})" if p.test else "") + f": {p.behaviour}"))
        console.print(f"  ksmbench scenario: {esc(p.scenario or 'none')}")
        for c in p.checks:
            console.print(f"    - {esc(c.describe())}")
        if p.note:
            console.print(f"  note: {esc(p.note)}")


def _csv_row(row: PeerRow, report: KernelReport) -> list[str]:
    return [row.kernel, row.peer.selftest, report.source, row.selftest.verdict,
            row.peer.scenario or "", row.ours, row.agreement, row.selftest.detail, row.ours_detail]


def exit_status(reports: list[KernelReport]) -> int:
    if any(r.build_error or r.selftest_error or r.scenario_error for r in reports):
        return 2
    if any(row.agreement == DISAGREE for r in reports for row in r.rows):
        return 1
    return 0
