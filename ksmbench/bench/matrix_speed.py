"""How much ``--jobs N`` saves: the same kernel matrix with ``--jobs 1`` and
with ``--jobs N``, wall-clock time of each, and the ratio.

    python -m ksmbench.bench.matrix_speed --kernel debian:6.1 --kernel debian:6.12 --jobs 2

Each run is a real ``ksmbench run`` (a subprocess); the runs alternate
(N, 1, N, 1, ... with ``--repeat``) so that a change of the machine's load
touches both.  The 1-minute load average is sampled every 5 s during each
run: on a shared machine, a ratio means little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence


def _load() -> float:
    return os.getloadavg()[0]


def timed_run(kernels: Sequence[str], jobs: int, out: Path, scenarios: Sequence[str]) -> dict:
    argv = [sys.executable, "-m", "ksmbench.cli", "run", *scenarios,
            *[a for k in kernels for a in ("--kernel", k)], "--jobs", str(jobs), "--out", str(out)]
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_load())
            stop.wait(5.0)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    sampler.start()
    try:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=3600)
    finally:
        stop.set()
        sampler.join(timeout=10)
    seconds = time.monotonic() - started
    rundirs = sorted(p for p in out.iterdir() if p.is_dir())
    return {"jobs": jobs, "seconds": round(seconds, 1), "exit": proc.returncode,
            "load_mean": round(statistics.mean(samples), 2) if samples else None,
            "load_max": round(max(samples), 2) if samples else None,
            "rundir": str(rundirs[-1]) if rundirs else None,
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else []}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksmbench.bench.matrix_speed",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=None, help="parent of the run directories (default: a temp dir)")
    ap.add_argument("scenarios", nargs="*")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="ksmbench-matrix-speed-"))
    runs = []
    for i in range(args.repeat):
        order = (args.jobs, 1) if i % 2 == 0 else (1, args.jobs)
        for jobs in order:
            r = timed_run(args.kernel, jobs, out / f"jobs{jobs}", args.scenarios)
            runs.append(r)
            print(json.dumps(r), flush=True)
    one = [r["seconds"] for r in runs if r["jobs"] == 1]
    many = [r["seconds"] for r in runs if r["jobs"] == args.jobs]
    ratio = statistics.median(one) / statistics.median(many)
    print(f"--jobs 1: {statistics.median(one):.1f} s, --jobs {args.jobs}: "
          f"{statistics.median(many):.1f} s, speedup {ratio:.2f}x "
          f"(load average during the runs: "
          f"{', '.join(str(r['load_mean']) for r in runs)})")
    return 0 if all(r["exit"] in (0, 1) for r in runs) else 2


if __name__ == "__main__":
    sys.exit(main())
