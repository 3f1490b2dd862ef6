"""Command line: argument parsing, progress display, one-line errors, exit codes.

Exit status: 0 all compared cells match and every ``expect`` holds; 1 some do
not; 2 the command could not complete (the one line on stderr says why and
what to do).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from .backends import add_vm_options
from .console import make_console
from .errors import KsmbenchError, UsageError


def _console(stderr: bool = False):
    return make_console(stderr=stderr)


#: commands whose arguments their own module parses: name -> (module, help)
DELEGATED_HELP = {
    "bench": ("ksmbench.bench.cli", "benchmark merge/unmerge/CoW speed and ksmd cost"),
    "report": ("ksmbench.report.cli", "figures and an HTML report from run directories"),
    "selftest": ("ksmbench.selftests", "run the kernel's own KSM selftests beside ksmbench"),
}
DELEGATED = {name: module for name, (module, _help) in DELEGATED_HELP.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # argparse's REMAINDER drops a delegated command's arguments when the
        # first one is an option (`bench --sizes 8`): hand them over untouched
        args = argparse.Namespace(func=_delegate(DELEGATED[argv[0]]), rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .kernel.tunables import Terminated, signals_as_exceptions

    try:
        with signals_as_exceptions():
            return int(args.func(args) or 0)
    except KsmbenchError as exc:
        print(f"ksmbench: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except Terminated as exc:
        print(f"ksmbench: {exc}: stopped; KSM tunables restored; results so far are kept",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ksmbench: interrupted: stopped; KSM tunables restored; results so far are kept",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksmbench", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ksmbench {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run scenarios on kernels and record observations")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                     help="scenario files, directories or built-in names (default: the built-in suite)")
    _kernel_options(run)
    run.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    run.add_argument("--profile", default="auto",
                     help="emulator profile to compare with (default: auto, by kernel version)")
    run.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for another run to finish instead of refusing")
    _matrix_options(run)
    run.set_defaults(func=cmd_run)

    emulate = sub.add_parser("emulate", help="predict a scenario's observations (no root, no kernel)")
    emulate.add_argument("scenarios", nargs="*", metavar="SCENARIO")
    emulate.add_argument("--profile", default="linux-6.18",
                         help="kernel behaviour profile: linux-X.Y[.Z][,+flag|,-flag...] "
                              "(default linux-6.18; python -m ksmbench.emulator lists the flags)")
    emulate.add_argument("--format", choices=("table", "csv"), default="table")
    emulate.set_defaults(func=cmd_emulate)

    identify = sub.add_parser("identify", help="which KSM behaviours a kernel has")
    _kernel_options(identify)
    identify.add_argument("--out", default="results",
                          help="parent of the run directory of the observations (default: results)")
    identify.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                          help="wait this long for another run to finish instead of refusing")
    _matrix_options(identify, formats=False)
    identify.set_defaults(func=cmd_identify)

    kernels = sub.add_parser("kernels", help="kernels that can be booted: cached and fetchable")
    kernels.set_defaults(func=cmd_kernels)

    scen = sub.add_parser("scenarios", help="list the built-in suite, or validate scenario files")
    scen.add_argument("files", nargs="*", metavar="FILE")
    scen.set_defaults(func=cmd_scenarios)

    for name, (module, helptext) in DELEGATED_HELP.items():
        sp = sub.add_parser(name, help=helptext, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_delegate(module))
    return p


def _kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", action="append", metavar="KERNEL",
                   help="host, debian:<major.minor>, or a path to a bzImage (repeatable; default: host)")
    add_vm_options(p)


def _matrix_options(p: argparse.ArgumentParser, *, formats: bool = True) -> None:
    """Many kernels at once (ksmbench.matrix) and the outputs CI farms read
    (ksmbench.formats)."""
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="boot up to N guests at once on an embedded Dask cluster (default: one "
                        "per core, as many as fit in memory; 1: one after the other, in this "
                        "process). The host kernel always runs alone")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run the guest kernels on this Dask cluster (workers need ksmbench)")
    if not formats:
        return
    p.add_argument("--format", choices=("table", "ktap"), default="table",
                   help="ktap: print kselftest KTAP on stdout (progress goes to stderr)")
    p.add_argument("--junit", metavar="FILE", help="also write the verdicts as JUnit XML")


def _delegate(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"this command is not available in this version ({exc})") from None
        return mod.main(args.rest)

    return run


# -- run ---------------------------------------------------------------------------

def _predictor():
    try:
        from .emulator import Predictor
    except ImportError:
        return None
    return Predictor()


def cmd_run(args: argparse.Namespace) -> int:
    from .backends import resolve_backend
    from .kernel.lock import RunLock
    from .progress import run_kernel_with_progress
    from .results import RunDir
    from .scenario import resolve_scenarios

    scenarios = resolve_scenarios(args.scenarios)
    kernels = args.kernel or ["host"]
    backends = [resolve_backend(k, memory=args.memory, cpus=args.cpus, accel=args.accel,
                                modules=args.modules) for k in kernels]
    for backend in backends:
        getattr(backend, "preflight", lambda: None)()
    predictor = _predictor()
    if predictor is not None and args.profile != "auto":
        predictor.check_profile(args.profile)
    console = _console(stderr=args.format == "ktap")
    from .matrix import jobs_for

    jobs = jobs_for(args, backends)
    if args.scheduler or jobs > 1:
        # -- many kernels at once: ksmbench.matrix
        from .matrix import run_kernels

        rundir, outcomes = run_kernels(args, console=console, scenarios=scenarios,
                                       backends=backends, predictor=predictor, jobs=jobs)
        return _finish_run(args, console, rundir, outcomes, scenarios)
    # the lock guards the host's KSM; VM kernels have their own, so a run of VM
    # kernels only does not wait for (or block) host runs
    from contextlib import nullcontext

    lock = RunLock(timeout=args.wait) if "host" in kernels else nullcontext()
    with lock:
        rundir = RunDir(args.out)
        rundir.metadata["command"] = ["ksmbench", *sys.argv[1:]]
        rundir.metadata["scenarios"] = [s.name for s in scenarios]
        console.print(f"run {rundir.run_id}: {len(scenarios)} scenarios on "
                      f"{', '.join(b.label for b in backends)} -> {rundir.path}")
        outcomes = []
        try:
            for backend in backends:
                outcomes.append(run_kernel_with_progress(console, rundir, backend, scenarios, predictor,
                                                args.profile))
        finally:
            rundir.close()
    return _finish_run(args, console, rundir, outcomes, scenarios)


def _finish_run(args: argparse.Namespace, console, rundir, outcomes, scenarios) -> int:
    from .runner import exit_status

    _print_summary(console, outcomes, scenarios)
    status = exit_status(outcomes)
    from .formats import read_run, record_details

    # why n/a, why an error, how long: for `report --format ktap|--junit` later
    record_details(rundir, outcomes)
    if args.format == "ktap" or args.junit:
        view = read_run(rundir.path)
        if args.junit:
            from .formats.junit_out import write_junit

            write_junit(view, args.junit)
        if args.format == "ktap":
            from .formats.ktap_out import render_ktap

            sys.stdout.write(render_ktap(view))
            sys.stdout.flush()
    console.print(f"results: {rundir.path}  (exit {status})")
    return status


def _print_summary(console, outcomes, scenarios) -> None:
    from rich.table import Table

    table = Table(title="scenarios", show_lines=False)
    for col in ("scenario", "kernel", "points", "compared", "mismatches", "expects", "verdict", "s"):
        table.add_column(col, justify="right" if col in ("points", "compared", "mismatches", "s") else "left")
    colours = {"match": "green", "observed": "cyan", "mismatch": "red", "error": "red",
               "n/a": "dim"}
    for k in outcomes:
        for s in scenarios:
            o = k.scenarios.get(s.name)
            if o is None:
                table.add_row(s.name, k.label, "", "", "", "", "[dim]not run[/dim]", "")
                continue
            exp = f"{o.expect_checked - len(o.expect_failures)}/{o.expect_checked}" if o.expect_checked else ""
            table.add_row(s.name, k.label, str(o.points), str(o.compared), str(len(o.mismatches)),
                          exp, f"[{colours[o.verdict]}]{o.verdict}[/]", f"{o.seconds:.1f}")
    console.print(table)
    if len(outcomes) > 1:
        matrix = Table(title="matrix: scenarios x kernels")
        matrix.add_column("scenario")
        for k in outcomes:
            matrix.add_column(k.label)
        for s in scenarios:
            cells = []
            for k in outcomes:
                o = k.scenarios.get(s.name)
                v = o.verdict if o else "not run"
                cells.append(f"[{colours.get(v, 'dim')}]{v}[/]")
            matrix.add_row(s.name, *cells)
        console.print(matrix)
    problems = [mm for k in outcomes for o in k.scenarios.values()
                for mm in (o.expect_failures + o.mismatches)]
    errors = [(k.label, o.scenario, o.error) for k in outcomes for o in k.scenarios.values() if o.error]
    for label, name, err in errors:
        console.print(f"[red]error[/red] {name} [{label}]: {err}")
    for k in outcomes:
        for o in k.scenarios.values():
            if o.skipped:
                console.print(f"[dim]not applicable[/dim] {o.scenario} [{k.label}]: {o.skipped}")
    if problems:
        console.print(f"first mismatching cells ({len(problems)} in all):")
        for mm in problems[:12]:
            console.print(f"  {mm.describe()}")


# -- other commands ----------------------------------------------------------------

def cmd_emulate(args: argparse.Namespace) -> int:
    try:
        from .emulator.cli import emulate_command
    except ImportError:
        raise UsageError("the emulator is not available in this version") from None
    return emulate_command(args)


def cmd_identify(args: argparse.Namespace) -> int:
    try:
        from .identify import identify_command
    except ImportError:
        raise UsageError("identify is not available in this version") from None
    return identify_command(args)


def cmd_kernels(args: argparse.Namespace) -> int:
    try:
        from .backends.vm.catalogue import kernels_command
    except ImportError:
        raise UsageError("the VM backend is not available in this version") from None
    return kernels_command(args)


def cmd_scenarios(args: argparse.Namespace) -> int:
    from .scenario import builtin_suite, load_scenario

    console = _console()
    if args.files:
        for f in args.files:
            s = load_scenario(f)
            console.print(f"{f}: ok ({s.name}: {len(s.steps)} steps, {s.scan_count} scans)")
        return 0
    for s in builtin_suite():
        console.print(f"[bold]{s.name}[/bold]: {s.description.splitlines()[0] if s.description else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
