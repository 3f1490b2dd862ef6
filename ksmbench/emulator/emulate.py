"""Run a scenario through the model and produce the host backend's observation points.

The points, their keys and their metric names are exactly those of
:class:`ksmbench.backends.host.HostSession`: the baseline point, one point
after every step (scan column empty) and one after each scan of a ``scan``
step, and the teardown point (every process exits, one more scan); per point the
global counters, then for every live process (creation order) its ksm_stat
fields, RssAnon and the scenario share of it, then each mapped region's
pagemap metrics.  A value the profile's kernel does not provide is None.
"""

from __future__ import annotations

from typing import Iterator

from ..metrics import (GLOBAL_COUNTERS, KSM_STAT_FIELDS, PAGES_TO_SCAN, RSS_ANON,
                       RSS_ANON_SCENARIO, SET_ERROR, global_metric, proc_metric, region_metric,
                       tunable_metric, unmodelled)
from ..observation import (ABSOLUTE_METRICS, BASELINE, BASELINE_STEP, TEARDOWN, ObservationPoint,
                           teardown_step)
from ..scenario import model as m
from ..scenario.patterns import FillId, write_byte_values
from .advisor import Advisor
from .machine import Ksm, Settings
from .scan import full_scan, partial_scan
from .profiles import Profile, get_profile


def settings_for(scenario: m.Scenario) -> Settings:
    k = scenario.ksm
    return Settings(use_zero_pages=k.use_zero_pages, max_page_sharing=k.max_page_sharing,
                    smart_scan=k.smart_scan, merge_across_nodes=k.merge_across_nodes,
                    prune=m.prune_regime(k.stable_node_chains_prune_millisecs) or "always",
                    swap=scenario.swap)


class ScenarioRun:
    """A scenario being emulated step by step (also used by the benchmark)."""

    def __init__(self, scenario: m.Scenario, profile: Profile | str, *, fast: bool = True):
        self.scenario = scenario
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.ksm = Ksm(self.profile, settings_for(scenario))
        k = scenario.ksm
        if k.advisor:
            # advisor_mode written after the advisor_* knobs (host backend)
            self.ksm.advisor = Advisor(min_pages=k.advisor_min_pages_to_scan,
                                       max_pages=k.advisor_max_pages_to_scan,
                                       max_cpu=k.advisor_max_cpu,
                                       target_scan_time=k.advisor_target_scan_time)
        self.fast = fast
        self.ksm.spawn(m.MAIN)
        # what this run leaves unpredicted on purpose (metrics.UNMODELLED): e.g.
        # THP regions are modelled under the ops of thp_outside_model() only,
        # past them only full_scans is predicted
        self._unmodelled = unmodelled_for(scenario, self.profile)
        #: a set step's outcome (set.error, tunable.<name>), for its observation
        self._set_values: dict[str, int | None] = {}

    def unmodelled(self, metric: str) -> bool:
        """True where this run predicts no value on purpose (ksmbench.metrics.UNMODELLED)."""
        return self._unmodelled(metric)

    def supported(self, step: m.Step) -> bool:
        """False for an op the profile's kernel refuses (the host run errors
        there), and for every step of a scenario that needs a kernel feature
        the profile lacks (the advisor before 6.8: the host refuses it whole)."""
        if self.scenario.ksm.advisor and not self.profile.has(m.ADVISOR_FEATURE[0]):
            return False
        return step.requires is None or self.profile.has(step.requires[0])

    def apply(self, step: m.Step) -> None:
        k = self.ksm
        if isinstance(step, m.Mmap):
            k.mmap(k.mms[step.proc], step.region, step.pages, step.thp,
                   0 if step.node is None else step.node)
        elif isinstance(step, m.Fill):
            fill = FillId(self.scenario.name, step.index)
            contents = k.contents.fill(step.pattern, step.end - step.first, fill)
            k.fill(k.mms[step.proc], step.region, step.first, step.end, contents)
        elif isinstance(step, m.Read):
            k.read(k.mms[step.proc], step.region, step.first, step.end)
        elif isinstance(step, m.Madvise):
            k.madvise(k.mms[step.proc], step.region, step.first, step.end, step.advice)
        elif isinstance(step, m.Prctl):
            k.prctl(k.mms[step.proc], step.merge)
        elif isinstance(step, m.UnmergeAll):
            k.unmerge_all()
        elif isinstance(step, m.Reclaim):
            k.reclaim_all()
        elif isinstance(step, m.Fork):
            k.fork(k.mms[step.proc], step.child)
        elif isinstance(step, m.Exit):
            k.exit(k.mms[step.proc])
        elif isinstance(step, m.Munmap):
            k.munmap(k.mms[step.proc], step.region)
        elif isinstance(step, m.Set):
            error, value = k.set_tunable(step.tunable, step.value)
            self._set_values = {SET_ERROR: error, tunable_metric(step.tunable): value}
        elif isinstance(step, m.Scan) and step.pages is not None:
            partial_scan(k, step.pages)
        elif isinstance(step, m.Exec):
            k.exec(k.mms[step.proc])
        elif isinstance(step, m.UffdWp):
            k.uffd_wp(k.mms[step.proc], step.region, step.first, step.end)
        elif isinstance(step, m.Mprotect):
            k.mprotect(k.mms[step.proc], step.region, step.first, step.end, step.prot)
        elif isinstance(step, m.Mremap):
            k.mremap(k.mms[step.proc], step.region, step.pages, step.move)
        elif isinstance(step, m.WriteByte):
            values = write_byte_values(step.pattern, step.end - step.first)
            k.write_byte(k.mms[step.proc], step.region, step.first, step.end, values)
        elif isinstance(step, (m.Expect, m.Scan)):
            pass
        else:  # pragma: no cover - the loader knows every op
            raise TypeError(f"unknown step {step!r}")

    def observe(self, step: m.Step, scan: int | None) -> ObservationPoint:
        return self.observe_at(step.index, step.op, scan)

    def observe_at(self, index: int, op: str, scan: int | None) -> ObservationPoint:
        k = self.ksm
        values: dict[str, int | None] = {}
        for name, value in k.global_values().items():
            values[global_metric(name)] = value
        for mm in k.mms.values():
            if not mm.alive:
                continue
            proc = k.proc_values(mm)
            for field in KSM_STAT_FIELDS + (RSS_ANON, RSS_ANON_SCENARIO):
                values[proc_metric(mm.name, field)] = proc[field]
            for region, seg in mm.regions.items():
                for key, value in k.region_values(seg).items():
                    values[region_metric(mm.name, region, key)] = value
        # what the documented list leaves unmodelled gets no prediction (THP
        # regions under ops outside the THP model; RssAnon: the interpreter's memory)
        if op == "set":
            values.update(self._set_values)
        if k.advisor is not None:
            values[tunable_metric(PAGES_TO_SCAN)] = k.advisor.pages_to_scan
        values = {key: (None if self.unmodelled(key) else v) for key, v in values.items()}
        return ObservationPoint(index, op, scan, values)

    def baseline(self) -> ObservationPoint:
        """The model's starting point: a clean KSM (what run=2 leaves)."""
        point = self.observe_at(BASELINE_STEP, BASELINE, None)
        return ObservationPoint(point.step, point.op, None,
                                {k: v for k, v in point.values.items() if k in ABSOLUTE_METRICS})

    def teardown(self) -> ObservationPoint:
        """Every live process exits (creation order, as the host backend ends
        them), then ksmd does one full scan, which frees the exited mms' rmap
        items and prunes what they left in the stable tree.  Exit accounting
        follows the profile: without fork_counter_fix (4d6fc29f3634) a child's
        inherited KSM zero pages are subtracted from the global counter on
        exit although fork never added them, so it ends below its baseline."""
        for mm in list(self.ksm.mms.values()):
            if mm.alive:
                self.ksm.exit(mm)
        full_scan(self.ksm, fast=self.fast)
        return self.observe_at(teardown_step(len(self.scenario.steps)), TEARDOWN, None)

    def points(self) -> Iterator[ObservationPoint]:
        yield self.baseline()
        for step in self.scenario.steps:
            if not self.supported(step):
                return
            if isinstance(step, m.Scan) and step.pages is not None:
                self.apply(step)
                yield self.observe(step, 1)
                continue
            if isinstance(step, m.Scan):
                for n in range(1, step.count + 1):
                    full_scan(self.ksm, fast=self.fast)
                    yield self.observe(step, n)
                continue
            self.apply(step)
            yield self.observe(step, None)
        yield self.teardown()


def unmodelled_for(scenario: m.Scenario, profile: Profile | str):
    """The predicate "this metric is not modelled" for a scenario under a profile."""
    prof = get_profile(profile) if isinstance(profile, str) else profile
    thp = m.thp_outside_model(scenario.steps) is not None
    reclaim = m.has_reclaim(scenario.steps)
    return lambda metric: unmodelled(metric, flags=prof.flags, thp=thp,
                                     reclaim=reclaim) is not None


def predict(scenario: m.Scenario, profile: Profile | str, *, fast: bool = True) -> list[ObservationPoint]:
    return list(ScenarioRun(scenario, profile, fast=fast).points())


assert set(GLOBAL_COUNTERS) == {"pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                                "ksm_zero_pages", "general_profit", "stable_node_chains",
                                "stable_node_dups", "full_scans", "pages_scanned", "pages_skipped"}
