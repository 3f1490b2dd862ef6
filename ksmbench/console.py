"""The one place consoles are made, so every command prints alike.

Off a terminal (a pipe, a file, a CI log) nothing may be cut: rich would
otherwise lay tables out for 80 columns, shorten cells with "…" and wrap
long lines mid-sentence, which breaks ``grep`` and ``cut``.  There the
console is as wide as the longest line it prints (:data:`PIPE_WIDTH` is only
an upper bound, tables take their natural width), and COLUMNS is ignored.
On a terminal rich fits the output to the terminal, as usual.

Text that comes from the user or the system (paths, scenario and kernel
labels, error messages, package names) goes through :func:`esc` before it
is printed with console markup: a kernel label such as ``/boot/[x]/bzImage``
must print as it is, not be read as a style tag.
"""

from __future__ import annotations

import sys

from rich.markup import escape as _escape

#: width when printing to a pipe or a file: wider than any line ksmbench
#: prints, so that nothing wraps; tables still take only the width they need
PIPE_WIDTH = 100_000


def esc(value: object) -> str:
    """``value`` as text that console markup prints literally."""
    return _escape(str(value))


def make_console(*, stderr: bool = False, width: int | None = None):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if width is None and not _is_terminal(stream):
        width = PIPE_WIDTH
    return Console(stderr=stderr, highlight=False, width=width)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
