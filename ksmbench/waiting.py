"""Bounded waiting: every wait in ksmbench has a timeout and says what it awaited."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from .errors import WaitTimeout

T = TypeVar("T")


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
