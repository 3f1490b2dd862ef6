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
from functools import lru_cache

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

#: ``thp`` (pages mapped from a transparent huge page not yet split, KPF_THP)
#: exists only for a region mapped with ``thp = true``
REGION_METRICS: tuple[str, ...] = ("present", "zero_pfn", "ksm", "distinct_frames", "thp")

#: observed at a ``set`` step only: the value the tunable holds after the write
#: (read back from /sys/kernel/mm/ksm), and the errno the write returned (0 when
#: the kernel took it, 16 for EBUSY); both empty where the kernel lacks the tunable
SET_TUNABLE_NAMES: tuple[str, ...] = ("use_zero_pages", "max_page_sharing", "smart_scan",
                                      "merge_across_nodes")
SET_ERROR = "set.error"
#: observed at every point of a scenario with advisor_mode = "scan-time" (6.8):
#: the pages_to_scan the advisor has set (scan_time_advisor() after each
#: full scan; advisor_min_pages_to_scan when the advisor is switched on)
PAGES_TO_SCAN = "pages_to_scan"
TUNABLE_METRIC_NAMES: tuple[str, ...] = SET_TUNABLE_NAMES + (PAGES_TO_SCAN,)

_NAME = r"[A-Za-z0-9_-]+"
_GLOBAL_RE = re.compile(r"global\.(?P<field>[a-z_]+)\Z")
_PROC_RE = re.compile(rf"proc\.(?P<proc>{_NAME})\.(?P<field>[a-z_]+)\Z")
_TUNABLE_RE = re.compile(r"tunable\.(?P<field>[a-z_]+)\Z")
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
        if self.kind == "set":
            return SET_ERROR
        if self.kind == "tunable":
            return tunable_metric(self.field)
        if self.kind == "proc":
            return proc_metric(self.proc or "", self.field)
        return region_metric(self.proc or "", self.region or "", self.field)


def global_metric(counter: str) -> str:
    return f"global.{counter}"


def proc_metric(proc: str, field: str) -> str:
    return f"proc.{proc}.{field}"


def region_metric(proc: str, region: str, field: str) -> str:
    return f"region.{proc}.{region}.{field}"


def tunable_metric(name: str) -> str:
    return f"tunable.{name}"


#: the metric forms: (pattern, kind, the fields it may name, what a field is called);
#: region before proc, whose pattern would also match a region metric's prefix
_FORMS = (
    (_GLOBAL_RE, "global", GLOBAL_COUNTERS, "global counter"),
    (_TUNABLE_RE, "tunable", TUNABLE_METRIC_NAMES, "tunable"),
    (_REGION_RE, "region", REGION_METRICS, "region metric"),
    (_PROC_RE, "proc", PROC_FIELDS, "process metric"),
)


def parse_metric(name: str) -> MetricName:
    """Parse and validate a metric name; ``ValueError`` says what is wrong."""
    if name == SET_ERROR:
        return MetricName("set", "error")
    for pattern, kind, known, word in _FORMS:
        m = pattern.match(name)
        if m:
            if m["field"] not in known:
                raise ValueError(f"unknown {word} '{m['field']}' (known: {', '.join(known)})")
            parts = m.groupdict()
            return MetricName(kind, m["field"], parts.get("proc"), parts.get("region"))
    raise ValueError(f"'{name}' is not a metric name (global.<counter>, proc.<p>.<field>, "
                     "region.<p>.<r>.<metric>, tunable.<name> or set.error)")


def metric_sort_key(name: str) -> tuple:
    """Stable, readable order: globals, then processes, then regions."""
    parsed = parse_metric(name)
    if parsed.kind == "global":
        return (0, "", "", GLOBAL_COUNTERS.index(parsed.field))
    if parsed.kind == "proc":
        return (1, parsed.proc, "", PROC_FIELDS.index(parsed.field))
    if parsed.kind == "set":
        return (3, "", "", 0)
    if parsed.kind == "tunable":
        return (3, "", "", 1 + TUNABLE_METRIC_NAMES.index(parsed.field))
    return (2, parsed.proc, parsed.region, REGION_METRICS.index(parsed.field))


# -- what the emulator does not model --------------------------------------------------------

@dataclass(frozen=True)
class Unmodelled:
    """Metrics the emulator leaves without a prediction on purpose.

    A cell where only one side (the kernel or the emulator) has a value is a
    mismatch, except for the cells covered by one of these entries: there the
    emulator says nothing and the kernel's value is only recorded.  The README
    ("Not modelled") shows this list as :func:`unmodelled_markdown` renders it.
    """

    #: the metrics covered, as the README shows them
    metrics: str
    #: when they are not modelled, as the README shows it
    when: str
    #: why, with the kernel commit the behaviour depends on
    why: str
    #: the metric field covered (None: every field but ``except_field``)
    field: str | None = None
    except_field: str | None = None
    #: only on kernels whose profile lacks this behaviour flag
    without_flag: str | None = None
    #: only in a scenario whose THP region meets an op outside the THP model
    #: (ksmbench.emulator.emulate.thp_outside_model)
    thp_only: bool = False
    #: only in a scenario with op ``reclaim``
    reclaim_only: bool = False

    def covers(self, metric: str, *, flags: frozenset[str] | set[str] = frozenset(),
               thp: bool = False, reclaim: bool = False) -> bool:
        if self.thp_only and not thp:
            return False
        if self.reclaim_only and not reclaim:
            return False
        if self.without_flag is not None and self.without_flag in flags:
            return False
        name = parse_metric(metric)
        if self.field is not None:
            return name.kind == "proc" and name.field == self.field
        return str(name) != self.except_field


UNMODELLED: tuple[Unmodelled, ...] = (
    Unmodelled(
        f"proc.<p>.{RSS_ANON}", "always",
        "RssAnon includes the agent's own Python interpreter, which no model can know",
        field=RSS_ANON),
    Unmodelled(
        f"proc.<p>.{RSS_ANON_SCENARIO}", "on kernels without `rss_exact`",
        "before 82241a83cd15 (6.16; stable 6.12.y, 6.15.y) /proc/<pid>/status reads the per-cpu "
        "RSS counters approximately: measured off by a few pages on Debian 6.1",
        field=RSS_ANON_SCENARIO, without_flag="rss_exact"),
    Unmodelled(
        f"proc.<p>.{RSS_ANON_SCENARIO}", "in a scenario with op `reclaim`",
        "the cell is RssAnon less the anonymous pages a walk of the page tables finds outside "
        "the scenario's regions, which is exact only while that counter and the page tables "
        "agree; after memory.reclaim has swapped out the agent's own interpreter too, Debian "
        "6.12 twice showed RssAnon one page below the walk for a moment (two reads of each "
        "agreeing, gone by the next observation), in about 1 run of `swap-reclaim-ksm` in "
        "100, while every region cell matched; the model cannot time that",
        field=RSS_ANON_SCENARIO, reclaim_only=True),
    Unmodelled(
        "every metric but `global.full_scans`",
        "in a scenario where a THP region (`thp = true`) is read, zapped or advised other than "
        "mergeable/unmergeable, mprotected, mremapped, write-protected with userfaultfd, or "
        "its process forks",
        "those ops split a PMD without splitting the huge page: a partly mapped THP waits on "
        "the deferred split queue until memory runs short (the shrinker then splits it, and "
        "since b1f202060afe remaps its zero-filled subpages), and a read maps the huge zero "
        "page, and a write there splits the PMD into 4 KiB zero pages until 1ced09e0331f "
        "(6.13) allocates a huge page instead; both depend on timing and memory state, not "
        "on KSM",
        except_field="global.full_scans", thp_only=True),
)


def unmodelled(metric: str, *, flags: frozenset[str] | set[str] = frozenset(),
               thp: bool = False, reclaim: bool = False) -> Unmodelled | None:
    """The entry of :data:`UNMODELLED` that covers this metric, or None.

    ``flags`` are the behaviour flags of the kernel's emulator profile;
    ``thp`` and ``reclaim`` say whether the scenario has a THP region past
    the THP model, and op ``reclaim``.
    """
    return _unmodelled(metric, frozenset(flags), thp, reclaim)


@lru_cache(maxsize=65536)
def _unmodelled(metric: str, flags: frozenset[str], thp: bool,
                reclaim: bool) -> Unmodelled | None:
    for entry in UNMODELLED:
        if entry.covers(metric, flags=flags, thp=thp, reclaim=reclaim):
            return entry
    return None


def unmodelled_markdown() -> list[str]:
    """The README's "Not modelled" bullets, one per entry of :data:`UNMODELLED`."""
    out = []
    for e in UNMODELLED:
        metrics = e.metrics if "`" in e.metrics else f"`{e.metrics}`"
        out.append(f"- {metrics}, {e.when}: {e.why}.")
    return out


def judge(observed: int | None, predicted: int | None, *, excused: bool = False) -> bool | None:
    """One cell's verdict: True (match), False (mismatch) or None (nothing to compare).

    Both sides absent: nothing to compare (the kernel lacks the counter and the
    model knows it).  Exactly one side absent: a mismatch, unless ``excused``
    (the metric is on the :data:`UNMODELLED` list for this scenario and kernel).
    """
    if observed is None and predicted is None:
        return None
    if observed is None or predicted is None:
        return None if excused else False
    return observed == predicted
