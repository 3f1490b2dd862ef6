"""``ksmbench bench``: merge/unmerge/CoW speed, ksmd cost, memory savings, cross-check.

For ``--kernel host`` the benchmarks run here, holding the run lock.  For any
other kernel the *same command* runs inside a VM of that kernel (``ksmbench
bench --kernel host --label <kernel> --out <shared dir>``), and its run
directory is folded into this one, so every kernel's numbers come from the
same code.

Exit status: 0 all done (and the ksm_tests cross-check, where it ran, agrees
within its tolerance); 1 the cross-check disagrees; 2 something could not be
measured (one line on stderr says what).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..backends import add_vm_options
from ..console import esc, make_console
from ..errors import KsmbenchError, UsageError, os_boundary

PARTS = ("timings", "savings", "crosscheck")
#: defaults inside a VM: under TCG (nested KVM does not work here) everything
#: runs 10-20x slower than on the host, so the sizes are smaller
GUEST_SIZES = "4,16"
GUEST_SAVINGS_MIB = 8
GUEST_CROSSCHECK_MIB = 32
#: TCG guests are slow, and their cross-check is not judged (reported only)
GUEST_CROSSCHECK_PAIRS = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ksmbench bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Benchmark KSM: how fast ksmd merges, what unmerging and copy-on-write breaks
cost, how much CPU ksmd spends per page, and how much memory is saved, seen
three ways. Also cross-checks the merge speed with the kernel's ksm_tests -P.
For a VM kernel the same benchmarks run inside the guest.""",
        epilog="""\
exit status:
  0  everything was measured (and the ksm_tests cross-check, where judged, agrees)
  1  the cross-check disagrees
  2  something could not be measured (one line on stderr says what)""")
    p.add_argument("--kernel", action="append", metavar="KERNEL",
                   help="host, debian:<major.minor>, or a kernel image path (repeatable; default: host)")
    p.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    p.add_argument("--sizes", default=None, metavar="MIB,...",
                   help="region sizes for the timings (default: 16,64,256 on the host, 4,16 in a VM)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of every measurement (default: 5)")
    p.add_argument("--only", default=",".join(PARTS), metavar="PART,...",
                   help=f"parts to run: {', '.join(PARTS)} (default: all)")
    p.add_argument("--pages-to-scan", type=int, default=1000,
                   help="pages_to_scan of free-running ksmd (merge timing and ksm_tests -p; default 1000)")
    p.add_argument("--savings-procs", type=int, default=4, help="processes in the savings workload")
    p.add_argument("--savings-mib", type=int, default=None,
                   help="MiB per process in the savings workload (default: 64 host, 8 VM)")
    p.add_argument("--savings-repeats", type=int, default=3,
                   help="repetitions of the savings workload per use_zero_pages value (default: 3)")
    p.add_argument("--crosscheck-mib", type=int, default=None,
                   help="size for the ksm_tests -P cross-check (default: 100 as run_vmtests.sh; 32 in a VM)")
    p.add_argument("--crosscheck-pairs", type=int, default=None, metavar="N",
                   help="back-to-back (ksm_tests -P, ksmbench) pairs judged by the cross-check "
                        "(default: 21 on the host, 5 in a VM)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="allowed relative difference to ksm_tests -P (default: 0.05)")
    p.add_argument("--ksm-tests", metavar="PATH",
                   help="a ksm_tests binary to use instead of building one from linux-source")
    p.add_argument("--source-series", default=None, metavar="X.Y",
                   help="linux-source series to build ksm_tests from (default: closest to the kernel)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run to finish instead of refusing")
    add_vm_options(p)
    p.add_argument("--guest-repeats", type=int, default=None, metavar="N",
                   help="repetitions inside VMs (default: --repeats); TCG guests are slow")
    p.add_argument("--guest-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="limit for the benchmarks inside one VM (default: 3600)")
    # set by the host when it runs this command inside a guest
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UsageError(f"--only {text!r}: unknown part(s) {', '.join(bad) or '(none)'}",
                         hint=f"choose from {', '.join(PARTS)}")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    parts = parse_parts(args.only)
    kernels = args.kernel or ["host"]
    if not args.in_guest:
        from ..backends import resolve_backend

        for spec in kernels:  # refuse what cannot run before the run directory exists
            backend = resolve_backend(spec, memory=args.memory, cpus=args.cpus, accel=args.accel,
                                      modules=args.modules)
            backend.preflight()

    from .store import BenchStore

    console = make_console(stderr=args.in_guest)
    store = BenchStore(args.out, args.run_id)
    store.metadata["command"] = ["ksmbench", "bench", *(argv if argv is not None else sys.argv[2:])]
    store.metadata["parts"] = list(parts)
    console.print(f"bench {store.rundir.run_id}: {esc(', '.join(kernels))} -> {esc(store.path)}")
    failures: list[str] = []
    from ..kernel.lock import RunLock

    # one run at a time per machine, VM kernels included: a guest's QEMU may
    # register its RAM with KSM on the host, which other host runs must not meet
    lock = RunLock(timeout=args.wait)
    try:
        lock.acquire()
        for spec in kernels:
            try:
                if spec == "host":
                    from .runner import run_host

                    run_host(store, args.label or "host", args, parts, console)
                else:
                    run_guest(store, spec, args, parts, console)
            except KsmbenchError as exc:
                # one kernel failing does not lose the others' results
                store.rundir.kernel_entry(args.label or spec)["error"] = exc.one_line()
                if len(kernels) > 1:
                    console.print(f"[red]{esc(spec)}: {esc(exc.one_line())}[/red]")
                failures.append(f"{spec}: {exc.one_line()}")
    finally:
        lock.release()
        store.close()
    if not args.in_guest:
        from .summary import print_summary

        status = print_summary(console, store, args.tolerance)
    else:
        status = 0
    console.print(f"results: {esc(store.path)}")
    if failures:
        if len(kernels) == 1:
            raise KsmbenchError(failures[0])
        return 2
    return status


def guest_series(spec: str, args: argparse.Namespace) -> str | None:
    """The linux-source series to build ksm_tests from for a guest kernel."""
    if args.source_series:
        return args.source_series
    if spec.startswith("debian:"):
        return spec.split(":", 1)[1]
    return None  # an own image: the guest falls back to the kernel's release


def run_guest(store, spec: str, args: argparse.Namespace, parts: tuple[str, ...], console) -> None:
    """Run this same command inside a VM booted with ``spec``; fold its results in.

    The guest sees the host's filesystem read-only and writes its run
    directory into a shared directory under this run's directory; ksm_tests
    is built here first (the guest has no network).
    """
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    try:
        from ..backends.vm import GuestRun, resolve_kernel
        from ..backends.vm.accel import choose_accelerator
    except ImportError as exc:
        raise KsmbenchError(f"--kernel {spec}: the VM backend is not available ({exc})") from None
    label = spec
    sizes = args.sizes or GUEST_SIZES
    argv = [sys.executable, "-m", "ksmbench.cli", "bench", "--kernel", "host", "--in-guest",
            "--label", label, "--run-id", "guest", "--sizes", sizes,
            "--repeats", str(args.guest_repeats or args.repeats), "--only", ",".join(parts),
            "--pages-to-scan", str(args.pages_to_scan),
            "--savings-procs", str(args.savings_procs),
            "--savings-mib", str(args.savings_mib or GUEST_SAVINGS_MIB),
            "--savings-repeats", str(min(args.savings_repeats, args.guest_repeats or args.savings_repeats)),
            "--crosscheck-mib", str(args.crosscheck_mib or GUEST_CROSSCHECK_MIB),
            "--crosscheck-pairs", str(args.crosscheck_pairs or GUEST_CROSSCHECK_PAIRS),
            "--tolerance", str(args.tolerance), "--wait", "60"]
    if "crosscheck" in parts:
        binary = args.ksm_tests
        if binary is None:
            from .crosscheck import ksm_tests_binary

            series = guest_series(spec, args) or "6.12"
            try:
                path, _info = ksm_tests_binary(series, lambda m: console.print(f"{esc(label)}: {esc(m)}"),
                                               console)
                binary = str(path)
            except KsmbenchError as exc:
                console.print(f"[yellow]{esc(label)}: no ksm_tests for the cross-check: "
                              f"{esc(exc.one_line())}[/yellow]")
        if binary:
            argv += ["--ksm-tests", str(Path(binary).resolve())]
    slug = "".join(c if c.isalnum() else "-" for c in label)
    # the guest's own run directory lands in here; absolute, the guest's cwd is /
    shared = (store.path / f"guest-{slug}").resolve()
    with os_boundary(f"creating {shared}"):
        shared.mkdir()
    argv += ["--out", str(shared)]
    kernel = resolve_kernel(spec, modules=args.modules, console=console)
    decision = choose_accelerator(args.accel, kernel, memory=args.memory)
    entry = store.rundir.kernel_entry(label)
    entry.update({"backend": "vm", "kernel_image": str(kernel.image), "package": kernel.package,
                  "accelerator_requested": args.accel})
    run = GuestRun(kernel, argv, shared_dir=shared, accelerator=decision.accelerator,
                   memory=args.memory, cpus=args.cpus, timeout=args.guest_timeout,
                   console_log=shared / "console.log")
    console.print(f"{esc(label)}: booting {esc(kernel.release or kernel.image)} ({decision.accelerator}) "
                  f"to run the benchmarks inside")
    bench_csv = shared / "guest" / "bench.csv"
    with run, Progress(SpinnerColumn(), TextColumn("{task.fields[kernel]}", style="bold", markup=False),
                       TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                       console=console) as progress:
        task = progress.add_task("starting QEMU", kernel=label)
        while run.poll() is None:
            rows = _count_lines(bench_csv) - 1
            what = run.phase if rows < 1 else f"running: {rows} results written"
            progress.update(task, description=what)
            time.sleep(0.5)
        result = run.result()
        progress.update(task, description=f"done ({result.seconds:.0f} s)")
    entry.update({"accelerator": result.accelerator, "kernel_release": result.kernel_release,
                  "guest_seconds": round(result.seconds, 1),
                  "console_log": str(result.console_log) if result.console_log else None,
                  "guest_facts": result.facts})
    (shared / "stdout").write_text(result.stdout)
    (shared / "stderr").write_text(result.stderr)
    if result.returncode not in (0, 1) or not (shared / "guest" / "metadata.json").exists():
        last = [ln for ln in result.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise KsmbenchError(f"{label}: the benchmarks in the guest failed (exit {result.returncode}): "
                            f"{last[0]}", hint=f"see {shared}/stderr and {shared}/console.log")
    meta = store.merge_guest(shared / "guest", label)
    cc = store.sections.get(label, {}).get("crosscheck")
    if cc and not cc.get("error") and result.accelerator == "tcg":
        # under TCG every instruction is emulated, and a spinning owner costs
        # ksmd far more than on real CPUs: the 5 % comparison means nothing there
        cc["judged"] = False
        cc["not_judged_because"] = "the guest ran under QEMU TCG (software emulation)"
        store.set_section(label, "crosscheck", cc)
    for k in meta.get("kernels", []):
        for key, value in k.items():
            if key not in ("backend",):
                entry.setdefault(key, value)
    store.rundir.write_metadata()


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
