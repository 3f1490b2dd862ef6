"""``ksmbench validate SOURCE --patches DIR``: what a patch changes, judged cell by cell.

1. SOURCE (a kernel tree, or ``debian-source:X.Y``) is copied once into the
   cache; every patch is checked to apply before anything is built.
2. The base (SOURCE as is) and each variant (the series in DIR, or with
   ``--each`` every patch alone) are built with the project's build path
   (:mod:`ksmbench.backends.vm.build`); images are cached (:mod:`.builds`).
3. Each kernel boots once and runs the scenarios (default: the built-in
   suite) plus identify's probes; the observations go to one run directory,
   each kernel under its own label (``base`` and the variant names), and are
   kept in the cache so an unchanged variant is not booted again.
4. Each variant is judged against the base (:mod:`.judge`); validate.csv gets
   one row per variant as soon as it is judged, validate-cells.csv every
   changed cell, validate-timings.csv the build/boot/suite seconds.

Exit status: 0 every variant as expected; 1 some variant changed behaviour
beyond ``--expect``; 2 a variant (or the base) could not be judged.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import KsmbenchError
from ..observation import (BackendInfo, Event, ScenarioFinished, ScenarioStarted, event_from_json,
                           event_to_json)
from ..progress import progress_message
from ..runner import KernelOutcome, Observer
from .builds import (BuiltImage, ImageCache, ValidateInputError, Variant, VariantError, WorkTree,
                     build_tools_missing, cache_dir, check_space, resolve_source, variants_from)
from .judge import Judgement, fitted_profile, format_expect, judge, parse_expect, with_flags

VALIDATE_COLUMNS = ("variant", "patch", "verdict", "cells_compared", "cells_changed",
                    "unexplained", "flags_blamed", "first_cell")
CELL_COLUMNS = ("variant", "scenario", "step", "scan", "metric", "base", "observed",
                "predicted_fitted", "predicted_expected", "kind")
#: build_seconds: the whole build (for a variant: copying the base object tree,
#: patching, configuring and make); rebuild_seconds: configure + make of a variant;
#: boot_seconds: QEMU start to user space; vm_seconds: boot plus every scenario
TIMING_COLUMNS = ("kernel", "image", "build_seconds", "rebuild_seconds", "boot_seconds",
                  "vm_seconds", "observations")
PHASES = ("apply", "build", "boot", "suite")


class _IntermixedParser(argparse.ArgumentParser):
    """Scenarios may follow the options (``validate SOURCE --patches DIR zero-pages``):
    plain argparse binds an empty SCENARIO list right after SOURCE and then rejects
    the later ones; the intermixed parse collects them wherever they are."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_parser(sub) -> None:
    """Register ``ksmbench validate`` on the CLI's subparsers."""
    from ..backends import add_vm_options

    kind, sub._parser_class = sub._parser_class, _IntermixedParser
    try:
        p = sub.add_parser("validate", help="judge a patch: base and patched kernels, cell by cell",
                           description="Build SOURCE as is (the base) and with the patches in "
                                       "DIR (the variants), boot each once, run the scenarios and "
                                       "judge every variant against the base cell by cell.")
    finally:
        sub._parser_class = kind
    p.add_argument("source", metavar="SOURCE",
                   help="kernel source tree, or debian-source:X.Y (Debian's linux-source-X.Y)")
    p.add_argument("--patches", required=True, type=Path, metavar="DIR",
                   help="patch directory: quilt 'series' order, else sorted *.patch/*.diff")
    p.add_argument("--each", action="store_true",
                   help="every patch is its own variant on the base (a mutation campaign)")
    p.add_argument("--expect", default="none", metavar="FLAGS",
                   help="behaviour flags the patch is meant to switch, e.g. +zero_page_tracking "
                        "or -zero_page_tracking,-fork_counter_fix (default: none: nothing "
                        "observable may change)")
    p.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="boot up to N kernels at once on an embedded Dask cluster, as `ksmbench "
                        "run --jobs` does: the base first, then the variants side by side "
                        "(default: 1, one after the other in this process)")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="boot the kernels on this Dask cluster (workers need ksmbench and QEMU; "
                        "the images are built here and shipped with each task)")
    p.add_argument("--make-jobs", type=int, metavar="N", help="make -jN (default: all CPUs)")
    p.add_argument("--rerun", action="store_true",
                   help="boot every kernel again even if its observations are cached")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="scenario files, directories or built-in names (default: the built-in "
                        "suite); identify's probes always run too")
    add_vm_options(p)
    # `--expect -zero_page_tracking` (as written in the docs) must be a value, not an
    # unknown option: argparse takes an argument that looks like a negative number
    # as a value, so flag lists count as "negative numbers" in this parser
    import re

    p._negative_number_matcher = re.compile(r"^-(\d+$|\d*\.\d+$|[a-z_]+(,[+-][a-z_]+)*$)")
    p.set_defaults(func=validate_command)


# -- running kernels ---------------------------------------------------------------

class CacheWriter(Observer):
    """Writes a kernel's event stream to ``record`` (the cache of its
    observations), kept only when every scenario ran to its end and the
    stream was not cut short."""

    def __init__(self, record: Path):
        self.record = record
        self.partial = record.with_suffix(".partial")

    def kernel_started(self, run: KernelOutcome, scenarios) -> None:
        self.out = open(self.partial, "w")
        self.clean = True

    def event(self, run: KernelOutcome, event: Event) -> None:
        if isinstance(event, ScenarioFinished) and event.error:
            self.clean = False
        self.out.write(event_to_json(event) + "\n")

    def kernel_ended(self, run: KernelOutcome) -> None:
        self.out.close()
        if self.clean and run.error is None and run.interrupted is None:
            os.replace(self.partial, self.record)
        else:
            self.partial.unlink(missing_ok=True)


class ReplayBackend:
    """A kernel's observations from the cache, as the event stream they came from."""

    def __init__(self, label: str, record: Path):
        self.label = label
        self.record = record
        #: nothing runs: no tunable of this machine changes
        self.tunables_after: dict[str, str] = {}

    def preflight(self) -> None:
        """Nothing to refuse: the record was found in the cache."""

    def events(self, scenarios, *, artifacts_dir: Path | None = None) -> Iterator[Event]:
        """``artifacts_dir`` is unused: the record is the artifact."""
        yield BackendInfo({"observations_from_cache": str(self.record)})
        with open(self.record) as fh:
            for line in fh:
                if line.strip():
                    yield event_from_json(line)


@dataclass
class KernelRun:
    label: str
    observed: dict = field(default_factory=dict)
    release: str | None = None
    errors: list[str] = field(default_factory=list)
    error: str | None = None
    boot_seconds: float | None = None
    suite_seconds: float | None = None
    cached: bool = False


def _suite_key(scenarios, args) -> str:
    from .. import __version__

    h = hashlib.sha256(repr([s for s in scenarios]).encode())
    h.update(f"{__version__}|{args.memory}|{args.cpus}|{args.accel}".encode())
    return h.hexdigest()[:16]


def run_kernel(rundir, label: str, image: BuiltImage, scenarios, args, suite_key: str,
               on_phase, profile: str = "auto") -> KernelRun:
    """Boot ``image`` and run ``scenarios`` (or replay its cached observations);
    ``profile`` is the emulator profile observations.csv compares them with."""
    from ..backends import resolve_backend
    from ..emulator import Predictor
    from ..runner import PointCollector, RunRecorder, Runner

    record = image.directory / f"observations-{suite_key}.jsonl"
    run = KernelRun(label)
    collected = PointCollector()
    observers: list[Observer] = [RunRecorder(rundir, predictor=Predictor(), profile=profile),
                                 collected, _Phases(on_phase)]
    if record.is_file() and not args.rerun:
        backend = ReplayBackend(label, record)
        run.cached = True
    else:
        backend = resolve_backend(str(image.image), memory=args.memory, cpus=args.cpus,
                                  accel=args.accel)
        backend.label = label
        observers.append(CacheWriter(record))
    on_phase("boot", "from the cache" if run.cached else None)
    runner = Runner(observers, artifacts_root=rundir.path)
    started = time.monotonic()
    outcome = runner.run_kernel(backend, scenarios)
    elapsed = time.monotonic() - started
    run.error = outcome.error
    run.release = outcome.info.get("kernel_release")
    run.boot_seconds = outcome.info.get("boot_seconds")
    run.suite_seconds = None if run.cached else round(elapsed, 1)
    entry = rundir.kernel_entry(label)
    if run.cached:
        entry["observations_from_cache"] = str(record)
    for name, o in outcome.scenarios.items():
        if o.error:
            run.errors.append(f"{name}: {o.error}")
    run.observed = collected.points
    return run


class _Phases(Observer):
    """validate's display: the boot's statuses until the first scenario starts,
    then one step per finished scenario."""

    def __init__(self, on_phase):
        self.on_phase = on_phase
        self.in_suite = False

    def event(self, run: KernelOutcome, event: Event) -> None:
        if isinstance(event, ScenarioStarted) and not self.in_suite:
            self.in_suite = True
            self.on_phase("suite", None)
        elif isinstance(event, ScenarioFinished):
            self.on_phase("suite", progress_message(run, event), advance=True)
        elif not self.in_suite and (status := progress_message(run, event)) is not None:
            self.on_phase("boot", status)


# -- the command -------------------------------------------------------------------

@dataclass
class VariantResult:
    variant: Variant | None
    label: str
    judgement: Judgement | None = None
    error: str | None = None
    #: the patch file names (when re-judged, the variant's patches are only names)
    patch: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        return self.judgement.verdict if self.judgement else "error"


def validate_command(args: argparse.Namespace) -> int:
    from ..console import make_console
    from .identify import probe_scenarios
    from ..scenario import resolve_scenarios

    console = make_console()
    err_console = make_console(stderr=True)
    expect = parse_expect(args.expect)
    for option, value in (("--jobs", args.jobs), ("--make-jobs", args.make_jobs)):
        if value is not None and value < 1:
            raise ValidateInputError(f"{option} {value}: must be at least 1")
    scenarios = list(resolve_scenarios(args.scenarios))
    have = {s.name for s in scenarios}
    scenarios += [p for p in probe_scenarios() if p.name not in have]
    missing = build_tools_missing()
    if missing:
        raise ValidateInputError(f"missing build tools: {', '.join(missing)}",
                                 hint="run vm/install-host-deps --build (as root)")
    variants = variants_from(args.patches.expanduser(), each=args.each)
    _unique_names(variants)
    client = cluster = None
    jobs = args.jobs or 1
    if args.scheduler or jobs > 1:
        from ..matrix import connect

        # before the source is fetched and before any run directory: an
        # unreachable scheduler is one line naming it, and nothing is left behind
        client, cluster = connect(args.scheduler, min(jobs, max(1, len(variants))))
    try:
        return _validate(args, console, err_console, expect, scenarios, variants, client)
    finally:
        if client is not None:
            from ..matrix import close_cluster

            close_cluster(client, cluster)


def _validate(args, console, err_console, expect, scenarios, variants, client) -> int:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    from ..backends.vm.build import FRAGMENT
    from ..results import RunDir

    source = resolve_source(args.source, console=err_console)
    tree = WorkTree(source)
    cache = ImageCache(tree, FRAGMENT, jobs=args.make_jobs)
    check_space(cache_dir(), cache.space_needed(variants))
    with console.status(f"preparing the source tree ({source.identity})"), tree.locked():
        tree.ensure()
        # every patch must apply before anything is built (nothing half-built)
        for v in variants:
            try:
                with tree.applied(v.patches):
                    pass
            except VariantError as exc:
                raise ValidateInputError(exc.message, hint=exc.hint) from None
    suite_key = _suite_key(scenarios, args)

    rundir = RunDir(args.out)
    rundir.metadata["command"] = ["ksmbench", *sys.argv[1:]]
    rundir.metadata["scenarios"] = [s.name for s in scenarios]
    rundir.metadata["validate"] = {
        "source": source.spec, "source_identity": source.identity, "expect": format_expect(expect),
        "each": args.each, "variants": [{"variant": v.name, "patches": [p.name for p in v.patches],
                                         "description": v.description} for v in variants]}
    if client is not None:
        rundir.metadata["matrix"] = {
            "jobs": None if args.scheduler else args.jobs,
            "scheduler": args.scheduler or "LocalCluster",
            "workers": len(client.scheduler_info().get("workers", {}))}
    rundir.write_metadata()
    where = f" on {args.scheduler or f'{args.jobs} local workers'}" if client is not None else ""
    console.print(f"validate {rundir.run_id}: {source.identity}, {len(variants)} variant(s), "
                  f"{len(scenarios)} scenarios, expect {format_expect(expect)}{where} -> {rundir.path}")
    results: list[VariantResult] = []
    timings: list[dict] = []
    started = time.monotonic()
    out = _Outputs(rundir.path)
    status = 0
    interrupted = False
    try:
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[kernel]:<28}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("{task.fields[phase]:<6} {task.description}"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            total = len(scenarios) + 3
            tasks = {label: progress.add_task("waiting", total=total, kernel=label, phase="",
                                              start=False)
                     for label in ["base", *[v.name for v in variants]]}
            if client is not None:
                on_cluster = _OnCluster(client, progress, tasks, cache, rundir, scenarios, args,
                                        suite_key, console)
                try:
                    early = on_cluster.validate(variants, expect, results, timings, out,
                                                err_console)
                finally:
                    on_cluster.close()
            else:
                early = _sequential(progress, tasks, cache, rundir, scenarios, args, suite_key,
                                    variants, expect, results, timings, out, err_console)
            if early is not None:
                return early
    except KeyboardInterrupt:
        interrupted = True
    finally:
        out.close()
        order = ["base", *[v.name for v in variants]]
        if client is not None:
            # kernels end in any order on a cluster: the files and lists get the
            # sequential run's order (variants as given) once every row is written
            out.reorder(order)
            results.sort(key=lambda r: order.index(r.label))
            timings.sort(key=lambda t: order.index(t["kernel"]))
        rundir.metadata["validate"]["results"] = [
            {"variant": r.label, "verdict": r.verdict, "error": r.error,
             "flags_blamed": r.judgement.flags_blamed if r.judgement else [],
             "changed": r.judgement.changed_by_scenario() if r.judgement else {}}
            for r in results]
        rundir.metadata["validate"]["timings"] = timings
        rundir.metadata["validate"]["seconds"] = round(time.monotonic() - started, 1)
        if interrupted:
            rundir.metadata["interrupted"] = True
        rundir.close()
        if client is not None:
            from ..matrix import sequential_order

            sequential_order(rundir.path, order, [s.name for s in scenarios])
    _print_results(console, results, timings, expect)
    for r in results:
        if r.verdict == "error":
            err_console.print(f"ksmbench: error: {r.label}: "
                              f"{r.error or '; '.join(r.judgement.errors[:1])}", soft_wrap=True)
    if interrupted:
        err_console.print("ksmbench: interrupted: finished variants are kept "
                          f"({len(results)} of {len(variants)} judged) in {rundir.path}")
        return 2
    if any(r.verdict == "error" for r in results):
        status = 2
    elif any(r.verdict == "changed" for r in results):
        status = 1
    console.print(f"results: {rundir.path}  ({time.monotonic() - started:.0f} s; exit {status})")
    return status


def _base_profiles(rundir, base_run: KernelRun, scenarios, expect) -> tuple[str, str]:
    """The base's fitted profile, and the profile each variant's rows in
    observations.csv are compared with: the fitted one with the --expect flags
    switched."""
    base_profile, base_bad = fitted_profile(base_run.observed, scenarios, base_run.release)
    rundir.metadata["validate"]["base_profile"] = base_profile
    rundir.metadata["validate"]["base_unmodelled_cells"] = base_bad
    expected_profile = with_flags(base_profile, expect) if expect else base_profile
    rundir.metadata["validate"]["expected_profile"] = expected_profile
    rundir.write_metadata()
    return base_profile, expected_profile


def _base_ran(rundir, base_run: KernelRun | None, base_timing: dict, scenarios, expect,
              timings: list, out, err_console) -> tuple[str, str] | None:
    """Record the base's timing; its profiles (:func:`_base_profiles`), or None
    after one error line when the base could not be judged."""
    timings.append(base_timing)
    out.timing(base_timing)
    base_error = _base_error(base_run, base_timing)
    if base_error:
        err_console.print(f"ksmbench: error: base: {base_error}")
        return None
    return _base_profiles(rundir, base_run, scenarios, expect)


def _base_error(base_run: KernelRun | None, base_timing: dict) -> str | None:
    base_error = base_run.error if base_run else None
    if base_run is not None and not base_error and not base_run.observed:
        base_error = "the base kernel reported no observations"
    if base_run is None or base_error:
        return base_error or base_timing["error"]
    return None


def _judged(progress, task, v: Variant, run: KernelRun | None, timing: dict, base_run: KernelRun,
            scenarios, base_profile: str, expect) -> VariantResult:
    if run is None or run.error:
        res = VariantResult(v, v.name, error=(run.error if run else timing["error"]))
    else:
        progress.update(task, phase="judge", description="fitting and comparing")
        res = VariantResult(v, v.name, judge(v.name, base_run.observed, run.observed,
                                             scenarios, base_profile, expect,
                                             errors=run.errors))
        progress.update(task, phase="done", description=res.verdict)
    if res.verdict == "error":
        progress.console.print(f"[red]{v.name}: {res.error or res.judgement.errors[0]}[/red]")
    return res


def _sequential(progress, tasks, cache, rundir, scenarios, args, suite_key, variants, expect,
                results, timings, out, err_console) -> int | None:
    """Every kernel booted here, one after the other: the base, then each
    variant, judged as soon as it has run.  Returns 2 when the base failed."""
    base_run, base_image, base_timing = _run_one(progress, tasks["base"], "base", None,
                                                cache, rundir, scenarios, args, suite_key)
    profiles = _base_ran(rundir, base_run, base_timing, scenarios, expect, timings, out,
                         err_console)
    if profiles is None:
        return 2
    base_profile, expected_profile = profiles
    for v in variants:
        task = tasks[v.name]
        run, image, timing = _run_one(progress, task, v.name, v, cache, rundir, scenarios,
                                      args, suite_key, expected_profile)
        timings.append(timing)
        out.timing(timing)
        res = _judged(progress, task, v, run, timing, base_run, scenarios, base_profile, expect)
        results.append(res)
        out.variant(res)
    return None


class _OnCluster:
    """validate's kernels booted on a Dask cluster (:mod:`ksmbench.matrix`:
    ``--jobs N`` an embedded LocalCluster, ``--scheduler`` an existing one).

    Every image is built here, where the source tree and the build cache are;
    a kernel whose observations are cached is replayed here too.  Every other
    kernel is one task of the matrix (:class:`~ksmbench.matrix.MatrixSession`):
    its image travels with the task (:class:`~ksmbench.matrix.ShippedImage`),
    its rows stream home scenario by scenario and are committed once into the
    run directory, a worker lost mid-task makes the kernel boot again on
    another, and the event stream comes back with the result to become the
    image's replay cache here.

    The base goes first and alone: each variant's rows are compared with the
    base's fitted profile (with the --expect flags switched), which is known
    only once the base has run.  The variants are built while the base runs,
    then run side by side, each judged as soon as it ends."""

    def __init__(self, client, progress, tasks, cache, rundir, scenarios, args, suite_key,
                 console):
        import uuid

        from ..matrix import MatrixSession

        self.progress, self.tasks, self.cache = progress, tasks, cache
        self.rundir, self.scenarios, self.args, self.suite_key = rundir, scenarios, args, suite_key
        self.console = console
        self.bars = {label: _phase_bar(progress, task) for label, task in tasks.items()}
        self.order = list(tasks)
        self.queue = f"ksmbench-{rundir.run_id}-{uuid.uuid4().hex[:6]}"
        self.session = MatrixSession(client, rundir, scenarios, self.queue, self._on_change)
        #: label -> (image, timing) of the kernels running on the cluster
        self.running: dict[str, tuple[BuiltImage, dict]] = {}
        #: label -> (run, timing) of the kernels that ended
        self.ended: dict[str, tuple[KernelRun, dict]] = {}

    def close(self) -> None:
        self.session.close()

    def _on_change(self, state, message: str, milestone: bool) -> None:
        label = state.task.label
        on_phase = self.bars[label]
        if not self.console.is_terminal and milestone:
            self.console.print(f"{label}: {message} ({len(state.committed)} of "
                               f"{len(self.scenarios)} scenarios)", markup=False, highlight=False)
        if milestone and ": " in message and message.split(": ", 1)[0] in state.committed:
            on_phase("suite", message, advance=True)          # a scenario committed
        elif not milestone:
            on_phase("suite" if state.points or state.committed else "boot", message)
        elif message.startswith("attempt on"):
            on_phase("boot", message)

    def start(self, label: str, image: BuiltImage, timing: dict, profile: str) -> None:
        """Replay the cached observations here, or send the kernel to the cluster."""
        from ..matrix import KernelTask, ShippedImage

        record = image.directory / f"observations-{self.suite_key}.jsonl"
        if record.is_file() and not self.args.rerun:
            run = run_kernel(self.rundir, label, image, self.scenarios, self.args, self.suite_key,
                             self.bars[label], profile)
            _ran(self.progress, self.tasks[label], run, timing)
            self.ended[label] = (run, timing)
            return
        local = self.args.scheduler is None
        task = KernelTask(self.order.index(label), str(image.image), label,
                          {"memory": self.args.memory, "cpus": self.args.cpus,
                           "accel": self.args.accel},
                          profile, self.rundir.run_id, self.queue,
                          str(self.rundir.path.resolve()) if local else None,
                          image=ShippedImage.read(image.image), record=True)
        self.session.submit(task)
        self.running[label] = (image, timing)
        self.bars[label]("boot", "queued on the cluster")

    def poll(self) -> None:
        """Collect the kernels that ended on the cluster."""
        from .identify import load_rundir

        ended = self.session.poll()
        if not ended:
            return
        observed, _releases = load_rundir(str(self.rundir.path))
        for outcome in ended:
            label = outcome.label
            image, timing = self.running.pop(label)
            result = self.session.results.get(label)
            run = KernelRun(label, error=outcome.error)
            run.release = outcome.info.get("kernel_release")
            run.boot_seconds = outcome.info.get("boot_seconds")
            run.suite_seconds = result.seconds if result is not None else None
            run.errors = [f"{name}: {o.error}" for name, o in outcome.scenarios.items() if o.error]
            run.observed = observed.get(label, {})
            if result is not None and result.events is not None:
                final = result.outcome
                clean = (final.error is None and final.interrupted is None
                         and all(o.error is None for o in final.scenarios.values()))
                if clean:
                    # the whole stream of the attempt that ran to its end: what
                    # CacheWriter keeps for a kernel booted here
                    record = image.directory / f"observations-{self.suite_key}.jsonl"
                    partial = record.with_suffix(".partial")
                    partial.write_text("".join(line + "\n" for line in result.events))
                    os.replace(partial, record)
            _ran(self.progress, self.tasks[label], run, timing)
            self.ended[label] = (run, timing)

    def wait(self, labels) -> None:
        while any(label in self.running for label in labels):
            time.sleep(0.2)
            self.poll()

    def validate(self, variants, expect, results, timings, out, err_console) -> int | None:
        timing = _new_timing("base")
        base_image = _build_one(self.progress, self.tasks["base"], self.bars["base"], None,
                                self.cache, timing)
        if base_image is not None:
            # "auto": the base's rows are compared with its release's profile,
            # as in a sequential run
            self.start("base", base_image, timing, "auto")
        else:
            self.ended["base"] = (None, timing)
        # the variants are built while the base runs on the cluster (none
        # when the base could not be built: nothing to judge them against)
        built: list[tuple[Variant, BuiltImage, dict]] = []
        for v in variants if base_image is not None else ():
            self.poll()
            vt = _new_timing(v.name)
            image = _build_one(self.progress, self.tasks[v.name], self.bars[v.name], v,
                               self.cache, vt)
            if image is None:
                timings.append(vt)
                out.timing(vt)
                res = _judged(self.progress, self.tasks[v.name], v, None, vt, None,
                              self.scenarios, "", expect)
                results.append(res)
                out.variant(res)
            else:
                built.append((v, image, vt))
        self.wait(["base"])
        base_run, base_timing = self.ended["base"]
        profiles = _base_ran(self.rundir, base_run, base_timing, self.scenarios, expect,
                             timings, out, err_console)
        if profiles is None:
            return 2
        base_profile, expected_profile = profiles
        by_name = {v.name: v for v, _image, _t in built}
        judged: set[str] = set()

        def judge_ended() -> None:
            for name in [n for n in by_name if n in self.ended and n not in judged]:
                judged.add(name)
                run, vt = self.ended[name]
                timings.append(vt)
                out.timing(vt)
                res = _judged(self.progress, self.tasks[name], by_name[name], run, vt, base_run,
                              self.scenarios, base_profile, expect)
                results.append(res)
                out.variant(res)

        for v, image, vt in built:
            self.start(v.name, image, vt, expected_profile)
            judge_ended()          # a replayed variant is judged at once
        while self.running:
            time.sleep(0.2)
            self.poll()
            judge_ended()
        judge_ended()
        return None


def _unique_names(variants: Sequence[Variant]) -> None:
    seen = set()
    for v in variants:
        if v.name in seen or v.name == "base":
            raise ValidateInputError(f"two variants would be called {v.name}",
                                     hint="rename one of the patch files")
        seen.add(v.name)


def _new_timing(label: str) -> dict:
    return {"kernel": label, "image": "", "build_seconds": "", "rebuild_seconds": "",
            "boot_seconds": "", "vm_seconds": "", "observations": "", "error": None}


def _phase_bar(progress, task):
    """``on_phase(phase, text, advance)`` moving one kernel's bar: one unit
    each for apply, build and boot, one per scenario."""
    state = {"phase": None}

    def on_phase(phase, text=None, advance=False):
        if phase != state["phase"]:
            state["phase"] = phase
            progress.update(task, completed=PHASES.index(phase))
        progress.update(task, phase=phase, description=(text or "")[:70],
                        advance=1 if advance else 0)

    on_phase.state = state
    return on_phase


def _build_one(progress, task, on_phase, variant, cache: ImageCache, timing: dict
               ) -> BuiltImage | None:
    """Build one kernel here (or take it from the cache); None: it failed
    (``timing["error"]`` says why)."""
    progress.start_task(task)
    state = on_phase.state
    try:
        if variant is None:
            on_phase("build", "base kernel")
            image = cache.base(status=lambda t: on_phase("build", t))
        else:
            on_phase("apply", variant.patch_label)
            image = cache.variant(variant, status=lambda t: on_phase(state["phase"] or "build", t),
                                  phase=lambda ph: on_phase(ph, variant.patch_label
                                                            if ph == "apply" else None))
    except VariantError as exc:
        timing["error"] = exc.one_line()
        progress.update(task, phase="error", description=exc.message[:70])
        return None
    timing["image"] = str(image.image)
    if image.cached:
        timing["build_seconds"] = "cached"
    elif variant is None:
        timing["build_seconds"] = round(image.seconds, 1)
    else:
        timing["build_seconds"] = round(image.seconds, 1)
        timing["rebuild_seconds"] = image.info.get("rebuild_seconds", "")
    if state["phase"] == "apply":
        on_phase("build", "cached image")
    return image


def _ran(progress, task, run: KernelRun, timing: dict) -> None:
    timing["boot_seconds"] = run.boot_seconds if run.boot_seconds is not None else ""
    timing["vm_seconds"] = run.suite_seconds if run.suite_seconds is not None else ""
    timing["observations"] = "cached" if run.cached else "measured"
    if run.error:
        timing["error"] = run.error
        progress.update(task, phase="error", description=run.error[:70])


def _run_one(progress, task, label, variant, cache: ImageCache, rundir, scenarios, args,
             suite_key, profile: str = "auto") -> tuple[KernelRun | None, BuiltImage | None, dict]:
    """Build (or take from the cache) and run one kernel, moving its progress bar."""
    timing = _new_timing(label)
    on_phase = _phase_bar(progress, task)
    image = _build_one(progress, task, on_phase, variant, cache, timing)
    if image is None:
        return None, None, timing
    run = run_kernel(rundir, label, image, scenarios, args, suite_key, on_phase, profile)
    _ran(progress, task, run, timing)
    return run, image, timing


class _Outputs:
    """validate.csv, validate-cells.csv and validate-timings.csv, written as produced."""

    def __init__(self, path: Path, *, timings: bool = True):
        self.files = []
        self.rows = self._open(path / "validate.csv", VALIDATE_COLUMNS)
        self.cells = self._open(path / "validate-cells.csv", CELL_COLUMNS)
        if timings:
            self.times = self._open(path / "validate-timings.csv", TIMING_COLUMNS)

    def _open(self, path: Path, columns):
        fh = open(path, "w", newline="")
        self.files.append(fh)
        w = csv.writer(fh)
        w.writerow(columns)
        fh.flush()
        return (fh, w)

    def _write(self, target, row) -> None:
        fh, w = target
        w.writerow(["" if v is None else v for v in row])
        fh.flush()

    def variant(self, r: VariantResult) -> None:
        patch = r.patch if r.patch is not None else (r.variant.patch_label if r.variant else "")
        j = r.judgement
        if j is None:
            self._write(self.rows, (r.label, patch, "error", 0, 0, 0, "", r.error or ""))
            return
        first = (j.unexplained or j.changed)
        first_cell = first[0].describe() if first else ""
        if j.errors:
            first_cell = j.errors[0]
        self._write(self.rows, (r.label, patch, j.verdict, j.compared, len(j.changed),
                                len(j.unexplained), " ".join(j.flags_blamed), first_cell))
        from .judge import show

        missed = [c for c in j.unexplained if c not in j.changed]
        for c, kind in [(c, c.kind) for c in j.changed] + [(c, "expected change missing")
                                                           for c in missed]:
            self._write(self.cells, (r.label, c.scenario, c.step, c.scan, c.metric, show(c.base),
                                     show(c.variant), show(c.fitted), show(c.expected), kind))

    def timing(self, t: dict) -> None:
        self._write(self.times, tuple(t[c] for c in TIMING_COLUMNS))

    def reorder(self, labels: Sequence[str]) -> None:
        """Rewrite the (closed) files with their rows in ``labels`` order
        (stable: a variant's cells keep theirs); atomic, file by file."""
        rank = {label: i for i, label in enumerate(labels)}
        for fh in self.files:
            path = Path(fh.name)
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            header, body = rows[0], rows[1:]
            body.sort(key=lambda r: rank.get(r[0], len(rank)))
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(body)
            os.replace(tmp, path)

    def close(self) -> None:
        for fh in self.files:
            fh.close()


def _print_results(console, results: Sequence[VariantResult], timings, expect) -> None:
    from rich.table import Table

    t = Table(title=f"validate: variants against the base (expect {format_expect(expect)})")
    for col in ("variant", "verdict", "compared", "changed", "unexplained", "flags blamed",
                "scenarios changed", "first cell"):
        t.add_column(col, justify="right" if col in ("compared", "changed", "unexplained") else "left",
                     overflow="fold")
    colours = {"as-expected": "green", "changed": "red", "error": "red"}
    for r in results:
        j = r.judgement
        if j is None:
            t.add_row(r.label, "[red]error[/red]", "", "", "", "", "", r.error or "")
            continue
        by = j.changed_by_scenario()
        first = (j.unexplained or j.changed)
        t.add_row(r.label, f"[{colours[j.verdict]}]{j.verdict}[/]", str(j.compared),
                  str(len(j.changed)), str(len(j.unexplained)), " ".join(j.flags_blamed),
                  f"{len(by)}: " + ", ".join(list(by)[:4]) + (" ..." if len(by) > 4 else "")
                  if by else "",
                  j.errors[0] if j.errors else (first[0].describe() if first else ""))
    console.print(t)
    tt = Table(title="timings (seconds)")
    for col in TIMING_COLUMNS[:-1]:
        tt.add_column(col, justify="left" if col in ("kernel", "image") else "right")
    for row in timings:
        tt.add_row(str(row["kernel"]), Path(row["image"]).parent.name if row["image"] else "",
                   *[str(row[c]) for c in TIMING_COLUMNS[2:-1]])
    console.print(tt)


# -- re-judging a run directory ------------------------------------------------------

def rejudge(rundir: Path, expect_text: str | None = None, console=None) -> list[VariantResult]:
    """Judge the observations of a validate run directory again (e.g. with other
    ``--expect`` flags); rewrites validate.csv and validate-cells.csv."""
    from .identify import load_rundir, probe_scenarios
    from ..scenario import builtin_suite

    meta_path = rundir / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidateInputError(f"{rundir}: not a run directory ({exc})") from None
    info = meta.get("validate")
    if not info:
        raise ValidateInputError(f"{rundir}: not written by ksmbench validate (no 'validate' "
                                 "in metadata.json)")
    expect = parse_expect(expect_text if expect_text is not None else info.get("expect"))
    observed, releases = load_rundir(str(rundir))
    if "base" not in observed:
        raise ValidateInputError(f"{rundir}: the base kernel has no observations")
    scenarios = [s for s in builtin_suite() + probe_scenarios() if s.name in meta["scenarios"]]
    base_profile, _bad = fitted_profile(observed["base"], scenarios, releases.get("base"))
    errors = {k["kernel"]: k.get("error") for k in meta.get("kernels", [])}
    verdicts = {k["kernel"]: k.get("verdicts", {}) for k in meta.get("kernels", [])}
    results = []
    out = _Outputs(rundir, timings=False)
    try:
        for v in info["variants"]:
            name = v["variant"]
            if name not in observed or errors.get(name):
                previous = next((r for r in info.get("results", []) if r["variant"] == name), {})
                res = VariantResult(None, name, error=errors.get(name) or previous.get("error")
                                    or "no observations")
            else:
                failed = [f"{sc}: error" for sc, verdict in verdicts.get(name, {}).items()
                          if verdict == "error"]
                res = VariantResult(None, name, judge(name, observed["base"], observed[name],
                                                      scenarios, base_profile, expect,
                                                      errors=failed))
            res.patch = " ".join(v.get("patches", []))
            results.append(res)
            out.variant(res)
    finally:
        out.close()
    info["expect"] = format_expect(expect)
    info["base_profile"] = base_profile
    info["results"] = [{"variant": r.label, "verdict": r.verdict, "error": r.error,
                        "flags_blamed": r.judgement.flags_blamed if r.judgement else [],
                        "changed": r.judgement.changed_by_scenario() if r.judgement else {}}
                       for r in results]
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ksmbench.compare.validate RUNDIR [--expect FLAGS]``."""
    from ..console import make_console

    ap = argparse.ArgumentParser(prog="python -m ksmbench.compare.validate",
                                 description="judge a validate run directory's observations again")
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--expect", default=None, metavar="FLAGS",
                    help="default: the run's own --expect")
    import re

    ap._negative_number_matcher = re.compile(r"^-(\d+$|\d*\.\d+$|[a-z_]+(,[+-][a-z_]+)*$)")
    args = ap.parse_args(argv)
    console = make_console()
    try:
        results = rejudge(args.rundir, args.expect)
    except KsmbenchError as exc:
        print(f"ksmbench: error: {exc.one_line()}", file=sys.stderr)
        return 2
    timings = []
    path = args.rundir / "validate-timings.csv"
    if path.exists():
        timings = [{c: row.get(c, "") for c in TIMING_COLUMNS}
                   for row in csv.DictReader(open(path))]
    expect = parse_expect(args.expect if args.expect is not None else
                          json.loads((args.rundir / "metadata.json").read_text())["validate"]["expect"])
    _print_results(console, results, timings, expect)
    if any(r.verdict == "error" for r in results):
        return 2
    return 1 if any(r.verdict == "changed" for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
