"""The emulator as a backend: the same event stream as the host backend.

Reports and benchmarks can then treat "what the model says" like any kernel:
``EmulatorBackend("linux-6.6").events(scenarios)`` yields BackendInfo,
ScenarioStarted, PointObserved (one per step and per scan) and
ScenarioFinished, exactly as :class:`ksmbench.backends.host.HostBackend` does.
No root and no KSM are needed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

from .. import __version__
from ..errors import KsmbenchError
from ..observation import BackendInfo, Event, PointObserved, ScenarioFinished, ScenarioStarted
from ..scenario import model as m
from .emulate import ScenarioRun
from .profiles import describe_flags, get_profile


class EmulatorBackend:
    def __init__(self, profile: str = "linux-6.18", label: str | None = None):
        self.profile = get_profile(profile)
        self.label = label or f"emulator:{profile}"
        #: the model changes no tunable of this machine
        self.tunables_after: dict[str, str] = {}

    def preflight(self) -> None:
        """Nothing to refuse: the profile was checked when the backend was made."""

    def events(self, scenarios: Sequence[m.Scenario], *,
               artifacts_dir: Path | None = None) -> Iterator[Event]:
        """``artifacts_dir`` is unused: the model leaves no files."""
        yield BackendInfo({
            "backend": "emulator",
            "emulator_profile": self.profile.name,
            # a kernel release string that makes `--profile auto` pick this profile
            "kernel_release": "{}.{}.{}-emulator".format(*self.profile.version),
            "emulator_flags": {name: on for name, on, _ in describe_flags(self.profile)},
            "toolkit_version": __version__,
        })
        for scenario in scenarios:
            yield ScenarioStarted(scenario.name, len(scenario.steps), scenario.scan_count)
            started = time.monotonic()
            error = None
            if scenario.ksm.advisor and not self.profile.has(m.ADVISOR_FEATURE[0]):
                # as the host reports a kernel before 6.8: not applicable, no point
                yield ScenarioFinished(scenario.name, None, 0.0,
                                       f"needs {m.ADVISOR_FEATURE[1]}, which profile "
                                       f"{self.profile.name} lacks")
                continue
            run = ScenarioRun(scenario, self.profile)
            try:
                for point in run.points():
                    yield PointObserved(scenario.name, point)
                stopped = [s for s in scenario.steps if not run.supported(s)]
                if stopped:
                    error = (f"step {stopped[0].index}: op '{stopped[0].op}' is not supported by "
                             f"kernels of profile {self.profile.name}")
            except KsmbenchError as exc:
                error = exc.one_line()
            yield ScenarioFinished(scenario.name, error, time.monotonic() - started)
