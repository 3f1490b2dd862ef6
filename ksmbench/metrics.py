"""Metric names: defined once, used by every backend, the emulator and reports.

A metric name means the same thing wherever it appears (the README's
"Scenario format" section lists them all):

* ``global.<counter>``: a file in ``/sys/kernel/mm/ksm``;
  ``full_scans``, ``pages_scanned`` and ``pages_skipped`` are cumulative in the
  kernel and are reported as the delta since the scenario started.
* ``proc.<p>.<field>``: ``/proc/<pid>/ksm_stat`` of scenario process ``p``
  (``ksm_merge_any``/``ksm_mergeable`` as 1/0), and ``rss_anon_pages``
  (``RssAnon`` of ``/proc/<pid>/status`` in pages).
* ``region.<p>.<r>.<m>``: pagemap-derived metrics of region ``r`` in ``p``.

Values are Python ints (signed) or ``None`` where the kernel lacks the
counter; never 0 for "absent".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: level counters read from /sys/kernel/mm/ksm and reported as they are
GLOBAL_LEVELS: tuple[str, ...] = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "ksm_zero_pages",
    "general_profit",
    "stable_node_chains",
    "stable_node_dups",
)
#: cumulative counters, reported as the delta since the scenario started
GLOBAL_CUMULATIVE: tuple[str, ...] = ("full_scans", "pages_scanned", "pages_skipped")
GLOBAL_COUNTERS: tuple[str, ...] = GLOBAL_LEVELS + GLOBAL_CUMULATIVE

#: fields of /proc/<pid>/ksm_stat, in the order kernels print them
KSM_STAT_FIELDS: tuple[str, ...] = (
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_merging_pages",
    "ksm_process_profit",
    "ksm_merge_any",
    "ksm_mergeable",
)
#: RssAnon of /proc/<pid>/status, in pages.  It includes the memory of the
#: process's own interpreter, which no model can know; the emulator leaves it
#: empty and predicts ``rss_anon_scenario_pages`` instead.
RSS_ANON = "rss_anon_pages"
#: RssAnon minus the anonymous pages of every mapping that is not a scenario
#: region (measured through /proc/<pid>/smaps at the same instant): the
#: kernel's MM_ANONPAGES counter as far as the scenario's regions move it.
#: KSM zero pages leave it (replace_page() does dec_mm_counter since 4.11);
#: write and unshare faults bring them back (wp_page_copy()).
RSS_ANON_SCENARIO = "rss_anon_scenario_pages"
PROC_FIELDS: tuple[str, ...] = KSM_STAT_FIELDS + (RSS_ANON, RSS_ANON_SCENARIO)

REGION_METRICS: tuple[str, ...] = ("present", "zero_pfn", "ksm", "distinct_frames")

_NAME = r"[A-Za-z0-9_-]+"
_GLOBAL_RE = re.compile(r"global\.(?P<field>[a-z_]+)\Z")
_PROC_RE = re.compile(rf"proc\.(?P<proc>{_NAME})\.(?P<field>[a-z_]+)\Z")
_REGION_RE = re.compile(rf"region\.(?P<proc>{_NAME})\.(?P<region>{_NAME})\.(?P<field>[a-z_]+)\Z")


@dataclass(frozen=True)
class MetricName:
    kind: str  # "global" | "proc" | "region"
    field: str
    proc: str | None = None
    region: str | None = None

    def __str__(self) -> str:
        if self.kind == "global":
            return global_metric(self.field)
        if self.kind == "proc":
            return proc_metric(self.proc or "", self.field)
        return region_metric(self.proc or "", self.region or "", self.field)


def global_metric(counter: str) -> str:
    return f"global.{counter}"


def proc_metric(proc: str, field: str) -> str:
    return f"proc.{proc}.{field}"


def region_metric(proc: str, region: str, field: str) -> str:
    return f"region.{proc}.{region}.{field}"


def parse_metric(name: str) -> MetricName:
    """Parse and validate a metric name; ``ValueError`` says what is wrong."""
    m = _GLOBAL_RE.match(name)
    if m:
        if m["field"] not in GLOBAL_COUNTERS:
            raise ValueError(f"unknown global counter '{m['field']}' "
                             f"(known: {', '.join(GLOBAL_COUNTERS)})")
        return MetricName("global", m["field"])
    m = _REGION_RE.match(name)
    if m:
        if m["field"] not in REGION_METRICS:
            raise ValueError(f"unknown region metric '{m['field']}' "
                             f"(known: {', '.join(REGION_METRICS)})")
        return MetricName("region", m["field"], m["proc"], m["region"])
    m = _PROC_RE.match(name)
    if m:
        if m["field"] not in PROC_FIELDS:
            raise ValueError(f"unknown process metric '{m['field']}' "
                             f"(known: {', '.join(PROC_FIELDS)})")
        return MetricName("proc", m["field"], m["proc"])
    raise ValueError(f"'{name}' is not a metric name "
                     "(global.<counter>, proc.<p>.<field> or region.<p>.<r>.<metric>)")


def metric_sort_key(name: str) -> tuple:
    """Stable, readable order: globals, then processes, then regions."""
    parsed = parse_metric(name)
    if parsed.kind == "global":
        return (0, "", "", GLOBAL_COUNTERS.index(parsed.field))
    if parsed.kind == "proc":
        return (1, parsed.proc, "", PROC_FIELDS.index(parsed.field))
    return (2, parsed.proc, parsed.region, REGION_METRICS.index(parsed.field))
