"""Backends: where a scenario runs.  Each yields the same event stream.

* ``host``: this machine's kernel (:mod:`.host`).
* ``emulator:<profile>``: the emulator (:mod:`ksmbench.emulator.backend`).
* anything else given to ``--kernel``: a kernel booted in QEMU (:mod:`.vm`).
"""

from __future__ import annotations

from ..errors import KernelNotFound


def add_vm_options(p) -> None:
    """The argparse options of every command that may boot kernels: what
    :func:`resolve_backend` passes on to a VM backend."""
    p.add_argument("--memory", default="2G", help="guest memory for VM kernels (default: 2G)")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs for VM kernels (default: 2)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="QEMU accelerator for VM kernels (default: auto: KVM only if it really works)")
    p.add_argument("--modules", metavar="DIR", help="modules directory for a --kernel PATH image")


def expand_kernel_specs(specs: list[str] | None) -> list[str]:
    """The ``--kernel`` values to run (default: host), with ``debian:all``
    expanded to every Debian series in the archive."""
    specs = list(specs or ["host"])
    if not any(s.startswith("debian:") for s in specs):
        return specs
    from .vm.kernels import expand_specs

    return expand_specs(specs)


def resolve_backend(spec: str, **options):
    """A backend for one ``--kernel`` value."""
    if spec == "host":
        from .host import HostBackend

        return HostBackend()
    if spec == "emulator" or spec.startswith("emulator:"):
        # the model as a backend (no root, no kernel): emulator:<profile>
        from ..emulator.backend import EmulatorBackend

        return EmulatorBackend(spec.partition(":")[2] or "linux-6.18")
    try:
        from .vm import VMBackend
    except ImportError as exc:  # pragma: no cover - the VM layer ships with ksmbench
        raise KernelNotFound(f"--kernel {spec}: the VM backend is not available ({exc})") from None
    return VMBackend(spec, **options)
