"""Boot a kernel, run one command as root in it, wait for it: the blocking form
of :class:`~.boot.GuestRun` that benchmarks and the kernel selftests in guests
use.  It sits above both :mod:`.boot` and :mod:`.accel` (whose KVM probe boots
a guest) because it needs the accelerator decision before it boots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .accel import choose_accelerator
from .boot import GuestResult, GuestRun
from .kernels import resolve


def run_in_guest(spec: str, argv: Sequence[str], *, shared_dir: str | os.PathLike,
                 memory: str = "2G", cpus: int = 2, accel: str = "auto",
                 timeout: float = 600.0, console_log: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 modules: str | None = None, append: Sequence[str] = (),
                 boot_timeout: float | None = None, console=None) -> GuestResult:
    """Boot ``spec`` ("debian:6.12" or an image path), run ``argv`` as root in it.

    ``shared_dir`` is writable in the guest (same path); everything else of the
    host is read-only.  Returns the command's exit status and output, the
    accelerator really used, the guest's kernel release and the wall time.
    Raises :class:`~ksmbench.errors.VMError` (panic, no boot, overrun) or
    :class:`~ksmbench.errors.KernelNotFound`.
    """
    kernel = resolve(spec, modules=modules, console=console)
    decision = choose_accelerator(accel, kernel, memory=memory)
    shared = Path(shared_dir)
    run = GuestRun(kernel, argv, shared_dir=shared, accelerator=decision.accelerator,
                   memory=memory, cpus=cpus, env=env, cwd=cwd,
                   console_log=Path(console_log) if console_log else None,
                   append=append, boot_timeout=boot_timeout, timeout=timeout)
    with run:
        return run.wait()
