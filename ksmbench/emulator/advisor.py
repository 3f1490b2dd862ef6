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

    def state(self) -> tuple[int, int, int]:
        return self.pages_to_scan, self.change, self.scan_time

    def with_state(self, state: tuple[int, int, int]) -> "Advisor":
        other = Advisor(self.min_pages, self.max_pages, self.max_cpu, self.target_scan_time)
        other.pages_to_scan, other.change, other.scan_time = state
        other.scans = self.scans
        return other


def cpu_percent(cpu_ns: int, scan_time: int) -> int:
    """scan_time_advisor()'s cpu_percent from ksmd's CPU time in ns."""
    return (cpu_ns // 1_000_000) * 100 // (scan_time * 1000) or 1


#: more (scan_time, cpu_percent) pairs than this in the measured bounds: not exact
MAX_INPUTS = 100_000


class AdvisorCheck:
    """Whether the inputs a real kernel's advisor may have measured leave it
    the outcome the model predicts.

    The model (:func:`.scan.full_scan`) assumes scan_time 1, cpu_percent 1
    and per_page_cost 1 at the first scan.  The host measures bounds of the
    real inputs around each scan (``ksmbench.kernel.stepping.AdvisorScan``).
    Every state the kernel's advisor may be in is carried along; after a
    scan, if those states and inputs allow any pages_to_scan other than the
    model's, the outcome depends on timing and :meth:`after_scan` says why.
    A kernel whose advisor computes differently is not excused here: its
    pages_to_scan cells mismatch.
    """

    def __init__(self, model: Advisor):
        self.model = model
        self.states = {model.state()}

    def after_scan(self, scan_times: range, cpu_ns: tuple[int, int] | None,
                   observed: int | None) -> str | None:
        first = self.model.scans == 0
        expected = self.model.after_scan(1, None if first else 1)
        if cpu_ns is None:  # no schedstat: only the cells can tell
            self.states = {self.model.state()}
            return None
        pairs = [(s, c) for s in scan_times
                 for c in range(cpu_percent(cpu_ns[0], s), cpu_percent(cpu_ns[1], s) + 1)]
        if len(pairs) * len(self.states) > MAX_INPUTS:
            return (f"ksmd's CPU time for the scan is only known between {cpu_ns[0] / 1e6:.1f} "
                    f"and {cpu_ns[1] / 1e6:.1f} ms: too wide to tell the advisor's outcome")
        new = set()
        for state in self.states:
            for s, c in pairs:
                a = self.model.with_state(state)
                a.after_scan(s, c)
                new.add(a.state())
        values = sorted({state[0] for state in new})
        if values == [expected]:
            self.states = new
            return None
        if observed not in values:
            # the kernel computed something no measured input explains: the
            # cells report it; go on from the model's state
            self.states = {self.model.state()}
            return None
        seconds = (f"{scan_times.start} s" if len(scan_times) == 1
                   else f"{scan_times.start}-{scan_times.stop - 1} s")
        return (f"the advisor's next pages_to_scan could be {', '.join(map(str, values[:6]))}"
                f"{' ...' if len(values) > 6 else ''} for the measured scan time ({seconds}) "
                f"and ksmd CPU time ({cpu_ns[0] / 1e6:.1f}-{cpu_ns[1] / 1e6:.1f} ms), not the "
                f"modelled {expected} alone")
