"""A watchdog that ends a VM's process group when ksmbench ends, however it ends.

virtme-ng starts QEMU as a grandchild (vng -> sh -> virtme-run -> fork+exec
qemu), so ``PR_SET_PDEATHSIG`` on vng would not reach QEMU (the parent-death
signal is cleared in a fork's child).  ksmbench therefore starts vng in a new
session (its own process group) and this small guard beside it, in a session
of its own (Ctrl-C in the terminal does not reach it).  The guard blocks
reading a pipe whose only writer is ksmbench: when ksmbench exits, even by
SIGKILL, the kernel closes the pipe, the read returns, and the guard kills the
whole group with SIGKILL.  On a normal end ksmbench kills the group itself and
closes the pipe; the guard's kill then finds nothing.

    python -m ksmbench.backends.vm.guard PGID
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    pgid = int(argv[0])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return 0



def start_guard(pgid: int):
    """Start a guard for process group ``pgid``; returns (guard Popen, pipe write end).

    Keep the write end open for as long as the group may live; closing it (or
    dying) makes the guard kill the group.
    """
    import subprocess

    read_end, write_end = os.pipe()
    try:
        guard = subprocess.Popen([sys.executable, "-m", "ksmbench.backends.vm.guard", str(pgid)],
                                 stdin=read_end, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True,
                                 close_fds=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    os.set_inheritable(write_end, False)
    return guard, write_end


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
