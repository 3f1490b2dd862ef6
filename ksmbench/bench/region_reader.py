"""Benchmark: the region reader against the kernel's own ``page-types``.

    python -m ksmbench.bench.region_reader [--pages 262144] [--repeat 7]

A 1 GiB region (262,144 pages; a third one repeated content, a third zero, a
third unique) lives in an agent process.  Its region metrics (present,
zero_pfn, ksm, distinct_frames) are read by :class:`FrameReader` and the same
range of the same process is walked by ``tools/mm/page-types -p PID -a N+M``
(built from Debian's linux-source closest to the running kernel).  Both are
timed, interleaved, before KSM merges (every page its own frame) and after two
full scans with use_zero_pages=1; medians, spread and the ratio are printed.
The goal: the reader takes no longer than page-types.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from ..backends.host import AgentHandle, HostSession
from ..kernel.lock import RunLock
from ..kernel.procfs import FrameReader, ProcFS
from ..kernel.syscalls import PAGE_SIZE
from ..scenario.model import KsmSettings


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(pages: int, repeat: int, console) -> list[dict]:
    from ..sources.kernel_tools import page_types

    binary = page_types(console=console)
    rows = []
    with RunLock(timeout=900), HostSession() as session:
        session._apply_settings(KsmSettings(use_zero_pages=True))
        agent = AgentHandle.spawn("bench")
        session.agents["bench"] = agent
        addr = agent.call("mmap", "r", pages, False, timeout=120)
        third = pages // 3
        agent.call("fill", "r", 0, third, "cycle:region-bench:7", "region-bench", 0, timeout=300)
        agent.call("fill", "r", third, 2 * third, "zero", "region-bench", 1, timeout=300)
        agent.call("fill", "r", 2 * third, pages, "unique", "region-bench", 2, timeout=300)
        with FrameReader(ProcFS(), agent.pid) as reader:
            zero = FrameReader().discover_zero_pfn()
            argv = [str(binary), "-p", str(agent.pid), "-a", f"{addr // PAGE_SIZE}+{pages}"]
            for state in ("unmerged", "merged"):
                if state == "merged":
                    agent.call("madvise", "r", 0, pages, "mergeable", timeout=120)
                    for _ in range(2):
                        session.stepper.scan(pages_hint=pages, label="region bench")
                metrics = reader.region_metrics(addr, pages, [zero])
                ours, theirs = [], []
                for _ in range(repeat):  # interleaved, so drift hits both alike
                    ours += _time(lambda: reader.region_metrics(addr, pages, [zero]), 1)
                    theirs += _time(lambda: subprocess.run(argv, capture_output=True, check=True,
                                                           timeout=120), 1)
                rows.append({"state": state, "pages": pages, "metrics": metrics.__dict__,
                             "reader_s": ours, "page_types_s": theirs})
    return rows


def main(argv: list[str] | None = None) -> int:
    from rich.table import Table

    from ..console import make_console

    p = argparse.ArgumentParser(prog="ksmbench.bench.region_reader", description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=262144)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    console = make_console()
    with console.status("building page-types, preparing a region, measuring"):
        rows = measure(args.pages, args.repeat, console)
    table = Table(title=f"region metrics of {args.pages} pages ({args.pages * PAGE_SIZE >> 20} MiB): "
                        "present/zero_pfn/ksm/distinct_frames")
    for col in ("state", "metrics", "reader", "page-types", "ratio", "reader spread"):
        table.add_column(col, no_wrap=True)
    worst = 0.0
    for r in rows:
        a, b = statistics.median(r["reader_s"]), statistics.median(r["page_types_s"])
        worst = max(worst, a / b)
        m = r["metrics"]
        table.add_row(r["state"], f"{m['present']}/{m['zero_pfn']}/{m['ksm']}/{m['distinct_frames']}",
                      f"{a * 1e3:.1f} ms", f"{b * 1e3:.1f} ms", f"{a / b:.2f}",
                      f"{(max(r['reader_s']) - min(r['reader_s'])) * 1e3:.1f} ms")
    table.caption = f"medians of {args.repeat} interleaved runs; ratio = reader / page-types"
    console.print(table)
    verdict = "meets" if worst <= 1.0 else "MISSES"
    console.print(f"{verdict} the goal (reader no slower than page-types): worst ratio {worst:.2f}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
