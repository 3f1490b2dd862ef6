"""One run at a time per machine: KSM state is global, so runs must not overlap.

An ``flock`` on ``$KSMBENCH_STATE_DIR/run.lock``.  The kernel drops the lock
when its holder dies, even by SIGKILL, so a stale lock cannot exist.  A second
run waits up to ``timeout`` seconds (0: refuses at once) and then refuses with
the holder's pid and command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import Busy, os_boundary
from .tunables import state_dir
from ..waiting import flock_exclusive


class RunLock:
    def __init__(self, timeout: float = 0.0, directory: Path | None = None):
        self.path = (directory or state_dir()) / "run.lock"
        self.timeout = timeout
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "unknown"
        return f"pid {info.get('pid')}: {info.get('argv', '?')}"

    def acquire(self) -> None:
        with os_boundary(f"creating {self.path.parent}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with os_boundary(f"opening {self.path}"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        def busy() -> Busy:
            waited = f" after waiting {self.timeout:.0f} s" if self.timeout else ""
            return Busy(f"another ksmbench run holds {self.path}{waited} ({self.holder()})",
                        hint="wait for it to finish, or pass --wait SECONDS")

        try:
            flock_exclusive(fd, timeout=self.timeout, on_timeout=busy)
        except Busy:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "argv": " ".join(sys.argv)}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
