"""``ksmbench savings``: what KSM would save for a real program, predicted
before merging, then measured scan by scan.

    ksmbench savings [--copies N] [--ready SECONDS|file:PATH|line:TEXT] [tunables] -- CMD [ARGS...]
    ksmbench savings --pid PID [--pid PID ...] [tunables]

With ``-- CMD``: N copies of CMD start with PR_SET_MEMORY_MERGE (``{i}`` in
ARGS is the copy number), are snapshotted once ready, predicted, and then
ksmd is stepped one full scan at a time and the real counters, RSS/PSS/USS
and /proc/meminfo are recorded beside the prediction.  With ``--pid``: the
processes are predicted only; nothing about them or KSM changes.

Needs root.  Exit status: 0 done, 2 could not complete (one line says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..console import make_console
from ..errors import PermissionNeeded, UsageError

MIB = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksmbench savings",
                                description="What KSM saves for a real program: predicted from "
                                            "its pages before any merging, then measured scan "
                                            "by scan. Needs root.",
                                epilog="examples:\n"
                                       "  ksmbench savings --copies 4 --ready line:ready -- "
                                       "python3 app.py --port 80{i}\n"
                                       "  ksmbench savings --pid 1234 --pid 1240 "
                                       "--use-zero-pages 1",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="ksmbench savings [options] -- CMD [ARGS...]\n"
                                      "       ksmbench savings --pid PID [--pid PID ...] [options]")
    p.add_argument("--pid", type=int, action="append", metavar="PID",
                   help="predict for this running process (repeatable); nothing is changed")
    p.add_argument("--copies", type=int, default=2, metavar="N",
                   help="copies of CMD to start (default 2)")
    p.add_argument("--ready", default="3", metavar="SECONDS|file:PATH|line:TEXT",
                   help="when a copy is ready: after SECONDS, when PATH exists, or when TEXT "
                        "appears on its stdout ({i} = copy number; default 3 s)")
    p.add_argument("--ready-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up waiting for readiness after this long (default 120)")
    p.add_argument("--no-merge-any", action="store_true",
                   help="do not set PR_SET_MEMORY_MERGE: CMD marks its memory mergeable itself "
                        "(e.g. QEMU -machine mem-merge=on)")
    p.add_argument("--scope", choices=("auto", "merge-any", "mergeable"), default="auto",
                   help="which VMAs count: all KSM-compatible ones (merge-any), the ones marked "
                        "mergeable now, or auto: the marked ones if any, else all (default)")
    g = p.add_argument_group("KSM tunables (default: the host's current values)")
    g.add_argument("--use-zero-pages", type=int, choices=(0, 1),
                   help="map all-zero pages to the kernel's zero page (counted in ksm_zero_pages since 6.6)")
    g.add_argument("--max-page-sharing", type=int, metavar="N",
                   help="most mappings of one KSM page before a new dup is started")
    g.add_argument("--pages-to-scan", type=int, metavar="N",
                   help="for the time to converge (stepping scans whole full scans)")
    g.add_argument("--sleep-millisecs", type=int, metavar="MS",
                   help="for the time to converge")
    g.add_argument("--smart-scan", type=int, choices=(0, 1),
                   help="skip pages that keep failing to merge (6.7+)")
    p.add_argument("--profile", default="auto",
                   help="emulator profile (default: auto, from the kernel release)")
    p.add_argument("--max-scans", type=int, default=10,
                   help="stop stepping after this many full scans (default 10)")
    p.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run to finish instead of refusing")
    return p


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    opts, command = split_command(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(opts)
    if bool(args.pid) == bool(command):
        raise UsageError("give either -- CMD [ARGS...] or --pid PID",
                         hint="e.g. ksmbench savings --copies 3 -- python3 -c '...'")
    if os.geteuid() != 0:
        raise PermissionNeeded("ksmbench savings needs root (reading other processes' pages "
                               "and frame numbers, stepping ksmd)",
                               hint="run it with sudo")
    from ..kernel.sysfs import KsmSysfs

    KsmSysfs().require()
    overrides = dict(use_zero_pages=_opt_bool(args.use_zero_pages),
                     max_page_sharing=args.max_page_sharing, pages_to_scan=args.pages_to_scan,
                     sleep_millisecs=args.sleep_millisecs, smart_scan=_opt_bool(args.smart_scan))
    if args.max_page_sharing is not None and args.max_page_sharing < 2:
        raise UsageError("--max-page-sharing must be at least 2 (the kernel refuses less)")
    if (args.pages_to_scan is not None and args.pages_to_scan < 1) or \
            (args.sleep_millisecs is not None and args.sleep_millisecs < 0):
        raise UsageError("--pages-to-scan must be at least 1 and --sleep-millisecs not negative")
    if args.copies < 1:
        raise UsageError("--copies must be at least 1")
    if args.max_scans < 3:
        raise UsageError("--max-scans must be at least 3 (merging takes two full scans)")
    from .run import measure_command, predict_pids

    console = make_console()
    if args.pid:
        return predict_pids(args, overrides, console)
    return measure_command(args, command, overrides, console)


def _opt_bool(v):
    return None if v is None else bool(v)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
