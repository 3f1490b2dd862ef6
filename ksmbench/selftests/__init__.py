"""The kernel's own KSM selftests as peers: ``ksmbench selftest``.

* :mod:`.catalogue`: which selftest checks which behaviour, the ksmbench
  scenario for the same behaviour, and the explicit checks that judge it;
* :mod:`.execute`: running the selftests on a kernel (tunables restored,
  time-limited, killed cleanly), on the host or inside a guest;
* :mod:`.ktap`: parsing their KTAP (and older "OK"/"Not OK") output;
* :mod:`.compare`: both verdicts side by side;
* :mod:`.cli`: the command.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ksmbench selftest ARGS``."""
    from .cli import main as cli_main

    return cli_main(argv)
