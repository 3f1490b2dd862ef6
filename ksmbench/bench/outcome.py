"""What a benchmark run produced, typed: every figure's summary
(:class:`MetricSummary`), the memory savings seen several ways
(:class:`SavingsResult`), the ksm_tests cross-check (:class:`CrosscheckResult`
or :class:`CrosscheckNotDone`), and one kernel's whole body of ``bench.json``
(:class:`KernelBench`).

The printed summary (:mod:`.summary`) and the report (:mod:`ksmbench.report`)
read these, never ``bench.json``'s keys.  ``to_dict()`` writes exactly the
JSON that ``bench.json`` has always held and ``from_dict()`` reads it back,
older run directories included (a key an older run lacks is None).

:data:`HEADLINES` is the one list of the metrics both show first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .config import FreeRunTunables
from .stats import Summary


@dataclass(frozen=True)
class Headline:
    benchmark: str
    metric: str
    title: str
    #: the report's benchmark table shows it (unmerge time is there as a
    #: throughput, the cross-check has its own rows from its section)
    in_report: bool = True


#: the headline metrics, in the order both the summary and the report show them
HEADLINES: tuple[Headline, ...] = (
    Headline("merge", "mib_per_s", "merge throughput"),
    Headline("merge", "ksmd_cpu_seconds", "ksmd CPU during merge"),
    Headline("unmerge", "seconds", "unmerge time", in_report=False),
    Headline("unmerge", "mib_per_s", "unmerge throughput"),
    Headline("cow", "us_per_page", "CoW break per page"),
    Headline("cow", "first_touch_us_per_page", "first touch per page (baseline)"),
    Headline("scan_cost", "scan1_cpu_seconds", "ksmd CPU, scan 1 (checksums)"),
    Headline("scan_cost", "scan2_cpu_seconds", "ksmd CPU, scan 2 (merging)"),
    Headline("scan_cost", "scan3_cpu_seconds", "ksmd CPU, scan 3 (steady)"),
    Headline("scan_cost", "cpu_per_merged_page_us", "ksmd CPU per merged page"),
    Headline("crosscheck", "mib_per_s", "cross-check throughput", in_report=False),
)


@dataclass(frozen=True)
class MetricSummary:
    """One figure (benchmark, case, size, use_zero_pages, metric) over its repeats."""

    benchmark: str
    case: str
    size_mib: float | None
    use_zero_pages: int | None
    metric: str
    unit: str
    summary: Summary
    samples: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "case": self.case, "size_mib": self.size_mib,
                "use_zero_pages": self.use_zero_pages, "metric": self.metric, "unit": self.unit,
                "summary": self.summary.to_dict(), "samples": list(self.samples)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetricSummary":
        return cls(d["benchmark"], d["case"], d["size_mib"], d["use_zero_pages"], d["metric"],
                   d["unit"], Summary.from_dict(d["summary"]), tuple(d.get("samples", ())))


@dataclass(frozen=True)
class CrosscheckFailure:
    """One measurement of the cross-check that failed (it is left out)."""

    case: str
    repeat: int
    error: str
    loadavg: float | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrosscheckFailure":
        return cls(d["case"], d["repeat"], d["error"], d.get("loadavg"))


@dataclass(frozen=True)
class CrosscheckNotDone:
    """The cross-check could not be made: no ksm_tests, or none of a judged
    kind of measurement succeeded."""

    error: str
    size_mib: int
    #: the exception's class: tells "no source package reachable" from a failed build
    error_kind: str | None = None
    failures: tuple[CrosscheckFailure, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "size_mib": self.size_mib}
        if self.error_kind is not None:
            out["error_kind"] = self.error_kind
        if self.failures is not None:
            out["failures"] = [asdict(f) for f in self.failures]
        return out


#: names of the cross-check's measurements, as the summary prints them
CROSSCHECK_CASES = {
    "ksm_tests": "ksm_tests -P, ksmd on the spinner's CPU",
    "ksmbench": "ksmbench the ksm_tests way, ksmd on the spinner's CPU",
    "ksm_tests-other-cpu": "ksm_tests -P, ksmd on another CPU",
    "ksmbench-other-cpu": "ksmbench the ksm_tests way, ksmd on another CPU",
    "ksmbench-idle-owner": "ksmbench merge benchmark (owner asleep, ksmd free)",
}


@dataclass(frozen=True)
class CrosscheckResult:
    """ksmbench's merge throughput against the kernel's ``ksm_tests -P``
    (:func:`~ksmbench.bench.crosscheck.run_crosscheck` says how it is made)."""

    size_mib: int
    tunables: FreeRunTunables
    #: MiB/s of ksmbench the ksm_tests way, of ksm_tests -P, and of the idle-owner merge
    ours_mib_per_s: Summary
    ksm_tests_mib_per_s: Summary
    ratio: float                       # ours / ksm_tests, medians
    relative_difference: float         # what is judged
    tolerance: float
    agrees: bool
    #: where the ksm_tests binary came from (source_package, source_version, binary)
    ksm_tests: dict[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()
    idle_owner_mib_per_s: Summary | None = None
    #: every measurement's MiB/s (keys: CROSSCHECK_CASES)
    mib_per_s: dict[str, Summary] = field(default_factory=dict)
    tlb_shootdowns_median: dict[str, float | None] = field(default_factory=dict)
    ksmd_cpu_seconds_median: dict[str, float | None] = field(default_factory=dict)
    loadavg: dict[str, list[float | None]] = field(default_factory=dict)
    tunables_seen_ours: dict[str, list[str]] = field(default_factory=dict)
    tunables_seen_ksm_tests: dict[str, list[str]] = field(default_factory=dict)
    tunables_seen_idle_owner: dict[str, list[str]] = field(default_factory=dict)
    spinner_cpu: int | None = None
    cpus: int | None = None
    pairs: int | None = None
    paired_ratios: tuple[float, ...] = ()
    paired_ratio_median: float | None = None
    medians_relative_difference: float | None = None
    idle_owner_ratio: float | None = None
    other_cpu_ratio: float | None = None
    failures: tuple[CrosscheckFailure, ...] = ()
    method: str | None = None
    #: False when the numbers mean nothing where they were measured (a TCG guest)
    judged: bool | None = None
    not_judged_because: str | None = None

    @property
    def is_judged(self) -> bool:
        return self.judged is not False

    #: written only when set (older runs and host runs lack them)
    _OPTIONAL = ("other_cpu_ratio", "judged", "not_judged_because", "idle_owner_mib_per_s",
                 "method")
    _SUMMARIES = ("ours_mib_per_s", "ksm_tests_mib_per_s", "idle_owner_mib_per_s")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._OPTIONAL and value is None:
                continue
            if f.name in self._SUMMARIES:
                value = value.to_dict()
            elif f.name == "tunables":
                value = value.to_dict()
            elif f.name == "mib_per_s":
                value = {k: s.to_dict() for k, s in value.items()}
            elif f.name == "failures":
                value = [asdict(x) for x in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrosscheckResult":
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        for name in cls._SUMMARIES:
            if values.get(name) is not None:
                values[name] = Summary.from_dict(values[name])
        values["tunables"] = FreeRunTunables(**d["tunables"])
        values["mib_per_s"] = {k: Summary.from_dict(s) for k, s in d.get("mib_per_s", {}).items()}
        values["failures"] = tuple(CrosscheckFailure.from_dict(x) for x in d.get("failures") or ())
        values["argv"] = tuple(d.get("argv", ()))
        values["paired_ratios"] = tuple(d.get("paired_ratios", ()))
        return cls(**values)

    def not_judged(self, because: str) -> "CrosscheckResult":
        """This result, marked as meaning nothing where it was measured."""
        return replace(self, judged=False, not_judged_because=because)


Crosscheck = CrosscheckResult | CrosscheckNotDone


def crosscheck_from_dict(d: dict[str, Any]) -> Crosscheck:
    if d.get("error"):
        failures = d.get("failures")
        return CrosscheckNotDone(
            d["error"], d.get("size_mib"), d.get("error_kind"),
            None if failures is None else tuple(CrosscheckFailure.from_dict(x) for x in failures))
    return CrosscheckResult.from_dict(d)


@dataclass(frozen=True)
class SavingsView:
    """One way of seeing the saving, against what it must show if ``explanation``
    is the whole story (medians over the repeats)."""

    view: str
    explanation: str
    saved_bytes: float | None       # None: a counter this kernel lacks
    expected_bytes: float | None
    residual_bytes: float | None    # saved - expected
    residual_min_bytes: float | None = None
    residual_max_bytes: float | None = None


@dataclass(frozen=True)
class UnmergeCost:
    """What run=2 took back after the savings workload merged (medians)."""

    run2_seconds: float
    predicted_bytes_by_counters: float
    page_tables_bytes: float
    measured_anon_bytes: float
    measured_pss_bytes: float
    measured_available_bytes: float
    measured_free_and_pcp_bytes: float
    zero_pages_left_after_run2: float
    ksm_pages_left_after_run2: int | None = None
    explanation: str = ""


@dataclass(frozen=True)
class SavingsWorkload:
    processes: int
    mib_per_process: int
    #: (first page, end page, pattern) of every process's region
    layout: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class MachineDrift:
    """How much the machine moved by itself over 0.5 s before merging (median |x|)."""

    drift_anon_bytes: float
    drift_available_bytes: float
    drift_free_and_pcp_bytes: float


@dataclass(frozen=True)
class SavingsResult:
    """The savings workload at one use_zero_pages, reconciled over its repeats
    (:func:`~ksmbench.bench.savings.combine`)."""

    workload: SavingsWorkload
    repeats_done: int
    use_zero_pages: int
    expected_counters: dict[str, int]
    views: tuple[SavingsView, ...]
    unmerge: UnmergeCost
    median_abs_drift: MachineDrift
    #: every repeat's own reconciliation, as measured (:func:`~ksmbench.bench.savings.reconcile`)
    repeats: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"workload": {"processes": self.workload.processes,
                             "mib_per_process": self.workload.mib_per_process,
                             "layout": [list(x) for x in self.workload.layout]},
                "repeats_done": self.repeats_done, "use_zero_pages": self.use_zero_pages,
                "expected_counters": self.expected_counters,
                "views": [asdict(v) for v in self.views], "unmerge": asdict(self.unmerge),
                "median_abs_drift": asdict(self.median_abs_drift), "repeats": list(self.repeats)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SavingsResult":
        w = d["workload"]
        return cls(SavingsWorkload(w["processes"], w["mib_per_process"],
                                   tuple(tuple(x) for x in w.get("layout", ()))),
                   d["repeats_done"], d["use_zero_pages"], d["expected_counters"],
                   tuple(SavingsView(**v) for v in d["views"]), UnmergeCost(**d["unmerge"]),
                   MachineDrift(**d["median_abs_drift"]), tuple(d.get("repeats", ())))


@dataclass
class KernelBench:
    """One kernel's benchmark results: the body of ``bench.json`` under its label."""

    summaries: list[MetricSummary] = field(default_factory=list)
    #: use_zero_pages -> the savings reconciliation
    savings: dict[int, SavingsResult] | None = None
    crosscheck: Crosscheck | None = None

    def headline_summaries(self) -> list[MetricSummary]:
        """The headline figures, in HEADLINES order, then case, use_zero_pages, size."""
        order = {(h.benchmark, h.metric): i for i, h in enumerate(HEADLINES)}
        rows = [s for s in self.summaries if (s.benchmark, s.metric) in order]
        bench_order = {h.benchmark: i for i, h in reversed(list(enumerate(HEADLINES)))}
        rows.sort(key=lambda s: (bench_order[s.benchmark], s.case, s.use_zero_pages or 0,
                                 s.size_mib or 0, order[(s.benchmark, s.metric)]))
        return rows

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"summaries": [s.to_dict() for s in self.summaries]}
        if self.savings is not None:
            out["savings"] = {str(uzp): r.to_dict() for uzp, r in self.savings.items()}
        if self.crosscheck is not None:
            out["crosscheck"] = self.crosscheck.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KernelBench":
        cc, savings = d.get("crosscheck"), d.get("savings")
        return cls([MetricSummary.from_dict(s) for s in d.get("summaries", [])],
                   None if savings is None else
                   {int(uzp): SavingsResult.from_dict(r) for uzp, r in savings.items()},
                   None if cc is None else crosscheck_from_dict(cc))

    def update(self, other: "KernelBench") -> None:
        """Fold in a later run of the same kernel: summaries add up, a later
        savings or cross-check replaces an earlier one."""
        self.summaries.extend(other.summaries)
        if other.savings is not None:
            self.savings = other.savings
        if other.crosscheck is not None:
            self.crosscheck = other.crosscheck
