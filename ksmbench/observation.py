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
from typing import Any, Mapping, Union

Value = Union[int, None]


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
