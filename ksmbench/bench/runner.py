"""Running the benchmarks of a :class:`~ksmbench.bench.config.BenchConfig`:
:func:`run_benchmarks` runs every kernel of it under the run lock, each on
the running kernel (:func:`run_host`: the host, or a guest running this same
code) or inside a VM (:func:`~ksmbench.bench.guest.run_guest`), with
progress, writing every result as it is produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..backends import resolve_backend
from ..console import esc
from ..errors import Busy, KsmbenchError, UsageError
from ..kernel.lock import RunLock
from ..kernel.features import detect, kernel_release
from ..observation import baseline_note
from ..results import now_iso
from .savings import SavingsRun, Workload, combine, savings_metrics, series_rows
from .config import BenchConfig, FreeRunTunables
from .crosscheck import run_crosscheck
from .guest import run_guest
from .outcome import KernelBench
from .probes import read_meminfo
from .session import BenchSession
from .store import BenchStore
from .timings import CASES, FrameView, cycle_bytes, plan, run_cycle

PHASES_PER_CYCLE = 5
#: a unit of measurement that another KSM user disturbed is repeated up to this often
ATTEMPTS = 3


@dataclass
class BenchRun:
    """What :func:`run_benchmarks` produced."""

    path: Path                       # the run directory
    run_id: str
    results: dict[str, KernelBench]  # by kernel label
    #: one line per kernel that could not be measured ("<kernel>: <why>")
    failures: list[str] = field(default_factory=list)


def run_benchmarks(config: BenchConfig, console, command: Sequence[str]) -> BenchRun:
    """Run ``config`` into a new run directory under ``config.out``;
    ``command`` is recorded in its metadata.  A kernel that fails is recorded
    in the result (and in metadata.json), the others still run."""
    if not config.in_guest:
        for spec in config.kernels:  # refuse what cannot run before the run directory exists
            backend = resolve_backend(spec, memory=config.memory, cpus=config.cpus,
                                      accel=config.accel, modules=config.modules)
            backend.preflight()

    store = BenchStore(config.out, config.run_id)
    store.metadata["command"] = list(command)
    store.metadata["parts"] = list(config.parts)
    console.print(f"bench {store.rundir.run_id}: {esc(', '.join(config.kernels))} -> {esc(store.path)}")
    failures: list[str] = []
    # one run at a time per machine, VM kernels included: a guest's QEMU may
    # register its RAM with KSM on the host, which other host runs must not meet
    lock = RunLock(timeout=config.wait)
    try:
        lock.acquire()
        for spec in config.kernels:
            try:
                if spec == "host":
                    run_host(store, config.kernel_label(spec), config, console)
                else:
                    run_guest(store, spec, config, console)
            except KsmbenchError as exc:
                # one kernel failing does not lose the others' results
                store.rundir.kernel_entry(config.kernel_label(spec))["error"] = exc.one_line()
                if len(config.kernels) > 1:
                    console.print(f"[red]{esc(spec)}: {esc(exc.one_line())}[/red]")
                failures.append(f"{spec}: {exc.one_line()}")
    finally:
        lock.release()
        store.close()
    return BenchRun(store.path, store.rundir.run_id, store.results(), failures)


def exclusively(session: BenchSession, what: str, measure, *, wait: float, console):
    """Run ``measure()`` while KSM is ours alone; repeat it if another process
    registered with KSM meanwhile (its pages would be in every global counter
    and in ksmd's work).  Returns what ``measure`` returned."""
    for attempt in range(1, ATTEMPTS + 1):
        session.wait_exclusive(max(wait, 60.0), what)
        result = measure()
        intruder = session.still_exclusive()
        if intruder is None:
            return result
        console.print(f"[yellow]{esc(what)}: discarded and repeated ({attempt}/{ATTEMPTS}): "
                      f"{esc(intruder)}[/yellow]")
    raise Busy(f"{what}: other processes kept using KSM during {ATTEMPTS} attempts",
               hint="stop them (QEMU registers guest RAM with KSM unless -machine mem-merge=off)")


def check_memory(sizes: tuple[int, ...], workload: Workload | None) -> None:
    """Refuse before starting when the machine cannot hold the largest case."""
    available = read_meminfo().get("MemAvailable", 0) * 1024
    need = max([cycle_bytes(s) for s in sizes] +
               [workload.processes * workload.mib_per_process * (1 << 20) * 2 if workload else 0])
    if need + (256 << 20) > available:
        raise UsageError(f"the largest benchmark needs about {need >> 20} MiB but only "
                         f"{available >> 20} MiB is available",
                         hint="pass smaller --sizes / --savings-mib")


def run_host(store: BenchStore, label: str, config: BenchConfig, console) -> None:
    """Run ``config``'s parts on the running kernel; results go to ``store``
    under ``label``.  The caller holds the run lock."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    parts = config.parts
    sizes = config.sizes_or_default
    tun = FreeRunTunables(pages_to_scan=config.pages_to_scan)
    workload = (Workload(config.savings_procs, config.savings_mib_or_default)
                if "savings" in parts else None)
    check_memory(sizes if "timings" in parts else (), workload)
    cycles = plan(sizes, config.repeats) if "timings" in parts else []
    total = (len(cycles) * PHASES_PER_CYCLE + (2 * config.savings_repeats if workload else 0)
             + (config.repeats + config.crosscheck_pairs_or_default if "crosscheck" in parts else 0))
    entry = store.rundir.kernel_entry(label)
    entry.update({"backend": "host", "kernel_release": kernel_release(),
                  "features": detect(), "free_run_tunables": tun.to_dict(),
                  "sizes_mib": list(sizes), "repeats": config.repeats,
                  "cases": [f"{c}/use_zero_pages={u}" for c, u in CASES]})
    with BenchSession(wait=config.wait) as session, Progress(
            SpinnerColumn(), TextColumn("{task.fields[kernel]}", style="bold", markup=False),
            BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(), console=console,
            transient=False) as progress:
        entry["ksm_tunables_before"] = session.host.tunables_before
        for message in (session.host.repair_message, session.repair_message):
            if message:
                entry.setdefault("repaired", []).append(message)
                console.print(f"[yellow]{esc(message)}[/yellow]")
        store.rundir.write_metadata()
        task = progress.add_task("starting", total=total, kernel=label)

        def record(benchmark, case, size, uzp, repeat, metrics):
            store.add_sample(label, benchmark, case, size, uzp, repeat, metrics)

        if cycles:
            frames = FrameView()
            try:
                for repeat, content, uzp, size in cycles:
                    where = f"{content} uzp={uzp} {size} MiB #{repeat + 1}"

                    def phase(name, where=where):
                        progress.update(task, advance=1, description=f"{where}: {name}")

                    def measure(content=content, uzp=uzp, size=size, repeat=repeat,
                                phase=phase, where=where):
                        pending = []
                        progress.update(task, description=f"{where}: filling")
                        run_cycle(session, frames, content=content, use_zero_pages=uzp,
                                  size_mib=size, repeat=repeat, tun=tun,
                                  record=lambda *a: pending.append(a), phase=phase)
                        return pending

                    for row in exclusively(session, where, measure, wait=config.wait,
                                           console=console):
                        record(*row)
                    store.write_json()
            finally:
                frames.close()
        if workload:
            results = {}
            said = None
            for uzp in (0, 1):
                recs = []
                for r in range(config.savings_repeats):
                    def say(msg, uzp=uzp, r=r):
                        progress.update(task, description=f"savings use_zero_pages={uzp} "
                                                          f"#{r + 1}: {msg}")

                    series, rec = exclusively(
                        session, f"savings use_zero_pages={uzp} #{r + 1}",
                        lambda uzp=uzp, say=say: SavingsRun(session, workload, uzp,
                                                            progress=say).run(),
                        wait=config.wait, console=console)
                    note = baseline_note(rec["counters_baseline"])
                    if note and note != said:  # once, unless it changes
                        console.print(f"[yellow]savings: {esc(note)}[/yellow]")
                        said = note
                    store.add_savings_rows(series_rows(label, uzp, r, series))
                    store.add_sample(label, "savings", "workload",
                                     workload.processes * workload.mib_per_process, uzp, r,
                                     savings_metrics(rec))
                    recs.append(rec)
                    results[uzp] = combine(recs, workload)
                    store.set_savings(label, results)
                    progress.update(task, advance=1)
        if "crosscheck" in parts:
            def say(msg):
                progress.update(task, description=f"cross-check: {msg}")

            def step():
                progress.update(task, advance=1)

            result = run_crosscheck(
                session, store, label, config, tun, say=say, step=step, console=console,
                exclusive=lambda what, fn: exclusively(session, what, fn, wait=config.wait,
                                                       console=console))
            store.set_crosscheck(label, result)
        progress.update(task, description="done")
    entry["ksm_tunables_after"] = session.host.tunables_after
    entry["ended_at"] = now_iso()
    store.rundir.write_metadata()
