"""A backend wrapper that hands every event to the Runner and keeps the observation points.

ksmbench's verdicts (``ksmbench selftest``) and the pytest plugin's ``ksm_run``
judge scenarios from a real run through :class:`~ksmbench.runner.Runner`; this
wrapper lets them see the same points the Runner writes, without reading the
results table back.
"""

from __future__ import annotations

from ..observation import BackendInfo, PointObserved, ScenarioFinished


class RecordingBackend:
    """Passes a backend's events to the Runner and keeps the observation points."""

    def __init__(self, backend):
        self.backend = backend
        self.label = backend.label
        self.points: dict[str, list] = {}
        self.errors: dict[str, str | None] = {}
        self.info: dict = {}

    @property
    def artifacts_dir(self):
        return self.backend.artifacts_dir  # AttributeError (no such attribute) passes through

    @artifacts_dir.setter
    def artifacts_dir(self, value) -> None:
        self.backend.artifacts_dir = value

    @property
    def tunables_after(self):
        """The wrapped backend's tunables as restored (the Runner records them
        when a run is interrupted)."""
        return getattr(self.backend, "tunables_after", None)

    def events(self, scenarios):
        stream = self.backend.events(scenarios)
        try:
            for event in stream:
                if isinstance(event, PointObserved):
                    self.points.setdefault(event.scenario, []).append(event.point)
                elif isinstance(event, ScenarioFinished):
                    self.errors[event.scenario] = event.error
                elif isinstance(event, BackendInfo):
                    self.info.update(event.info)
                yield event
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
