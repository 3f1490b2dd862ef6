"""Bounded waiting: every wait in ksmbench has a timeout and says what it awaited."""

from __future__ import annotations

import fcntl
import os
import time
from typing import Callable, TypeVar

from .errors import WaitTimeout

T = TypeVar("T")


def time_scale() -> float:
    """Multiplier for every timeout (``KSMBENCH_TIME_SCALE``; VMs under TCG set it)."""
    try:
        return max(float(os.environ.get("KSMBENCH_TIME_SCALE", "1")), 0.1)
    except ValueError:
        return 1.0


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str,
               hint: str | None = None, first_delay: float = 0.0002,
               max_delay: float = 0.01) -> T:
    """Poll ``predicate`` until it returns a true value; return that value.

    Raises :class:`WaitTimeout` naming ``what`` after ``timeout`` seconds.
    Polling starts fast (0.2 ms) and backs off to ``max_delay``.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f} s waiting for {what}", hint=hint)
        time.sleep(min(delay, max(deadline - now, 0)))
        delay = min(delay * 2, max_delay)


def flock_exclusive(fd: int, *, timeout: float, on_timeout: Callable[[], Exception],
                    max_delay: float = 1.0) -> None:
    """Take an exclusive ``flock`` on ``fd`` within ``timeout`` seconds.

    Polls with LOCK_NB (a blocking flock could wait forever); the kernel drops
    the lock when its holder dies, so a killed holder never leaves it stuck.
    Raises ``on_timeout()``, which names the lock and its holder.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise on_timeout() from None
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
