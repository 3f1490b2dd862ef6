"""Speed of the VM backend (issue 4, "Speed"): benchmark commands, not tests.

    python -m ksmbench.backends.vm.bench boot  [--kernel debian:6.12] [--repeat 3] [--accel auto]
    python -m ksmbench.backends.vm.bench suite [--kernel host --kernel debian:6.1 --kernel debian:6.12]

``boot``: wall time of booting a kernel and running ``/bin/true`` as root,
through ksmbench (:func:`run_in_guest`) and through plain ``vng --exec true``
on the same kernel image and accelerator, and their ratio (goal: ksmbench at
most 1.2x vng).  Plain vng is measured twice: on the Debian package as
unpacked (what a user would type: its full module tree lets the guest's udev
load a driver for every emulated device) and on ksmbench's boot root (same
image, trimmed module tree), so the ratio against the second one isolates
ksmbench's own overhead (launcher, console pump, polling).

``suite``: the whole built-in suite on several kernels in one ``ksmbench run``
(goal: under 5 minutes with TCG); prints the total and each kernel's share.

Each measurement is printed as it is made, and appended as one JSON line to
``--out FILE`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence


def _emit(out: Path | None, record: dict) -> None:
    print("  " + ", ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def _vng_true(image: Path, accelerator: str, memory: str, cpus: int, timeout: float) -> float:
    from .boot import vng_binary

    argv = [vng_binary(), "--run", str(image), "--memory", memory, "--cpus", str(cpus)]
    argv += ["--disable-kvm"] if accelerator == "tcg" else ["--disable-microvm"]
    # as in ksmbench's own boots: guest RAM not mergeable by the host's KSM
    argv += ["--qemu-opts=-machine mem-merge=off", "--exec", "true"]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=timeout, start_new_session=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"vng --exec true failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def bench_boot(spec: str, repeat: int, accel: str, memory: str, cpus: int, out: Path | None) -> int:
    from .accel import choose_accelerator
    from .command import run_in_guest
    from .kernels import resolve

    kernel = resolve(spec)
    accelerator = choose_accelerator(accel, kernel, memory=memory).accelerator
    print(f"boot-and-run: {spec} ({kernel.release}), {accelerator}, {memory}, {cpus} CPUs, "
          f"{repeat} runs each", flush=True)
    times: dict[str, list[float]] = {"ksmbench": [], "vng_boot_root": [], "vng_package": []}
    for i in range(1, repeat + 1):
        with tempfile.TemporaryDirectory(prefix="ksmbench-bench-") as shared:
            result = run_in_guest(spec, ["/bin/true"], shared_dir=shared, memory=memory,
                                  cpus=cpus, accel=accelerator, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"/bin/true in the guest exited {result.returncode}")
        times["ksmbench"].append(result.seconds)
        _emit(out, {"bench": "boot", "kernel": spec, "accelerator": result.accelerator,
                    "how": "ksmbench run_in_guest", "run": i, "seconds": round(result.seconds, 2)})
        t = _vng_true(kernel.boot_image, accelerator, memory, cpus, 300)
        times["vng_boot_root"].append(t)
        _emit(out, {"bench": "boot", "kernel": spec, "accelerator": accelerator,
                    "how": "vng --exec true (ksmbench boot root)", "run": i, "seconds": round(t, 2)})
        t = _vng_true(kernel.image, accelerator, memory, cpus, 300)
        times["vng_package"].append(t)
        _emit(out, {"bench": "boot", "kernel": spec, "accelerator": accelerator,
                    "how": "vng --exec true (Debian package as unpacked)", "run": i,
                    "seconds": round(t, 2)})
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "bench": "boot-summary", "kernel": spec, "accelerator": accelerator,
        "ksmbench_median_s": round(med["ksmbench"], 2),
        "vng_same_boot_root_median_s": round(med["vng_boot_root"], 2),
        "vng_debian_package_median_s": round(med["vng_package"], 2),
        "ratio_vs_same_boot_root": round(med["ksmbench"] / med["vng_boot_root"], 3),
        "ratio_vs_debian_package": round(med["ksmbench"] / med["vng_package"], 3),
    }
    print("summary (medians):", flush=True)
    _emit(out, summary)
    return 0


def bench_suite(kernels: Sequence[str], accel: str, memory: str, out: Path | None,
                results: Path, wait: float) -> int:
    argv = [str(Path(sys.executable).parent / "ksmbench"), "run", "--out", str(results),
            "--wait", str(wait), "--accel", accel, "--memory", memory]
    for k in kernels:
        argv += ["--kernel", k]
    print(f"suite: {' '.join(argv)}", flush=True)
    # the run's own wall time comes from its metadata (the lock wait is not in it)
    started = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL)
    total = time.monotonic() - started
    runs = sorted(results.glob("*/metadata.json"), key=lambda p: p.stat().st_mtime)
    record: dict = {"bench": "suite", "kernels": list(kernels), "exit": proc.returncode,
                    "total_seconds": round(total, 1)}
    if runs:
        meta = json.loads(runs[-1].read_text())
        record["run_dir"] = str(runs[-1].parent)
        import datetime as dt

        try:
            record["run_seconds (lock wait excluded)"] = (
                dt.datetime.fromisoformat(meta["ended_at"])
                - dt.datetime.fromisoformat(meta["started_at"])).total_seconds()
        except (KeyError, ValueError, TypeError):
            pass
        for entry in meta.get("kernels", []):
            try:
                a = dt.datetime.fromisoformat(entry["started_at"])
                b = dt.datetime.fromisoformat(entry["ended_at"])
                record[f"seconds[{entry['kernel']}]"] = (b - a).total_seconds()
            except (KeyError, ValueError, TypeError):
                pass
            if entry.get("boot_seconds") is not None:
                record[f"boot_seconds[{entry['kernel']}]"] = entry["boot_seconds"]
            if entry.get("accelerator"):
                record[f"accelerator[{entry['kernel']}]"] = entry["accelerator"]
    print("summary:", flush=True)
    _emit(out, record)
    return 0 if proc.returncode in (0, 1) else proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ksmbench.backends.vm.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("boot", help="ksmbench boot-and-run vs plain vng --exec true")
    b.add_argument("--kernel", default="debian:6.12")
    b.add_argument("--repeat", type=int, default=3)
    s = sub.add_parser("suite", help="the built-in suite on several kernels in one run")
    s.add_argument("--kernel", action="append", dest="kernels")
    s.add_argument("--results", type=Path, default=Path("results"))
    s.add_argument("--wait", type=float, default=900.0,
                   help="seconds to wait for another run holding the host's run lock")
    for sp in (b, s):
        sp.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
        sp.add_argument("--memory", default="2G")
        sp.add_argument("--out", type=Path, help="append each measurement as a JSON line here")
    b.add_argument("--cpus", type=int, default=2)
    args = p.parse_args(argv)
    if args.what == "boot":
        return bench_boot(args.kernel, args.repeat, args.accel, args.memory, args.cpus, args.out)
    return bench_suite(args.kernels or ["host", "debian:6.1", "debian:6.12"], args.accel,
                       args.memory, args.out, args.results, args.wait)


if __name__ == "__main__":
    sys.exit(main())
