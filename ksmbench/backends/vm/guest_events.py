"""Runs inside the guest: the host backend on the guest's kernel, as a JSON-line stream.

    python -m ksmbench.backends.vm.guest_events SCENARIOS.pickle EVENTS.jsonl ERROR.json LABEL

The scenarios are the host's own objects (pickled: the guest runs the same
ksmbench code from the host's read-only filesystem).  Each event the host
backend yields is written as one JSON line and flushed at once, so the host,
tailing the file through the shared directory, sees observations as they are
made.  An error that ends the session (no KSM, no permission...) is written to
ERROR.json as (kind, message, hint) for the host to re-raise; exit status 3.

When a scenario asks for swap (``swap = true``), the guest first prepares a
zram swap device (:mod:`ksmbench.kernel.swap`), which the host backend turns
on for those scenarios only.  When a scenario has op ``reclaim`` the guest
also turns the multi-gen LRU on (Debian 6.1 builds it but leaves it off).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    scenarios_path, events_path, error_path, label = argv
    from ...errors import KsmbenchError
    from ...observation import event_to_json
    from ..host import HostBackend

    with open(scenarios_path, "rb") as f:
        scenarios = pickle.load(f)
    with open(events_path, "a", buffering=1) as out:
        try:
            if any(getattr(s, "swap", False) for s in scenarios):
                from ...kernel.swap import SWAP_DEVICE_ENV, SWAP_UNAVAILABLE_ENV, ZramSwap

                zram = ZramSwap()
                try:
                    zram.prepare()
                    os.environ[SWAP_DEVICE_ENV] = zram.device
                except KsmbenchError as exc:
                    # a kernel without CONFIG_SWAP or zram (a tinyconfig build):
                    # its swap scenarios are n/a, the others still run
                    os.environ[SWAP_UNAVAILABLE_ENV] = exc.message
            from ...scenario.model import has_reclaim

            if any(has_reclaim(s.steps) for s in scenarios):
                from ...kernel.swap import enable_multigen_lru

                enable_multigen_lru()  # the host backend says n/a where it stays off
            for event in HostBackend(label).events(scenarios):
                out.write(event_to_json(event) + "\n")
                out.flush()
                os.fsync(out.fileno())
        except KsmbenchError as exc:
            Path(error_path).write_text(json.dumps(
                {"kind": type(exc).__name__, "message": exc.message, "hint": exc.hint}))
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
