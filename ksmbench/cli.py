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
from .console import esc, make_console
from .errors import KsmbenchError, UsageError


def _console(stderr: bool = False):
    return make_console(stderr=stderr)


#: commands whose arguments their own module parses: name -> (module, help)
DELEGATED_HELP = {
    "bench": ("ksmbench.bench.cli", "benchmark merge/unmerge/CoW speed and ksmd cost"),
    "report": ("ksmbench.report.cli", "figures and an HTML report from run directories"),
    "selftest": ("ksmbench.selftests", "run the kernel's own KSM selftests beside ksmbench"),
    "savings": ("ksmbench.savings.cli",
                "what KSM saves for a real program: predicted before merging, then measured"),
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


DESCRIPTION = """\
Test and measure Linux KSM (kernel samepage merging). ksmbench runs small
memory scenarios on real kernels (this machine's, or Debian's and your own
booted in QEMU), reads every KSM counter after every step and every scan of
ksmd, and compares each value with a model of KSM that predicts it."""

EPILOG = """\
common tasks:
  ksmbench run --kernel host                  run the built-in suite on this kernel (root)
  ksmbench run --kernel debian:6.12 my.toml   run your scenario on a Debian kernel in QEMU
  ksmbench emulate zero-pages                 predict a scenario's counters (no root)
  ksmbench identify --kernel host             which KSM patches this kernel behaves as having
  ksmbench report results/<run-id>            figures, an HTML report and a summary

exit status:
  0  done: every compared value matched and every expect step held
  1  done, but some value or expect did not match (see the list printed)
  2  could not be done: one line on stderr says what failed and what to do

See 'ksmbench COMMAND --help' for what a command does and its options."""

#: the exit status paragraph of commands that compare with the model
COMPARE_EPILOG = """\
exit status:
  0  every compared value matched and every expect step held
  1  some value or expect step did not match
  2  the command could not complete (one line on stderr says why)"""


def _command(sub, name: str, summary: str, description: str, epilog: str | None = COMPARE_EPILOG):
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksmbench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ksmbench {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(metavar="COMMAND", title="commands")

    run = _command(sub, "run", "run scenarios on kernels and record observations", """\
Run scenarios on one or more kernels. After every step and every scan of ksmd,
each KSM counter is read and compared with the emulator's prediction for the
kernel's version. Everything lands in a new run directory under --out:
metadata.json, observations.csv and expectations.csv, written as measured.""")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                     help="scenario files, directories or built-in names (default: the built-in suite)")
    _kernel_options(run)
    run.add_argument("--numa-nodes", type=int, default=None, metavar="N",
                     help="NUMA nodes of VM guests (default: as many as the scenarios bind "
                          "regions to, op mmap node; 1 boots without -numa)")
    run.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    run.add_argument("--profile", default="auto",
                     help="emulator profile to compare with (default: auto, by kernel version)")
    run.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for another run to finish instead of refusing")
    _matrix_options(run)
    run.set_defaults(func=cmd_run)

    emulate = _command(sub, "emulate", "predict a scenario's observations (no root, no kernel)", """\
Print what the model of KSM predicts for each counter after every step and
scan, without running anything: no root and no KSM needed. 'expect' steps
are judged against the prediction.""", epilog="""\
exit status:
  0  every expect step holds in the prediction
  1  some expect step does not hold
  2  the command could not complete, or a step needs an interface the
     profile's kernels lack (one line on stderr says which)""")
    emulate.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                         help="scenario files, directories or built-in names (default: the built-in suite)")
    emulate.add_argument("--profile", default="auto",
                         help="kernel behaviour profile: auto (this machine's kernel, as run picks it) "
                              "or linux-X.Y[.Z][,+flag|,-flag...] (default: auto; "
                              "python -m ksmbench.emulator lists the flags)")
    emulate.add_argument("--format", choices=("table", "csv"), default="table",
                         help="table: one table per scenario, points as columns; csv: the columns "
                              "of observations.csv (default: table)")
    emulate.set_defaults(func=cmd_emulate)

    identify = _command(sub, "identify", "which KSM behaviours a kernel has", """\
Run the built-in suite and extra probe scenarios on each kernel, then tell,
behaviour by behaviour (each tied to a kernel commit), whether the kernel
has it, and which emulator profile fits it best. The observations are kept
in a run directory under --out.""", epilog="""\
exit status:
  0  the fitted profile predicts every observed value
  1  some values disagree even with the fitted profile
  2  the command could not complete (one line on stderr says why)""")
    _kernel_options(identify)
    identify.add_argument("--out", default="results",
                          help="parent of the run directory of the observations (default: results)")
    identify.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                          help="wait this long for another run to finish instead of refusing")
    _matrix_options(identify, formats=False)
    identify.set_defaults(func=cmd_identify)

    kernels = _command(sub, "kernels", "kernels that can be booted: cached and fetchable", """\
List the kernels --kernel can name: every Debian series the archive has today
(debian:<series>, with the package it resolves to and whether it is cached),
your own images already prepared, and whether VMs here use KVM or TCG.""",
                       epilog="exit status: 0 listed; 2 the archive could not be read")
    kernels.set_defaults(func=cmd_kernels)

    scen = _command(sub, "scenarios", "list the built-in suite, or validate scenario files", """\
Without arguments, list the built-in scenarios. With files or directories,
validate each scenario file and report every invalid one, not only the first.""",
                    epilog="exit status: 0 all valid; 2 some file is invalid (one line each on stderr)")
    scen.add_argument("files", nargs="*", metavar="FILE",
                      help="scenario files, directories of *.toml files, or built-in names to validate")
    scen.set_defaults(func=cmd_scenarios)

    from .compare.validate import add_parser as add_validate_parser

    add_validate_parser(sub)

    for name, (module, helptext) in DELEGATED_HELP.items():
        sp = sub.add_parser(name, help=helptext, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_delegate(module))
    return p


def _kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", action="append", metavar="KERNEL",
                   help="host, debian:<major.minor>, debian:all (every Debian series), or a path to "
                        "a bzImage (repeatable; default: host)")
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
    """The emulator's predictor; without one, `run` would compare nothing and
    exit 0, so a missing or broken emulator ends the command (exit 2)."""
    try:
        from .emulator import Predictor

        return Predictor()
    except Exception as exc:  # ImportError, or any failure building it
        what = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise KsmbenchError(f"the emulator cannot be loaded ({what}); nothing to compare with",
                            hint="reinstall ksmbench with `make setup`") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .backends import expand_kernel_specs, resolve_backend
    from .kernel.lock import RunLock
    from .progress import run_kernel_with_progress
    from .results import RunDir
    from .scenario import resolve_scenarios

    predictor = _predictor()  # first: without it there is nothing to judge
    if args.profile != "auto":
        predictor.check_profile(args.profile)
    scenarios = resolve_scenarios(args.scenarios)
    kernels = expand_kernel_specs(args.kernel)
    backends = [resolve_backend(k, memory=args.memory, cpus=args.cpus, accel=args.accel,
                                modules=args.modules, numa_nodes=args.numa_nodes)
                for k in kernels]
    for backend in backends:
        backend.preflight()
    console = _console(stderr=args.format == "ktap")
    from .matrix import jobs_for

    jobs = jobs_for(args, backends)
    if args.scheduler or jobs > 1:
        # -- many kernels at once: ksmbench.matrix
        from .matrix import run_kernels

        rundir, outcomes = run_kernels(args, console=console, scenarios=scenarios, specs=kernels,
                                       backends=backends, predictor=predictor, jobs=jobs,
                                       profile=args.profile)
        return _finish_run(args, console, rundir, outcomes, scenarios)
    # the lock guards the host's KSM; VM kernels have their own, so a run of VM
    # kernels only does not wait for (or block) host runs
    from contextlib import nullcontext

    lock = RunLock(timeout=args.wait) if "host" in kernels else nullcontext()
    with lock:
        rundir = RunDir(args.out)
        rundir.metadata["command"] = ["ksmbench", *sys.argv[1:]]
        rundir.metadata["scenarios"] = [s.name for s in scenarios]
        console.print(f"run {rundir.run_id}: {_count(len(scenarios), 'scenario')} on "
                      f"{esc(', '.join(b.label for b in backends))} -> {esc(rundir.path)}")
        outcomes = []
        try:
            for backend in backends:
                outcomes.append(run_kernel_with_progress(console, rundir, backend, scenarios, predictor,
                                                args.profile))
        except KeyboardInterrupt:
            # metadata.json says where (the runner wrote it); say where the results are
            rundir.metadata["kernels_not_run"] = [b.label for b in backends[len(outcomes) + 1:]]
            console.print(f"[yellow]interrupted[/yellow]: the results so far are in {esc(rundir.path)} "
                          "(metadata.json: interrupted)")
            raise
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
    console.print(f"results: {esc(rundir.path)}  (exit {status})")
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
                table.add_row(esc(s.name), esc(k.label), "", "", "", "", "[dim]not run[/dim]", "")
                continue
            exp = f"{o.expect_checked - len(o.expect_failures)}/{o.expect_checked}" if o.expect_checked else ""
            table.add_row(esc(s.name), esc(k.label), str(o.points), str(o.compared), str(len(o.mismatches)),
                          exp, f"[{colours[o.verdict]}]{o.verdict}[/]", f"{o.seconds:.1f}")
    console.print(table)
    if len(outcomes) > 1:
        matrix = Table(title="matrix: scenarios x kernels")
        matrix.add_column("scenario")
        for k in outcomes:
            matrix.add_column(esc(k.label))
        for s in scenarios:
            cells = []
            for k in outcomes:
                o = k.scenarios.get(s.name)
                v = o.verdict if o else "not run"
                cells.append(f"[{colours.get(v, 'dim')}]{v}[/]")
            matrix.add_row(esc(s.name), *cells)
        console.print(matrix)
    problems = [mm for k in outcomes for o in k.scenarios.values()
                for mm in (o.expect_failures + o.mismatches)]
    errors = [(k.label, o.scenario, o.error) for k in outcomes for o in k.scenarios.values() if o.error]
    for label, name, err in errors:
        console.print(f"[red]error[/red] {esc(name)} {esc(f'[{label}]')}: {esc(err)}")
    for k in outcomes:
        for o in k.scenarios.values():
            if o.skipped:
                console.print(f"[dim]not applicable[/dim] {esc(o.scenario)} {esc(f'[{k.label}]')}: "
                              f"{esc(o.skipped)}")
    # what a scenario left behind after all its processes exited (teardown point)
    for k in outcomes:
        for o in k.scenarios.values():
            for r in o.residue:
                colour = "yellow" if r.explained else "bold red"
                console.print(f"[{colour}]residue[/{colour}] {esc(r.describe())}")
    if problems:
        console.print(f"first mismatching cells ({len(problems)} in all):")
        for mm in problems[:12]:
            console.print(f"  {esc(mm.describe())}")


# -- other commands ----------------------------------------------------------------

def cmd_emulate(args: argparse.Namespace) -> int:
    try:
        from .emulator.cli import emulate_command
    except ImportError:
        raise UsageError("the emulator is not available in this version") from None
    return emulate_command(args)


def cmd_identify(args: argparse.Namespace) -> int:
    try:
        from .compare.identify import identify_command
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
    from .errors import ScenarioError
    from .scenario import builtin_suite, load_source, scenario_sources

    console = _console()
    if args.files:
        # validate every file, like a compiler: report each bad one, go on with the rest
        bad = good = 0
        for arg in args.files:
            try:
                sources = scenario_sources(arg)
            except ScenarioError as exc:
                print(f"ksmbench: error: {exc.one_line()}", file=sys.stderr)
                bad += 1
                continue
            for source in sources:
                try:
                    s = load_source(source)
                except ScenarioError as exc:
                    print(f"ksmbench: error: {exc.one_line()}", file=sys.stderr)
                    bad += 1
                    continue
                good += 1
                console.print(f"{esc(source)}: ok ({esc(s.name)}: {_count(len(s.steps), 'step')}, "
                              f"{_count(s.scan_count, 'scan')})")
        if bad:
            if bad + good > 1:  # one file: its error line is the whole story
                print(f"ksmbench: {_count(bad, 'scenario file')} invalid, {good} valid",
                      file=sys.stderr)
            return 2
        return 0
    for s in builtin_suite():
        first = s.description.splitlines()[0] if s.description else ""
        console.print(f"[bold]{esc(s.name)}[/bold]: {esc(first)}")
    return 0


def _count(n: int, noun: str) -> str:
    """``1 scenario``, ``2 scenarios``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


if __name__ == "__main__":
    sys.exit(main())
