"""Real programs nobody here wrote, predicted and measured with ``ksmbench savings``:

    python -m ksmbench.savings.workloads [python] [redis] [qemu] [--copies N] [--out DIR]

* ``python``: N idle Python interpreters that imported numpy, pandas and
  matplotlib (the PyPI packages ksmbench itself depends on).
* ``redis``: N ``redis-server`` (Debian package: ``vm/install-host-deps
  --workloads``), each on 127.0.0.1 with its own port and directory, each
  loading the same dump (100,000 keys written once by a seed server here).

* ``qemu``: N QEMU guests (TCG, 256 MiB, one vCPU) of the same Debian kernel
  (debian:6.12, fetched like ``--kernel debian:6.12``), booted into a
  busybox initramfs that prints a line and sleeps.  QEMU marks guest RAM
  mergeable itself (``-machine mem-merge=on``, the classic KSM case), so the
  run uses ``--no-merge-any`` and only guest RAM counts.

Each workload is one ``ksmbench savings`` run (the command line, so exactly
what a user runs), with use_zero_pages=1 and the host's other tunables; its
run directory goes under ``--out``, and a table of predicted against
measured savings at convergence is printed and written to
``<out>/workloads.md`` and ``workloads.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..errors import KsmbenchError, UsageError

MIB = 1 << 20
PY_IDLE = ("import numpy, pandas, matplotlib, matplotlib.pyplot, time\n"
           "print('ready', flush=True)\n"
           "time.sleep(3600)\n")
REDIS_KEYS = 100_000
REDIS_BASE_PORT = 17300


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise KsmbenchError(f"timed out after {timeout:.0f} s waiting for the seed redis-server "
                        f"on 127.0.0.1:{port}")


def make_redis_dump(workdir: Path, keys: int = REDIS_KEYS) -> Path:
    """A dump.rdb with ``keys`` deterministic keys, written by a seed server."""
    from ..kernel.syscalls import die_with_parent

    seed = workdir / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    port = REDIS_BASE_PORT - 1
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(seed), "--save", "", "--appendonly", "no",
                             "--dbfilename", "dump.rdb"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)
    try:
        _wait_port(port, 30)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            batch = []
            for i in range(keys):
                value = f"user:{i}:" + ("x" * (i % 200)) + str(i * 7919)
                batch.append(_resp("SET", f"key:{i:07d}", value))
                if len(batch) == 1000:
                    s.sendall(b"".join(batch))
                    _drain(s, len(batch))
                    batch = []
            if batch:
                s.sendall(b"".join(batch))
                _drain(s, len(batch))
            s.sendall(_resp("SAVE"))
            _drain(s, 1)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    dump = seed / "dump.rdb"
    if not dump.exists():
        raise KsmbenchError("the seed redis-server wrote no dump.rdb")
    return dump


def _drain(s: socket.socket, replies: int) -> None:
    buf = b""
    while buf.count(b"\r\n") < replies:
        chunk = s.recv(65536)
        if not chunk:
            raise KsmbenchError("the seed redis-server closed the connection")
        buf += chunk


def redis_command(workdir: Path, copies: int) -> tuple[list[str], str]:
    if shutil.which("redis-server") is None:
        raise UsageError("redis-server is not installed",
                         hint="run vm/install-host-deps --workloads (Debian package redis-server)")
    dump = make_redis_dump(workdir)
    for i in range(copies):
        d = workdir / f"redis{i}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(dump, d / "dump.rdb")
        (workdir / f"redis-{i}.conf").write_text(
            f"port {REDIS_BASE_PORT + i}\nbind 127.0.0.1\ndir {d}\ndbfilename dump.rdb\n"
            "save \"\"\nappendonly no\ndaemonize no\nprotected-mode yes\nloglevel notice\n")
    return [shutil.which("redis-server"), str(workdir / "redis-{i}.conf")], \
        "line:Ready to accept connections"


GUEST_READY = "KSMBENCH-GUEST-READY"
GUEST_INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc
/bin/busybox mount -t proc proc /proc
/bin/busybox echo {GUEST_READY}
exec /bin/busybox sleep 1000000
"""


def qemu_command(workdir: Path, kernel: str = "debian:6.12") -> tuple[list[str], str, list[str]]:
    """QEMU argv for one guest, the readiness, and extra ksmbench savings options."""
    from ..backends.vm.kernels import resolve

    qemu = shutil.which("qemu-system-x86_64")
    busybox = shutil.which("busybox")
    cpio = shutil.which("cpio")
    if not (qemu and busybox and cpio):
        raise UsageError("the qemu workload needs qemu-system-x86_64, busybox and cpio",
                         hint="run vm/install-host-deps --build")
    image = resolve(kernel).image
    root = workdir / "initramfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "init").write_text(GUEST_INIT)
    os.chmod(root / "init", 0o755)
    names = "\n".join(["init", "bin", "bin/busybox"]) + "\n"
    initrd = workdir / "initrd.cpio"
    with open(initrd, "wb") as f:
        subprocess.run([cpio, "-o", "-H", "newc", "--quiet"], cwd=root, input=names.encode(),
                       stdout=f, check=True, timeout=60)
    argv = [qemu, "-machine", "pc,accel=tcg,mem-merge=on", "-cpu", "max", "-m", "256", "-smp", "1",
            "-kernel", str(image), "-initrd", str(initrd),
            "-append", "console=ttyS0 rdinit=/init panic=-1 quiet",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"]
    return argv, f"line:{GUEST_READY}", ["--no-merge-any", "--ready-timeout", "600"]


def run_workload(name: str, copies: int, out: Path, wait: float) -> Path:
    with tempfile.TemporaryDirectory(prefix=f"ksmbench-{name}-") as tmp:
        workdir = Path(tmp)
        extra: list[str] = []
        if name == "python":
            argv, ready = [sys.executable, "-c", PY_IDLE], "line:ready"
        elif name == "redis":
            argv, ready = redis_command(workdir, copies)
        elif name == "qemu":
            argv, ready, extra = qemu_command(workdir)
        else:
            raise UsageError(f"unknown workload '{name}' (python, redis, qemu)")
        parent = out / name
        parent.mkdir(parents=True, exist_ok=True)
        before = set(parent.iterdir())
        cmd = [sys.executable, "-m", "ksmbench.cli", "savings", "--copies", str(copies),
               "--ready", ready, "--ready-timeout", "300", "--use-zero-pages", "1",
               "--wait", str(wait), "--out", str(parent), *extra, "--", *argv]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, timeout=wait + 1800)
        new = sorted(set(parent.iterdir()) - before)
        if proc.returncode != 0 or not new:
            raise KsmbenchError(f"workload {name}: ksmbench savings exited with {proc.returncode}")
        return new[-1]


def row(name: str, rundir: Path) -> dict:
    m = json.loads((rundir / "metadata.json").read_text())
    e = m.get("error_at_convergence") or {}
    p = m.get("prediction") or {}
    ch = m.get("churn") or {}
    return {"workload": name, "copies": m.get("copies"), "run": rundir.name,
            "candidate_mib": (p.get("candidate_pages") or 0) * 4096 / MIB,
            "predicted_saved_mib": (e.get("predicted_saved_bytes") or 0) / MIB,
            "measured_saved_mib": (e.get("measured_saved_bytes") or 0) / MIB,
            "error_pct": e.get("saved_error_pct"),
            "general_profit_error_pct": e.get("general_profit_error_pct"),
            "churn_mib": (ch.get("bytes") or 0) / MIB, "churn_new_mib": (ch.get("new_bytes") or 0) / MIB,
            "thp_split_zero_pages": p.get("thp_split_zero_pages"),
            "converged_scan_predicted": p.get("converged_scan"),
            "converged_scan_measured": m.get("measured_converged_scan"),
            "seconds_to_converge_predicted": m.get("seconds_to_converge_predicted"),
            "seconds_to_converge_from_measured_cpu": m.get("seconds_to_converge_from_measured_cpu"),
            "ksmd_cpu_seconds_to_converge": m.get("ksmd_cpu_seconds_to_converge"),
            "snapshot_and_prediction_seconds": m.get("snapshot_and_prediction_seconds"),
            "tunables": m.get("tunables")}


def table(rows: list[dict]) -> str:
    head = ("| workload | copies | candidate MiB | predicted saved MiB | measured saved MiB | error "
            "| churn MiB (changed+gone / new) | converged (pred / meas) scan | time to converge "
            "(pred / from measured CPU) | ksmd CPU | snapshot + prediction |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        def f(v, fmt="{:.1f}"):
            return "" if v is None else fmt.format(v)
        lines.append(
            f"| {r['workload']} | {r['copies']} | {f(r['candidate_mib'])} | "
            f"{f(r['predicted_saved_mib'], '{:.2f}')} | {f(r['measured_saved_mib'], '{:.2f}')} | "
            f"{f(r['error_pct'], '{:+.2f} %')} | {f(r['churn_mib'], '{:.2f}')} / "
            f"{f(r['churn_new_mib'], '{:.2f}')} | {r['converged_scan_predicted']} / "
            f"{r['converged_scan_measured']} | {f(r['seconds_to_converge_predicted'], '{:.1f} s')} / "
            f"{f(r['seconds_to_converge_from_measured_cpu'], '{:.1f} s')} | "
            f"{f(r['ksmd_cpu_seconds_to_converge'], '{:.2f} s')} | "
            f"{f(r['snapshot_and_prediction_seconds'], '{:.2f} s')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ksmbench.savings.workloads",
                                description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="*", default=["python", "redis", "qemu"], metavar="WORKLOAD")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--out", default="results/workloads")
    p.add_argument("--wait", type=float, default=3600.0,
                   help="wait this long for another run's lock (default 3600)")
    p.add_argument("--summarize", action="store_true",
                   help="only rebuild workloads.md/json from the newest run of each workload")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        for name in args.workloads:
            run_workload(name, args.copies, out, args.wait)
    rows = summarize(out)
    print(table(rows))
    return 0


def summarize(out: Path) -> list[dict]:
    """workloads.md/json from the newest complete run of each workload under ``out``."""
    rows = []
    for name in ("python", "redis", "qemu"):
        runs = sorted(d for d in (out / name).glob("*") if (d / "metadata.json").exists()) \
            if (out / name).is_dir() else []
        done = [d for d in runs if json.loads((d / "metadata.json").read_text())
                .get("error_at_convergence")]
        if done:
            rows.append(row(name, done[-1]))
    (out / "workloads.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "workloads.md").write_text(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main())
