"""The one stream every backend produces: observation points and run events.

A backend (the host kernel, a kernel in a VM, the emulator) runs scenarios and
yields :class:`Event` objects.  The results table, the comparison, the
progress display and the reports all read this stream, so no backend can
quietly measure something else.

Events are plain data and serialise to one JSON line each; that is how a guest
kernel streams its observations back to the host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, Union

from .metrics import GLOBAL_LEVELS, global_metric

Value = Union[int, None]

#: Two points frame every scenario, besides one per step and one per scan:
#:
#: * ``baseline`` (step -1, before step 0): the absolute global counters
#:   (:data:`ABSOLUTE_METRICS`) once the scenario's tunables are set and KSM is
#:   clean (run=2), before any scenario process exists.  Not a prediction
#:   target: predictions of absolute counters start from it (:func:`rebase`),
#:   so what an earlier scenario left behind never fails the next one.
#: * ``teardown`` (step = number of steps): the global counters after every
#:   scenario process has exited and ksmd has done one more full scan.  On a
#:   correct kernel the absolute counters are back at the baseline; what is
#:   not is the scenario's *residue* (e.g. ksm_zero_pages going negative on a
#:   kernel without 4d6fc29f3634).  The emulator predicts this point too.
BASELINE = "baseline"
TEARDOWN = "teardown"
BASELINE_STEP = -1
#: global counters reported as they are (levels), not as deltas
ABSOLUTE_METRICS: tuple[str, ...] = tuple(global_metric(n) for n in GLOBAL_LEVELS)


@dataclass(frozen=True)
class ObservationPoint:
    """Every metric's value at one point of a scenario.

    ``scan`` is the 1-based scan index within a ``scan`` step, else None.
    ``values`` maps metric names (see :mod:`ksmbench.metrics`) to signed ints,
    or None where the kernel (or the model) lacks the counter.
    """

    step: int
    op: str
    scan: int | None
    values: Mapping[str, Value]


@dataclass(frozen=True)
class Observation:
    """One cell: a metric's value at one point (a row of the results table)."""

    scenario: str
    kernel: str
    step: int
    op: str
    scan: int | None
    metric: str
    value: Value


def teardown_step(steps: int) -> int:
    """The step index of a scenario's teardown point (one past its last step)."""
    return steps


def expected_points(scenario) -> int:
    """Points a scenario that runs to its end produces: baseline, one per
    non-scan step, one per scan, teardown."""
    steps = scenario.steps
    return 2 + len(steps) - sum(1 for st in steps if st.op == "scan") + scenario.scan_count


def baseline_of(points: Iterable[ObservationPoint]) -> ObservationPoint | None:
    return next((p for p in points if p.op == BASELINE), None)


def rebase(predicted: Sequence[ObservationPoint], observed_baseline: Mapping[str, Value] | None
           ) -> list[ObservationPoint]:
    """Predictions whose absolute global counters start from the measured baseline.

    The model starts every scenario from a clean KSM (its own baseline point);
    a real kernel may start elsewhere, e.g. ksm_zero_pages already negative
    from an earlier scenario's fork-and-exit on a kernel without 4d6fc29f3634.
    Every absolute counter is a sum the scenario adds to, so the prediction is
    moved by (measured baseline - model baseline).  A counter either side
    lacks is not moved (it stays absent where it is absent).
    """
    pred = list(predicted)
    model = baseline_of(pred)
    if observed_baseline is None or model is None:
        return pred
    offset: dict[str, int] = {}
    for metric in ABSOLUTE_METRICS:
        o, p = observed_baseline.get(metric), model.values.get(metric)
        if o is not None and p is not None and o != p:
            offset[metric] = o - p
    if not offset:
        return pred
    return [ObservationPoint(p.step, p.op, p.scan, _shifted(p.values, offset)) for p in pred]


def absolute_levels(counters: Mapping[str, Value]) -> dict[str, Value]:
    """The absolute global counters (bare sysfs names) of a dict read from
    /sys/kernel/mm/ksm: what a measurement's baseline holds."""
    return {name: counters.get(name) for name in GLOBAL_LEVELS}


def from_baseline(values: Mapping[str, Value], baseline: Mapping[str, Value] | None
                  ) -> dict[str, Value]:
    """``values`` with every counter ``baseline`` holds counted from it
    (value - baseline), the way every measurement judges absolute counters.

    What KSM held before a measurement started is not the measurement's doing:
    on 6.18.44 a KSM zero page in a MADV_DONTFORK or MADV_WIPEONFORK region
    across fork stays counted in ksm_zero_pages (and general_profit) after
    every process has exited, until reboot.  A baseline holds absolute
    counters only: a scenario's baseline point (metric names) or
    :func:`absolute_levels` (sysfs names).  A counter either side lacks is
    left as it is (None stays None); other keys pass through.
    """
    if not baseline:
        return dict(values)
    return _shifted(values, {name: -value for name, value in baseline.items() if value})


def baseline_note(baseline: Mapping[str, Value] | None) -> str | None:
    """One line for the user when a measurement did not start from zero
    (None when it did): which counters, what they read, what was done."""
    nonzero = [f"{name.removeprefix('global.')} read {value}"
               for name, value in (baseline or {}).items() if value]
    if not nonzero:
        return None
    return (f"{', '.join(nonzero)} before the run, with KSM clean: counted from there "
            "(a kernel leak of KSM zero pages stays until reboot)")


def _shifted(values: Mapping[str, Value], offset: Mapping[str, int]) -> dict[str, Value]:
    """``values`` with ``offset`` added to each counter it has (None stays None)."""
    return {k: (v + offset[k] if v is not None and k in offset else v) for k, v in values.items()}


# -- events -------------------------------------------------------------------

@dataclass(frozen=True)
class ScenarioStarted:
    scenario: str
    steps: int
    scans: int


@dataclass(frozen=True)
class PointObserved:
    scenario: str
    point: ObservationPoint


@dataclass(frozen=True)
class ScenarioFinished:
    scenario: str
    #: None when the scenario ran to its end; else one line saying what failed
    error: str | None = None
    seconds: float = 0.0
    #: why the scenario was not run on this kernel (it lacks an interface the
    #: scenario needs, e.g. PR_SET_MEMORY_MERGE before 6.4); not an error
    skipped: str | None = None


@dataclass(frozen=True)
class BackendInfo:
    """Facts about the backend that belong in metadata.json."""

    info: Mapping[str, Any] = field(default_factory=dict)


Event = Union[ScenarioStarted, PointObserved, ScenarioFinished, BackendInfo]
_EVENT_TYPES = {cls.__name__: cls for cls in (ScenarioStarted, PointObserved, ScenarioFinished, BackendInfo)}


def event_to_json(event: Event) -> str:
    kind = type(event).__name__
    if isinstance(event, PointObserved):
        p = event.point
        body: dict[str, Any] = {"scenario": event.scenario, "step": p.step, "op": p.op,
                                "scan": p.scan, "values": dict(p.values)}
    elif isinstance(event, BackendInfo):
        body = {"info": dict(event.info)}
    else:
        body = dict(event.__dict__)
    return json.dumps({"event": kind, **body}, sort_keys=True)


def event_from_json(line: str) -> Event:
    data = json.loads(line)
    kind = data.pop("event")
    if kind == "PointObserved":
        point = ObservationPoint(step=data["step"], op=data["op"], scan=data["scan"],
                                 values=data["values"])
        return PointObserved(data["scenario"], point)
    if kind == "BackendInfo":
        return BackendInfo(data["info"])
    cls = _EVENT_TYPES[kind]
    return cls(**data)
