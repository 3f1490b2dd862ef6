"""Running the benchmarks on the running kernel (the host, or a guest running
this same code), with progress, writing every result as it is produced."""

from __future__ import annotations

import argparse

from ..console import esc
from ..errors import Busy, UsageError
from ..kernel.features import detect, kernel_release
from ..results import now_iso
from .savings import SavingsRun, Workload, combine, savings_metrics, series_rows
from .crosscheck import crosscheck_pairs, run_crosscheck
from .session import BenchSession, FreeRunTunables
from .store import BenchStore
from .timings import CASES, DEFAULT_SIZES_MIB, FrameView, cycle_bytes, parse_sizes, plan, run_cycle

PHASES_PER_CYCLE = 5
#: a unit of measurement that another KSM user disturbed is repeated up to this often
ATTEMPTS = 3


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


def _sizes(args: argparse.Namespace) -> tuple[int, ...]:
    return parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES_MIB


def check_memory(sizes: tuple[int, ...], workload: Workload | None) -> None:
    """Refuse before starting when the machine cannot hold the largest case."""
    from .probes import read_meminfo

    available = read_meminfo().get("MemAvailable", 0) * 1024
    need = max([cycle_bytes(s) for s in sizes] +
               [workload.processes * workload.mib_per_process * (1 << 20) * 2 if workload else 0])
    if need + (256 << 20) > available:
        raise UsageError(f"the largest benchmark needs about {need >> 20} MiB but only "
                         f"{available >> 20} MiB is available",
                         hint="pass smaller --sizes / --savings-mib")


def run_host(store: BenchStore, label: str, args: argparse.Namespace, parts: tuple[str, ...],
             console) -> None:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    sizes = _sizes(args)
    tun = FreeRunTunables(pages_to_scan=args.pages_to_scan)
    workload = Workload(args.savings_procs, args.savings_mib or 64) if "savings" in parts else None
    check_memory(sizes if "timings" in parts else (), workload)
    cycles = plan(sizes, args.repeats) if "timings" in parts else []
    total = (len(cycles) * PHASES_PER_CYCLE + (2 * args.savings_repeats if workload else 0)
             + (args.repeats + crosscheck_pairs(args) if "crosscheck" in parts else 0))
    entry = store.rundir.kernel_entry(label)
    entry.update({"backend": "host", "kernel_release": kernel_release(),
                  "features": detect(), "free_run_tunables": tun.to_dict(),
                  "sizes_mib": list(sizes), "repeats": args.repeats,
                  "cases": [f"{c}/use_zero_pages={u}" for c, u in CASES]})
    # the caller holds the run lock (ksmbench.bench.cli.main)
    with BenchSession(wait=args.wait) as session, Progress(
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

                    for row in exclusively(session, where, measure, wait=args.wait,
                                           console=console):
                        record(*row)
                    store.write_json()
            finally:
                frames.close()
        if workload:
            results = {}
            for uzp in (0, 1):
                recs = []
                for r in range(args.savings_repeats):
                    def say(msg, uzp=uzp, r=r):
                        progress.update(task, description=f"savings use_zero_pages={uzp} "
                                                          f"#{r + 1}: {msg}")

                    series, rec = exclusively(
                        session, f"savings use_zero_pages={uzp} #{r + 1}",
                        lambda uzp=uzp, say=say: SavingsRun(session, workload, uzp,
                                                            progress=say).run(),
                        wait=args.wait, console=console)
                    store.add_savings_rows(series_rows(label, uzp, r, series))
                    store.add_sample(label, "savings", "workload",
                                     workload.processes * workload.mib_per_process, uzp, r,
                                     savings_metrics(rec))
                    recs.append(rec)
                    results[str(uzp)] = combine(recs, workload)
                    store.set_section(label, "savings", results)
                    progress.update(task, advance=1)
        if "crosscheck" in parts:
            def say(msg):
                progress.update(task, description=f"cross-check: {msg}")

            def step():
                progress.update(task, advance=1)

            result = run_crosscheck(
                session, store, label, args, tun, say=say, step=step, console=console,
                exclusive=lambda what, fn: exclusively(session, what, fn, wait=args.wait,
                                                       console=console))
            store.set_section(label, "crosscheck", result)
        progress.update(task, description="done")
    entry["ksm_tunables_after"] = session.host.tunables_after
    entry["ended_at"] = now_iso()
    store.rundir.write_metadata()
