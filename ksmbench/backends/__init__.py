"""Backends: where a scenario runs.  Each yields the same event stream.

* ``host``: this machine's kernel (:mod:`.host`).
* anything else given to ``--kernel``: a kernel booted in QEMU (:mod:`.vm`).
"""

from __future__ import annotations

from ..errors import KernelNotFound


def resolve_backend(spec: str, **options):
    """A backend for one ``--kernel`` value."""
    if spec == "host":
        from .host import HostBackend

        return HostBackend()
    try:
        from .vm import VMBackend
    except ImportError as exc:  # pragma: no cover - the VM layer ships with ksmbench
        raise KernelNotFound(f"--kernel {spec}: the VM backend is not available ({exc})") from None
    return VMBackend(spec, **options)
