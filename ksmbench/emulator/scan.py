"""One full scan of the emulated KSM (scan_get_next_rmap_item() from list head
to list head), by the per-visit reference path of :mod:`.machine` or by the
windowed numpy path of :mod:`.fastscan`, which is checked against it; and one
partial batch (ksm_do_scan() with a small scan_npages), always per visit.

Kept apart from both: the fast path is built on the machine's state, and the
choice between them belongs to neither.
"""

from __future__ import annotations

from .fastscan import FastScan
from .machine import Ksm


def full_scan(ksm: Ksm, *, fast: bool = True) -> None:
    """One stepped full scan: a batch larger than every page, which ends where
    the full scan completes.  After a partial batch that is the rest of the
    scan under way, from the cursor.  The fast path serves whole scans only,
    and not the per-batch prune clock, whose chain_prune_time updates happen
    in the tree walks that its windows leave out, nor an unstable tree whose
    searches can fail on the way (a PROT_NONE tree page before
    protnone_follow), where which pages a search passes matters, nor a
    scenario with regions bound to NUMA nodes, whose trees are per node
    under merge_across_nodes=0."""
    if (not fast or ksm.cursor is not None or ksm.settings.prune == "per-batch"
            or ksm.needs_page_walks() or ksm.numa_used):
        ksm.batch(None)
        return
    ksm.batches += 1
    ksm.start_scan()
    FastScan(ksm).run()
    ksm.full_scans += 1


def partial_scan(ksm: Ksm, pages: int) -> None:
    """One batch of ``pages`` pages (scan with pages = N)."""
    ksm.batch(pages)
