"""The one place consoles are made, so every command prints alike.

Rich wraps at 80 columns when output is not a terminal (CI logs, ``| less``,
a file): the wide per-scan tables then become unreadable.  Off a terminal,
and unless COLUMNS says otherwise, use a width that fits them.
"""

from __future__ import annotations

import os
import sys

#: width when printing to a pipe or a file
PIPE_WIDTH = 140


def make_console(*, stderr: bool = False, width: int | None = None):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if width is None and not stream.isatty() and "COLUMNS" not in os.environ:
        width = PIPE_WIDTH
    return Console(stderr=stderr, highlight=False, width=width)
