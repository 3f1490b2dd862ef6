"""Exception types, and the one place where OS errors become them.

Every error that reaches the user carries one line saying what failed and,
where we know it, one hint saying what to do.  The CLI prints exactly that
(no traceback) and exits 2.  Code below the CLI never prints errors itself.

OS errors (``OSError`` with an errno) are translated in :func:`os_boundary`
only, in the spirit of psutil: callers name *what* they were doing, the
boundary picks the exception type from the errno.
"""

from __future__ import annotations

import errno as _errno
import subprocess
from contextlib import contextmanager
from typing import Iterator


class KsmbenchError(Exception):
    """Base class: ``str(err)`` is one line; ``hint`` says what to do."""

    #: exit status of the CLI when this error ends a command
    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(KsmbenchError):
    """A command-line mistake."""


class ScenarioError(KsmbenchError):
    """A scenario file that does not follow the v1 format.

    The message names the file, the step index and the field.
    """

    def __init__(self, source: str, message: str, *, step: int | None = None,
                 field: str | None = None):
        where = source
        if step is not None:
            where += f": step {step}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.step = step
        self.field = field


class PermissionNeeded(KsmbenchError):
    """The operation needs privileges this process does not have."""


class KsmUnavailable(KsmbenchError):
    """The running kernel has no KSM (or not the interface asked for)."""


class SyscallError(KsmbenchError):
    """A system call failed; the message names the call and the errno."""

    def __init__(self, call: str, err: int, *, hint: str | None = None):
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{call} failed: {name} ({_strerror(err)})", hint=hint)
        self.call = call
        self.errno = err


class KernelIOError(KsmbenchError):
    """Reading or writing a /proc or /sys file failed."""

    def __init__(self, what: str, err: int | None, *, hint: str | None = None):
        detail = f": {_errno.errorcode.get(err, err)} ({_strerror(err)})" if err else ""
        super().__init__(f"{what} failed{detail}", hint=hint)
        self.errno = err


class WaitTimeout(KsmbenchError):
    """A bounded wait ran out; the message says what was awaited."""


class Busy(KsmbenchError):
    """Another run, or another KSM user, is in the way."""


class VMError(KsmbenchError):
    """A virtual machine could not be set up, booted, or did not finish."""


class NotApplicable(KsmbenchError):
    """A scenario needs an interface this kernel does not have (not a failure)."""


class KernelNotFound(KsmbenchError):
    """A ``--kernel`` value names no kernel that can be found or fetched."""


def _strerror(err: int | None) -> str:
    import os

    try:
        return os.strerror(err) if err else "unknown error"
    except ValueError:
        return "unknown error"


def translate_os_error(exc: OSError, what: str) -> KsmbenchError:
    """Map an ``OSError`` raised while doing *what* to a ksmbench error."""
    err = exc.errno
    if err in (_errno.EACCES, _errno.EPERM):
        return PermissionNeeded(
            f"{what}: permission denied",
            hint="run as root, or use a VM kernel (--kernel debian:<version>)",
        )
    if err == _errno.EROFS:
        return PermissionNeeded(
            f"{what}: read-only file system",
            hint="KSM tunables cannot be changed here; use a VM kernel (--kernel debian:<version>)",
        )
    if err == _errno.ENOENT:
        return KsmUnavailable(
            f"{what}: {getattr(exc, 'filename', None) or 'file'} does not exist",
            hint="this kernel lacks the interface (CONFIG_KSM=n or too old)",
        )
    return KernelIOError(what, err)


@contextmanager
def os_boundary(what: str) -> Iterator[None]:
    """Translate any ``OSError`` raised inside the block (the one boundary)."""
    try:
        yield
    except KsmbenchError:
        raise
    except OSError as exc:
        raise translate_os_error(exc, what) from exc


def run_tool(argv: list[str], what: str, *, timeout: float,
             error: type[KsmbenchError] = KsmbenchError, hint: str | None = None) -> None:
    """Run a system tool (argv, no shell) within ``timeout`` seconds.  A missing
    tool, a timeout or a non-zero exit becomes one ``error`` naming ``what``,
    with the tool's last line of output; ``hint`` says what to install."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise error(f"{what}: {argv[0]} is not installed", hint=hint) from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise error(f"{what} failed (exit {proc.returncode}): "
                    f"{lines[-1] if lines else 'no output'}")


def rebuild(kind: str, message: str, hint: str | None) -> KsmbenchError:
    """Recreate an error reported by another process (an agent, a guest)."""
    cls = globals().get(kind)
    simple = (UsageError, PermissionNeeded, KsmUnavailable, WaitTimeout, Busy, VMError,
              KernelNotFound, NotApplicable)
    if isinstance(cls, type) and issubclass(cls, simple):
        return cls(message, hint=hint)
    return KsmbenchError(message, hint=hint)
