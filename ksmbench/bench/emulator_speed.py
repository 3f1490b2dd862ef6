"""Emulator speed against the real ksmd: ``python -m ksmbench.bench.emulator_speed``.

For each size (default 64 MiB, 256 MiB, 1 GiB) one region of mixed content
(a third one repeated page, a third zero pages, a third unique pages;
use_zero_pages=1, max_page_sharing=256, smart_scan=1) is

* scanned by the real ksmd, one full scan per kick through the kernel layer
  (:class:`~ksmbench.backends.host.HostSession`: RunLock held by us,
  tunables through TunableChanges, ksmd stepped by ScanStepper), timing each
  scan by ksmd's own CPU time (its CPU clock, nanoseconds) and
  by wall time from the kick to the completed scan; and
* emulated, the same scenario through the model, timing each full scan by
  this thread's CPU time (the emulator is single-threaded Python + numpy).

Each measurement is repeated (``--repeat``, default 3) and the per-scan
median is reported, since other work on the machine adds noise to single
runs.  It prints a table per size (scan by scan: kernel CPU, kernel wall, emulator,
ratio emulator / kernel CPU, and whether the counters after the scan agree),
then the emulator's cost per page across sizes.  Rows are appended to
``<out>/<run-id>/emulator-bench.csv`` as they are measured.  ``--no-kernel``
skips the kernel side (no root needed).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from typing import Any, Sequence

from ..console import esc, make_console
from ..scenario.loader import scenario_from_dict
from ..emulator.emulate import ScenarioRun
from ..emulator.scan import full_scan
from .probes import live_runtime_ns

MIB = 1 << 20
PAGE = 4096
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
            "stable_node_chains", "stable_node_dups")


def mixed_spec(npages: int) -> dict[str, Any]:
    third = npages // 3
    return {
        "name": f"bench-mixed-{npages}",
        "description": "a third one repeated page, a third zero, a third unique",
        "ksm": {"use_zero_pages": True, "max_page_sharing": 256, "smart_scan": True},
        "step": [
            {"op": "mmap", "region": "a", "pages": npages},
            {"op": "fill", "region": "a", "range": [0, third], "pattern": "tag:bench-dup"},
            {"op": "fill", "region": "a", "range": [third, 2 * third], "pattern": "zero"},
            {"op": "fill", "region": "a", "range": [2 * third, npages], "pattern": "unique"},
            {"op": "madvise", "region": "a", "advice": "mergeable"},
        ],
    }


def parse_size(text: str) -> int:
    """'64M', '1G', '4096p' (pages) -> pages."""
    t = text.strip().upper()
    if t.endswith("P"):
        return int(t[:-1])
    mult = {"K": 1 << 10, "M": MIB, "G": 1 << 30}.get(t[-1])
    if mult is None:
        return int(t) // PAGE
    return int(float(t[:-1]) * mult) // PAGE


def emulate_scans(npages: int, scans: int, profile: str, repeat: int = 1
                  ) -> tuple[list[float], list[dict]]:
    """Per-scan median wall time over ``repeat`` fresh runs, and the counters."""
    scenario = scenario_from_dict(mixed_spec(npages), source="<bench>")
    runs = []
    for _ in range(repeat):
        run = ScenarioRun(scenario, profile)
        for step in scenario.steps:
            run.apply(step)
        times, counters = [], []
        for _ in range(scans):
            # CPU time of this thread, as ksmd's side is its CPU time: other
            # work on the (shared) machine then does not count against either
            t0 = time.thread_time()
            full_scan(run.ksm)
            times.append(time.thread_time() - t0)
            g = run.ksm.global_values()
            counters.append({k: g[k] for k in COUNTERS})
        runs.append(times)
    return [_median([r[i] for r in runs]) for i in range(scans)], counters




def _median(values: list) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def kernel_scans(session, npages: int, scans: int, repeat: int = 1
                 ) -> tuple[list[float | None], list[float], list[dict]]:
    """The same region in this process, scanned by the real ksmd, stepped.

    ``repeat`` times: run=2 between repeats unshares everything and frees every
    rmap item, so each repeat scans the same content from the same start.
    Returns per-scan medians (CPU, wall) and the counters of the last repeat."""
    from ..kernel import syscalls
    from ..scenario.patterns import FillId, fill_pages, parse_pattern

    spec = mixed_spec(npages)
    ch = session.changes
    ch.set("run", 2)
    ch.set("use_zero_pages", 1)
    ch.set("max_page_sharing", 256)
    if session.sysfs.has("smart_scan"):
        ch.set("smart_scan", 1)
    session.stepper.prepared = False
    region = syscalls.Region(npages)
    try:
        region.madvise("nohugepage")
        for step in spec["step"][1:4]:
            first, end = step["range"]
            pat = parse_pattern(step["pattern"])
            fill = FillId(spec["name"], 0)
            for off in range(0, end - first, 16384):
                n = min(16384, end - first - off)
                region.write_pages(first + off, fill_pages(pat, n, fill, offset=off))
        region.madvise("mergeable")
        pid = session.stepper.ksmd_pid
        cpu_runs, wall_runs = [], []
        for r in range(repeat):
            if r:
                ch.set("run", 2)  # back to the start: no KSM pages, no rmap items
                session.stepper.prepared = False
            cpu, wall, counters = [], [], []
            for _ in range(scans):
                c0 = live_runtime_ns(pid) if pid else None
                t0 = time.perf_counter()
                session.stepper.scan(pages_hint=npages, label="emulator bench")
                t1 = time.perf_counter()
                c1 = live_runtime_ns(pid) if pid else None
                cpu.append(None if c0 is None or c1 is None else (c1 - c0) / 1e9)
                wall.append(t1 - t0)
                counters.append({k: session.sysfs.read_int(k) for k in COUNTERS})
            cpu_runs.append(cpu)
            wall_runs.append(wall)
        return ([_median([run[i] for run in cpu_runs]) for i in range(scans)],
                [_median([run[i] for run in wall_runs]) for i in range(scans)], counters)
    finally:
        region.munmap()
        ch.set("run", 2)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.progress import Progress

    ap = argparse.ArgumentParser(prog="python -m ksmbench.bench.emulator_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64M,256M,1G", help="region sizes (default 64M,256M,1G)")
    ap.add_argument("--scans", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3,
                    help="repeat each measurement, report the per-scan median (default 3)")
    ap.add_argument("--profile", default=None,
                    help="emulator profile (default: the one that fits this kernel, else linux-6.18)")
    ap.add_argument("--no-kernel", action="store_true", help="emulator only (no root needed)")
    ap.add_argument("--wait", type=float, default=900, help="seconds to wait for the RunLock")
    ap.add_argument("--out", default="results", help="parent of the run directory")
    args = ap.parse_args(argv)
    from ..errors import KsmbenchError
    from ..kernel.features import kernel_release
    from ..kernel.tunables import signals_as_exceptions
    from ..results import RunDir
    from ..emulator.profiles import get_profile, profile_for_release

    console = make_console()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    profile = args.profile or profile_for_release(kernel_release()) or "linux-6.18"
    get_profile(profile)
    rundir = RunDir(args.out, tables=False)
    rundir.metadata.update({"command": ["python", "-m", "ksmbench.bench.emulator_speed", *sys.argv[1:]],
                            "benchmark": "emulator-speed", "emulator_profile": profile,
                            "kernel_release": kernel_release(), "sizes_pages": sizes})
    rundir.write_metadata()
    csv_path = rundir.path / "emulator-bench.csv"
    columns = ["pages", "mib", "scan", "kernel_cpu_s", "kernel_wall_s", "emulator_s",
               "ratio_emulator_to_kernel_cpu", "counters_agree"]
    results: list[dict] = []
    try:
        with signals_as_exceptions(), open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            session_cm = None
            if not args.no_kernel:
                from ..backends.host import HostSession
                from ..kernel.lock import RunLock

                lock = RunLock(timeout=args.wait)
                lock.acquire()
                session_cm = HostSession()
                session_cm.__enter__()
            try:
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task("benchmark", total=len(sizes) * 2)
                    for npages in sizes:
                        mib = npages * PAGE / MIB
                        kcpu = kwall = kcount = None
                        if session_cm is not None:
                            progress.update(task, description=f"{mib:.0f} MiB: real ksmd")
                            kcpu, kwall, kcount = kernel_scans(session_cm, npages, args.scans,
                                                               args.repeat)
                        progress.advance(task)
                        progress.update(task, description=f"{mib:.0f} MiB: emulator")
                        etimes, ecount = emulate_scans(npages, args.scans, profile, args.repeat)
                        progress.advance(task)
                        for i in range(args.scans):
                            row = {"pages": npages, "mib": round(mib, 1), "scan": i + 1,
                                   "kernel_cpu_s": None if kcpu is None else kcpu[i],
                                   "kernel_wall_s": None if kwall is None else kwall[i],
                                   "emulator_s": etimes[i],
                                   "ratio_emulator_to_kernel_cpu":
                                       None if not kcpu or not kcpu[i] else etimes[i] / kcpu[i],
                                   "counters_agree": None if kcount is None else kcount[i] == ecount[i]}
                            writer.writerow(row)
                            fh.flush()
                            results.append(row)
            finally:
                if session_cm is not None:
                    session_cm.__exit__(None, None, None)
                    lock.release()
    except KsmbenchError as exc:
        console.print(f"[red]ksmbench: error: {esc(exc.one_line())}[/red]")
        return 2
    finally:
        rundir.close()
    _report(console, results, sizes, args.scans)
    console.print(f"results: {esc(csv_path)}")
    bad = [r for r in results if r["counters_agree"] is False]
    slow = [r for r in results if r["ratio_emulator_to_kernel_cpu"] is not None
            and r["ratio_emulator_to_kernel_cpu"] > 1.0]
    return 1 if bad or slow else 0


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _report(console, results: list[dict], sizes: list[int], scans: int) -> None:
    from rich.table import Table

    for npages in sizes:
        rows = [r for r in results if r["pages"] == npages]
        t = Table(title=f"{npages} pages ({npages * PAGE / MIB:.0f} MiB), mixed content")
        for col in ("scan", "ksmd CPU s", "ksmd wall s", "emulator CPU s", "emulator/ksmd",
                    "counters"):
            t.add_column(col, justify="right")
        for r in rows:
            agree = {None: "-", True: "same", False: "DIFFER"}[r["counters_agree"]]
            t.add_row(str(r["scan"]), _fmt(r["kernel_cpu_s"]), _fmt(r["kernel_wall_s"]),
                      _fmt(r["emulator_s"]), _fmt(r["ratio_emulator_to_kernel_cpu"], 2), agree)
        console.print(t)
    t = Table(title="emulator cost per page by scan (growth with size: 1.00 = linear, "
                    "below 1 = better than linear)")
    t.add_column("pages", justify="right")
    for i in range(1, scans + 1):
        t.add_column(f"scan {i} µs/page", justify="right")
    t.add_column("all scans µs/page", justify="right")
    t.add_column("vs smallest", justify="right")
    base = None
    for npages in sizes:
        rows = [r for r in results if r["pages"] == npages]
        per = [r["emulator_s"] / npages * 1e6 for r in rows]
        total = sum(r["emulator_s"] for r in rows) / npages / len(rows) * 1e6
        base = base or total
        t.add_row(str(npages), *[f"{x:.3f}" for x in per], f"{total:.3f}", f"{total / base:.2f}")
    console.print(t)


if __name__ == "__main__":
    sys.exit(main())
