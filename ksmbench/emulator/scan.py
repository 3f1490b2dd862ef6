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
    """One stepped full scan; with the scan-time advisor on (6.8), then the
    advisor's new pages_to_scan (:mod:`.advisor`)."""
    advisor = ksm.advisor
    if advisor is None:
        _full_scan(ksm, fast=fast)
        return
    if ksm.profile.has("pages_scanned") and not ksm.profile.has("pages_scanned_fix"):
        # the host steps the advisor's scans batch by batch, pages_to_scan
        # pages each; before 730cdc2c72c6 every batch that does not complete
        # the scan adds N + 1 to pages_scanned, so the batches are modelled
        while not ksm.batch(advisor.pages_to_scan):
            pass
    else:
        # counters per full scan do not depend on where batches end when
        # nothing runs between them (docs/stepping.md, "The advisor")
        _full_scan(ksm, fast=fast)
    # the first scan after the reset: ksmd's CPU time since boot makes
    # per_page_cost 1; later scans use under 10 ms of CPU: cpu_percent 1
    advisor.after_scan(scan_time=1, cpu_percent=None if advisor.scans == 0 else 1)


def _full_scan(ksm: Ksm, *, fast: bool = True) -> None:
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
