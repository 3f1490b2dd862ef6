"""Kernels in QEMU: the VM backend, the kernel catalogue, and running commands in guests.

* :class:`VMBackend` (``--kernel debian:6.12`` / ``--kernel PATH``): every
  scenario of a run in one boot, observations streamed back as they are made.
* :func:`run_in_guest`: boot a kernel and run one command as root in it (for
  benchmarks and the kernel's selftests in guests).
* :mod:`.catalogue`: ``ksmbench kernels``.
* :mod:`.kernels`: what ``--kernel`` names, fetched and made bootable.
* :mod:`.accel`: KVM only if it really works, else TCG.
"""

from __future__ import annotations

from .backend import VMBackend
from .boot import GuestResult, GuestRun
from .command import run_in_guest
from .kernels import BootableKernel, resolve as resolve_kernel

__all__ = ["VMBackend", "GuestResult", "GuestRun", "run_in_guest", "BootableKernel",
           "resolve_kernel"]
