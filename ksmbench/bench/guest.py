"""Running the benchmarks inside a VM of another kernel: the guest runs this
same code (``ksmbench bench`` with the configuration :meth:`BenchConfig.for_guest`
derives, handed over as a JSON file), and its run directory is folded into the
host's (:meth:`~ksmbench.bench.store.BenchStore.merge_guest`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..console import esc
from ..errors import KsmbenchError, os_boundary
from .config import BenchConfig
from .crosscheck import ksm_tests_binary
from .outcome import CrosscheckResult
from .store import BenchStore

#: the guest's configuration, in the directory it shares with the host
CONFIG_FILE = "config.json"


def guest_series(spec: str, config: BenchConfig) -> str | None:
    """The linux-source series to build ksm_tests from for a guest kernel."""
    if config.source_series:
        return config.source_series
    if spec.startswith("debian:"):
        return spec.split(":", 1)[1]
    return None  # an own image: the guest falls back to the kernel's release


def guest_argv(config_file: Path) -> list[str]:
    """The command the guest runs: ``ksmbench bench`` reading its whole
    configuration from ``config_file``."""
    return [sys.executable, "-m", "ksmbench.cli", "bench", "--config", str(config_file)]


def run_guest(store: BenchStore, spec: str, config: BenchConfig, console) -> None:
    """Run the benchmarks of ``config`` inside a VM booted with ``spec``; fold
    its results in.

    The guest sees the host's filesystem read-only and writes its run
    directory into a shared directory under this run's directory; ksm_tests
    is built here first (the guest has no network).
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    try:
        from ..backends.vm import GuestRun, resolve_kernel
        from ..backends.vm.accel import choose_accelerator
    except ImportError as exc:
        raise KsmbenchError(f"--kernel {spec}: the VM backend is not available ({exc})") from None
    label = spec
    binary = config.ksm_tests
    if "crosscheck" in config.parts and binary is None:
        series = guest_series(spec, config) or "6.12"
        try:
            path, _info = ksm_tests_binary(series, lambda m: console.print(f"{esc(label)}: {esc(m)}"),
                                           console)
            binary = str(path)
        except KsmbenchError as exc:
            console.print(f"[yellow]{esc(label)}: no ksm_tests for the cross-check: "
                          f"{esc(exc.one_line())}[/yellow]")
    slug = "".join(c if c.isalnum() else "-" for c in label)
    # the guest's own run directory lands in here; absolute, the guest's cwd is /
    shared = (store.path / f"guest-{slug}").resolve()
    guest_config = config.for_guest(label, str(shared),
                                    str(Path(binary).resolve()) if binary else None)
    with os_boundary(f"creating {shared}"):
        shared.mkdir()
        (shared / CONFIG_FILE).write_text(guest_config.to_json())
    kernel = resolve_kernel(spec, modules=config.modules, console=console)
    decision = choose_accelerator(config.accel, kernel, memory=config.memory)
    entry = store.rundir.kernel_entry(label)
    entry.update({"backend": "vm", "kernel_image": str(kernel.image), "package": kernel.package,
                  "accelerator_requested": config.accel})
    run = GuestRun(kernel, guest_argv(shared / CONFIG_FILE), shared_dir=shared,
                   accelerator=decision.accelerator, memory=config.memory, cpus=config.cpus,
                   timeout=config.guest_timeout, console_log=shared / "console.log")
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
    cc = store.crosscheck(label)
    if isinstance(cc, CrosscheckResult) and result.accelerator == "tcg":
        # under TCG every instruction is emulated, and a spinning owner costs
        # ksmd far more than on real CPUs: the 5 % comparison means nothing there
        store.set_crosscheck(label, cc.not_judged("the guest ran under QEMU TCG (software emulation)"))
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
