"""Starting N copies of a command with KSM merging enabled before exec.

Each copy is forked, calls ``prctl(PR_SET_MEMORY_MERGE, 1)`` and then execs
the command.  The flag (MMF_VM_MERGE_ANY) survives exec only on kernels that
have both:

* 3c6f33b7273a "mm/ksm: support fork/exec for prctl" (6.7): MMF_VM_MERGE_ANY
  joins MMF_INIT_MASK, so fork and exec keep it; and
* 3a9e567ca45f "mm/ksm: fix ksm exec support for prctl" (6.10): at exec,
  ksm_execve() registers the new mm with ksmd (before it, the exec'd process
  had the flag but ksmd never scanned it).

Older kernels are refused before anything starts; whether the flag really
survived is checked on every copy afterwards (ksm_stat's ``ksm_merge_any``
line, 3ab76c767bc7, 6.14, and ksmd's rmap items after the first scan), so
a kernel with a backport works and one without the fix is refused.

``{i}`` in the command's arguments becomes the copy's number (0..N-1): own
ports, own data directories.  The copies run in one process group led by a
placeholder that a guard process watches (the selftests' ProgramGroup), and
each gets PR_SET_PDEATHSIG: none outlives ksmbench, however it ends.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import KsmbenchError, KsmUnavailable, UsageError
from ..kernel.features import kernel_release, parse_version
from ..kernel.syscalls import die_with_parent, prctl_set_memory_merge

#: the first release with merge-any kept across exec and the exec'd mm scanned
EXEC_INHERITANCE = (6, 10)


class WorkloadFailed(KsmbenchError):
    """The measured command failed to start, exited, or never became ready."""


@dataclass(frozen=True)
class Ready:
    """When a copy has reached its steady state."""

    kind: str           # "seconds" | "file" | "line"
    value: str
    timeout: float

    @classmethod
    def parse(cls, text: str, timeout: float) -> "Ready":
        if text.startswith("file:"):
            return cls("file", text[5:], timeout)
        if text.startswith("line:"):
            return cls("line", text[5:], timeout)
        try:
            seconds = float(text)
        except ValueError:
            raise UsageError(f"--ready '{text}' is not SECONDS, file:PATH or line:TEXT") from None
        if seconds < 0:
            raise UsageError("--ready SECONDS must not be negative")
        return cls("seconds", text, max(timeout, seconds))

    def describe(self) -> str:
        return {"seconds": f"{self.value} s", "file": f"file {self.value} to exist",
                "line": f"the line '{self.value}' on stdout"}[self.kind]


def check_exec_inheritance(release: str | None = None) -> None:
    """Refuse, in one line, on kernels where merge-any cannot survive exec."""
    from ..kernel.features import detect

    release = release or kernel_release()
    if not detect()["prctl_memory_merge"]:
        raise KsmUnavailable(
            f"this kernel ({release}) has no PR_SET_MEMORY_MERGE (added in 6.4, d7597f59d1d3)",
            hint="use --pid on processes that use MADV_MERGEABLE themselves, or a newer kernel")
    if parse_version(release) < EXEC_INHERITANCE:
        raise KsmUnavailable(
            f"this kernel ({release}) does not keep PR_SET_MEMORY_MERGE across exec for ksmd "
            "(needs 3c6f33b7273a, 6.7, and 3a9e567ca45f, 6.10)",
            hint="use --no-merge-any for a program that marks its memory mergeable itself "
                 "(e.g. QEMU mem-merge=on), or --pid to predict only")


def _child(merge_any: bool):
    def setup() -> None:
        die_with_parent()
        if merge_any:
            prctl_set_memory_merge(True)
    return setup


class Copies:
    """N running copies of a command (use as a context manager)."""

    def __init__(self, argv: Sequence[str], copies: int, outdir: Path, *, merge_any: bool = True,
                 cwd: str | None = None):
        if not argv:
            raise UsageError("no command given after --")
        if copies < 1:
            raise UsageError("--copies must be at least 1")
        self.argv = list(argv)
        self.n = copies
        self.outdir = outdir
        self.merge_any = merge_any
        self.cwd = cwd
        self.procs: list[subprocess.Popen] = []
        self.started: list[float] = []
        self._group = None

    def argv_of(self, i: int) -> list[str]:
        return [a.replace("{i}", str(i)) for a in self.argv]

    def out_path(self, i: int, stream: str) -> Path:
        return self.outdir / f"copy{i}.{stream}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "Copies":
        from ..selftests.execute import ProgramGroup

        self._group = ProgramGroup().__enter__()
        try:
            for i in range(self.n):
                argv = self.argv_of(i)
                with open(self.out_path(i, "stdout"), "wb") as out, \
                        open(self.out_path(i, "stderr"), "wb") as err:
                    try:
                        proc = self._group.start(argv, cwd=self.cwd, stdout=out, stderr=err,
                                                 preexec_fn=_child(self.merge_any))
                    except FileNotFoundError:
                        raise WorkloadFailed(f"cannot start '{argv[0]}': no such file or command",
                                             hint="give a command on PATH or a path to it") from None
                    except PermissionError:
                        raise WorkloadFailed(f"cannot start '{argv[0]}': permission denied") from None
                    except subprocess.SubprocessError as exc:
                        raise WorkloadFailed(f"cannot start '{argv[0]}': {exc}") from None
                self.procs.append(proc)
                self.started.append(time.monotonic())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._group is not None:
            self._group.__exit__(None, None, None)
            self._group = None

    # -- state ------------------------------------------------------------------
    def last_stderr(self, i: int, lines: int = 3) -> str:
        try:
            text = self.out_path(i, "stderr").read_text(errors="replace")
        except OSError:
            return ""
        tail = [ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip()]
        return " | ".join(tail)

    def check_alive(self, what: str) -> None:
        """WorkloadFailed naming the first copy that exited."""
        for i, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                err = self.last_stderr(i)
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                raise WorkloadFailed(
                    f"copy {i} of '{' '.join(self.argv_of(i))}' (pid {proc.pid}) {how} {what}"
                    + (f"; its last stderr lines: {err}" if err else "; it wrote nothing on stderr"),
                    hint=f"its output is in {self.out_path(i, 'stdout').parent}")

    def wait_ready(self, ready: Ready, progress=lambda _m: None) -> float:
        """Wait (bounded) until every copy is ready; returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + ready.timeout
        pending = set(range(self.n))
        while True:
            self.check_alive("before it was ready")
            now = time.monotonic()
            if ready.kind == "seconds":
                if now - t0 >= float(ready.value):
                    return now - t0
            else:
                for i in sorted(pending):
                    if self._is_ready(i, ready):
                        pending.discard(i)
                if not pending:
                    return now - t0
            if now >= deadline:
                waiting = ", ".join(f"copy {i} (pid {self.procs[i].pid})" for i in sorted(pending))
                raise WorkloadFailed(
                    f"timed out after {ready.timeout:.0f} s waiting for {ready.describe()}: "
                    f"{waiting} never became ready",
                    hint="check --ready (file:PATH, line:TEXT or SECONDS) or raise --ready-timeout; "
                         f"the copies' output is in {self.outdir}")
            progress(f"waiting for {ready.describe()} ({now - t0:.0f} s)")
            time.sleep(0.1)

    def _is_ready(self, i: int, ready: Ready) -> bool:
        if ready.kind == "file":
            return Path(ready.value.replace("{i}", str(i))).exists()
        try:
            text = self.out_path(i, "stdout").read_text(errors="replace")
        except OSError:
            return False
        return ready.value.replace("{i}", str(i)) in text
