"""The scan-time advisor (mm/ksm.c, 6.8: 4e5fa4f5eff6 "mm/ksm: add ksm
advisor", 66790e9a735b its sysfs knobs; the code is the same in 6.12 and 7.3).

With ``advisor_mode=scan-time`` the kernel owns ``pages_to_scan`` (a write
fails with EINVAL, pages_to_scan_store()).  Switching the mode from none
(set_advisor_defaults()) zeroes the advisor's context and sets pages_to_scan
to ``advisor_min_pages_to_scan``; that knob is not read again.  At the end of
every full scan, scan_time_advisor() computes the next pages_to_scan from two
measured inputs, all in unsigned integer arithmetic:

* ``scan_time``: seconds from the first batch of the scan (advisor_start_scan())
  to its end, truncated, and 1 when that is 0;
* ``cpu_percent``: ksmd's CPU time since the previous advisor run (in ms,
  truncated) * 100 / (scan_time * 1000), and 1 when that is 0.  The context's
  CPU time is 0 after a reset, so the first scan counts all the CPU ksmd has
  used since boot.

Given those two numbers the result is exact; :meth:`Advisor.after_scan` is
that function.  What stepping makes of the inputs (docs/stepping.md, "The
advisor"): a scan shorter than 2 s has scan_time 1; a scan after the first
whose ksmd CPU time is under 10 ms has cpu_percent 1; and the first scan,
where ksmd's CPU time since boot is large, has per_page_cost 1 (the host
checks each assumption and stops the run where one does not hold).
"""

from __future__ import annotations

from dataclasses import dataclass

#: KSM_ADVISOR_MIN_CPU: the CPU floor, in percent (a constant, no knob)
MIN_CPU = 10
#: EWMA_WEIGHT: the weight of the newest change, in percent
EWMA_WEIGHT = 30


def ewma(prev: int, curr: int) -> int:
    return ((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) // 100


@dataclass
class Advisor:
    """advisor_ctx plus ksm_thread_pages_to_scan and the four knobs."""

    min_pages: int = 500
    max_pages: int = 30000
    max_cpu: int = 70
    target_scan_time: int = 200
    #: ksm_thread_pages_to_scan: set_advisor_defaults() starts it at min_pages
    pages_to_scan: int = 0
    #: advisor_ctx.change and .scan_time (0 after a reset)
    change: int = 0
    scan_time: int = 0
    #: full scans since the reset (the first one's CPU input is ksmd's lifetime)
    scans: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """set_advisor_defaults() when advisor_mode becomes scan-time."""
        self.change = self.scan_time = self.scans = 0
        self.pages_to_scan = self.min_pages

    def after_scan(self, scan_time: int = 1, cpu_percent: int | None = 1) -> int:
        """scan_time_advisor() at the end of a full scan; returns the new
        pages_to_scan.  ``scan_time`` and ``cpu_percent`` as the kernel
        computes them (both already at least 1); ``cpu_percent`` None means
        "as large as pages_to_scan", so that per_page_cost is 1 (the first
        scan after a reset, when ksmd has run long since boot)."""
        pts = self.pages_to_scan
        if cpu_percent is None:
            cpu_percent = max(pts, 1)
        last = self.scan_time or scan_time
        factor = self.target_scan_time * 100 // scan_time or 1
        change = ewma(self.change, scan_time * 100 // last or 1)
        pages = pts * 100 // factor * change // 100
        per_page_cost = pts // cpu_percent or 1
        pages = min(pages, per_page_cost * self.max_cpu)
        pages = max(pages, per_page_cost * MIN_CPU)
        pages = min(pages, self.max_pages)
        self.change, self.scan_time = change, scan_time
        self.pages_to_scan = pages
        self.scans += 1
        return pages
