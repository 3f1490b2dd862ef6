"""One full scan of the emulated KSM (scan_get_next_rmap_item() from list head
to list head), by the per-visit reference path of :mod:`.machine` or by the
windowed numpy path of :mod:`.fastscan`, which is checked against it.

Kept apart from both: the fast path is built on the machine's state, and the
choice between them belongs to neither.
"""

from __future__ import annotations

from .fastscan import FastScan
from .machine import Ksm


def full_scan(ksm: Ksm, *, fast: bool = True) -> None:
    ksm.start_scan()
    if fast and ksm.unstable_rb is None:
        FastScan(ksm).run()
    else:
        ksm.scan_slots(ksm.scan_mm_slow)
    ksm.full_scans += 1
