"""KVM only if it really works, else TCG; the verdict cached per host.

On this kind of machine ``/dev/kvm`` opens and KVM_CREATE_VM succeeds, but
nested guests do not run: with ``-cpu host`` QEMU aborts ("failed to set MSR
0x10a"), with other CPU models a 6.1 guest hangs after "Probing EDD" and a
6.12 guest stops with "KVM internal error" (docs/vm-boot.md).  virtme-ng's own
choice (``accel=kvm:tcg`` whenever /dev/kvm can be opened) would hang there.

So the probe boots the very kernel about to be used, the way it will be used
(virtme-ng with KVM, the same launcher), and requires the guest to reach user
space and run a command, all within 30 s; a TCG CPU in the guest's
/proc/cpuinfo also counts as failure (QEMU fell back silently).  The verdict
is cached in ``$KSMBENCH_CACHE/accel.json`` under a key made of what would
change it: the host kernel release, the CPU model and the QEMU version.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import UsageError, VMError
from .boot import GuestRun, observed_accelerator, qemu_version

PROBE_SECONDS = 30.0


@dataclass(frozen=True)
class ProbeResult:
    works: bool
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class AccelDecision:
    accelerator: str      # "kvm" or "tcg"
    reason: str           # one line, for metadata and `ksmbench kernels`
    probed: bool = False  # a probe ran now (not a cached verdict)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_key(qemu: str | None = None) -> str:
    """What the KVM verdict depends on: host kernel, CPU model, QEMU version."""
    return f"{os.uname().release}|{cpu_model()}|qemu {qemu or qemu_version()}"


def cache_path() -> Path:
    from ...sources.cache import cache_root

    return cache_root() / "accel.json"


def read_verdicts(path: Path | None = None) -> dict:
    try:
        return json.loads((path or cache_path()).read_text())
    except (OSError, ValueError):
        return {}


def _write_verdict(path: Path, key: str, result: ProbeResult) -> None:
    verdicts = read_verdicts(path)
    verdicts[key] = {"kvm_works": result.works, "detail": result.detail,
                     "probe_seconds": round(result.seconds, 1),
                     "checked_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(verdicts, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def kvm_device_usable(device: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def decide(requested: str, probe: Callable[[], ProbeResult], *, key: str,
           cache_file: Path, device_usable: bool) -> AccelDecision:
    """The decision itself (probe and cache injected, for tests)."""
    if requested == "tcg":
        return AccelDecision("tcg", "requested with --accel tcg")
    if requested == "kvm":
        if not device_usable:
            raise VMError("--accel kvm: /dev/kvm cannot be opened",
                          hint="use --accel auto or tcg")
        return AccelDecision("kvm", "requested with --accel kvm (not probed)")
    if requested != "auto":
        raise UsageError(f"--accel {requested}: expected auto, kvm or tcg")
    if not device_usable:
        return AccelDecision("tcg", "no usable /dev/kvm")
    cached = read_verdicts(cache_file).get(key)
    if cached is not None:
        accel = "kvm" if cached.get("kvm_works") else "tcg"
        return AccelDecision(accel, f"cached KVM probe verdict of {cached.get('checked_at', '?')}: "
                                    f"{cached.get('detail', '')}")
    result = probe()
    _write_verdict(cache_file, key, result)
    return AccelDecision("kvm" if result.works else "tcg",
                         f"KVM probe ({result.seconds:.0f} s): {result.detail}", probed=True)


def probe_kvm(kernel, *, memory: str = "2G", seconds: float = PROBE_SECONDS) -> ProbeResult:
    """Boot ``kernel`` under KVM and run a command; works only if it all happens in time."""
    from ...sources.cache import cache_root

    base = cache_root() / "probe"
    base.mkdir(parents=True, exist_ok=True)
    shared = Path(tempfile.mkdtemp(prefix="kvm-", dir=base))
    started = time.monotonic()
    try:
        run = GuestRun(kernel, ["/bin/true"], shared_dir=shared, accelerator="kvm",
                       memory=memory, cpus=1, boot_timeout=seconds, timeout=seconds,
                       # a KVM boot that fails is the answer, not a reason to boot again
                       boot_attempts=1)
        with run:
            try:
                while run.poll() is None:
                    if time.monotonic() - started > seconds:
                        return ProbeResult(False, f"no result within {seconds:.0f} s "
                                                  f"(stuck at: {run.phase}; last console line: "
                                                  f"{run.last_console_line() or 'none'})",
                                           time.monotonic() - started)
                    time.sleep(0.1)
                result = run.result()
            except VMError as exc:
                return ProbeResult(False, exc.message, time.monotonic() - started)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            return ProbeResult(False, f"the probe command failed (exit {result.returncode})", elapsed)
        if observed_accelerator("kvm", result.facts) != "kvm":
            return ProbeResult(False, f"QEMU fell back to TCG ({result.facts.get('cpu_model')})",
                               elapsed)
        return ProbeResult(True, f"a guest ran a command under KVM in {elapsed:.1f} s", elapsed)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def choose_accelerator(requested: str, kernel, *, memory: str = "2G",
                       probe: Callable[[], ProbeResult] | None = None) -> AccelDecision:
    """``--accel auto|kvm|tcg`` -> the accelerator to boot ``kernel`` with."""
    return decide(requested, probe or (lambda: probe_kvm(kernel, memory=memory)),
                  key=host_key() if requested == "auto" else "",
                  cache_file=cache_path(), device_usable=kvm_device_usable())
