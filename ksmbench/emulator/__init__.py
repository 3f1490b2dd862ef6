"""The emulator: a scan-granular model of KSM that predicts every observation.

* :class:`Predictor`: what the runner uses (``profile_for``, ``check_profile``,
  ``predict``).
* :class:`EmulatorBackend`: the emulator as a backend (``--kernel
  emulator:<profile>``), yielding the same event stream as the host backend
  (no root, no KSM needed).
* Profiles (:mod:`.profiles`): behaviour flags per kernel version, each
  citing its commit; ``linux-X.Y[.Z]`` plus ``,+flag`` / ``,-flag``.
* The model (:mod:`.machine`), its numpy scan (:mod:`.fastscan`), the
  scenario driver (:mod:`.emulate`) and ``ksmbench emulate`` (:mod:`.cli`).
  The package needs no kernel: what compares it with one lives above it
  (``ksmbench.compare.identify``, ``ksmbench.compare.differential``,
  ``ksmbench.bench.emulator_speed``).

Not modelled: the metrics of ``ksmbench.metrics.UNMODELLED`` (the one list,
shown in the README) get no prediction, and every comparison excuses exactly
those; a cell where only one side has a value is otherwise a mismatch.
Outside the scenario format:

* the 6.8 advisor's inputs where they are not pinned (a scan of 2 s or
  more, or 10 ms of ksmd CPU: the host stops such a run; :mod:`.advisor`),
  reclaim the kernel starts itself (kswapd, direct reclaim, memory cgroup
  limits; swap through MADV_PAGEOUT and memory.reclaim is modelled),
  migration (between NUMA nodes too: the trees per node of
  merge_across_nodes=0 are modelled, moving pages is not), compaction, races
  (e.g. 6.6-6.9's non-atomic ksm_zero_pages).
"""

from __future__ import annotations

from ..observation import ObservationPoint
from ..scenario.model import Scenario
from .emulate import ScenarioRun, predict, unmodelled_for
from .profiles import PRESETS, get_profile, profile_for_release

__all__ = ["Predictor", "EmulatorBackend", "predict", "unmodelled_for", "ScenarioRun", "get_profile", "PRESETS"]


class Predictor:
    """The runner's view of the emulator (ksmbench.runner.Predictor protocol)."""

    def profile_for(self, release: str | None, requested: str) -> str | None:
        if requested and requested != "auto":
            self.check_profile(requested)
            return requested
        return profile_for_release(release or "")

    def check_profile(self, name: str) -> None:
        get_profile(name)

    def predict(self, scenario: Scenario, profile: str) -> list[ObservationPoint]:
        return predict(scenario, profile)

    def unmodelled(self, scenario: Scenario, profile: str):
        """metric -> True where the emulator predicts nothing on purpose."""
        return unmodelled_for(scenario, profile)


def __getattr__(name: str):
    if name == "EmulatorBackend":
        from .backend import EmulatorBackend

        return EmulatorBackend
    raise AttributeError(name)
