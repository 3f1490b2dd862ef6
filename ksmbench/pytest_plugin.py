"""pytest plugin: write your own KSM tests against real kernels and the emulator.

Installed with ksmbench (entry point ``pytest11``), so any pytest run in the
same environment has it.  Fixtures:

``ksm_tunables``
    The host's KSM tunables through ksmbench's one undo mechanism
    (:class:`~ksmbench.kernel.tunables.TunableChanges`): ``ksm_tunables.set(name,
    value)`` records and journals the old value first; every change is undone
    when the test ends (pass, fail or error).  After a SIGKILLed pytest, the
    next session that uses ``ksm_tunables`` or ``ksm_run`` on the host, or the
    next ``ksmbench`` run, restores them from the journal.  Holds the
    machine's run lock meanwhile.  Skips
    without root or a writable /sys/kernel/mm/ksm.

``ksm_run``
    ``ksm_run(scenario, ...)`` runs scenarios on the chosen kernel (the host
    by default; ``--ksm-kernel debian:6.12`` or a bzImage path boots it in
    QEMU, all scenarios of one call in one boot) through the same Runner and
    backends as ``ksmbench run``, and returns a :class:`ScenarioResult` (one
    scenario) or a dict of them by name.  A scenario is a built-in name, a
    path, TOML text, or a :class:`~ksmbench.scenario.Scenario`.

``ksm_emulator``
    ``ksm_emulator.predict(scenario, profile=None)``: the emulator's
    prediction as a :class:`ScenarioResult`, for the chosen kernel's profile
    unless one is named.  Skips when the emulator is not installed.

``ksm_kernel``
    The ``--ksm-kernel`` value in use (``"host"`` by default).

The report header names the kernel release and the accelerator (KVM, TCG, or
none for the host); the terminal summary repeats them as actually used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pytest

DEFAULT_LOCK_WAIT = 900.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ksmbench", "ksmbench: KSM tests on real kernels")
    group.addoption("--ksm-kernel", default=None, metavar="KERNEL",
                    help="kernel for the ksm_run fixture: host (default), debian:<major.minor>, "
                         "or a bzImage path (booted in QEMU)")
    group.addoption("--ksm-accel", default="auto", choices=("auto", "kvm", "tcg"),
                    help="QEMU accelerator for a VM kernel (default: auto)")
    group.addoption("--ksm-memory", default="2G", help="guest memory for a VM kernel")
    group.addoption("--ksm-wait", type=float, default=None, metavar="SECONDS",
                    help=f"how long to wait for another ksmbench run to end (default "
                         f"{DEFAULT_LOCK_WAIT:.0f})")
    parser.addini("ksm_kernel", "default for --ksm-kernel", default="host")


def _kernel_spec(config: pytest.Config) -> str:
    return config.getoption("--ksm-kernel") or config.getini("ksm_kernel") or "host"


def _lock_wait(config: pytest.Config) -> float:
    value = config.getoption("--ksm-wait")
    return DEFAULT_LOCK_WAIT if value is None else value


# -- report header and summary -----------------------------------------------------------

def pytest_report_header(config: pytest.Config) -> list[str]:
    spec = _kernel_spec(config)
    release, accel = describe_kernel(spec, config.getoption("--ksm-accel"))
    return [f"ksmbench: kernel {spec}, release {release}, accelerator {accel}"]


def describe_kernel(spec: str, requested_accel: str = "auto") -> tuple[str, str]:
    """(release, accelerator) as known before anything boots; never raises."""
    if spec == "host":
        return os.uname().release, "none (host kernel)"
    try:
        from .backends.vm.kernels import image_release

        if spec.startswith("debian:"):
            release = _cached_debian_release(spec) or "resolved at first boot"
        else:
            release = image_release(Path(spec).expanduser()) or "unknown (not an x86 image)"
    except Exception as exc:  # the header must not break a test session
        release = f"unknown ({exc})"
    return release, _expected_accelerator(requested_accel)


def _cached_debian_release(spec: str) -> str | None:
    """The release of the newest cached Debian image of this series (no download)."""
    from .sources.cache import cache_root

    series = spec.split(":", 1)[1]
    kernels = cache_root() / "kernels"
    # boot/vmlinuz-<release>, or (Debian 6.19+ packaging) usr/lib/modules/<release>/vmlinuz
    releases = [image.name[len("vmlinuz-"):] for image in kernels.glob("*/boot/vmlinuz-*")]
    releases += [image.parent.name for image in kernels.glob("*/usr/lib/modules/*/vmlinuz")]
    found = [r for r in releases if r.startswith(series + ".")]
    return sorted(found)[-1] if found else None


def _expected_accelerator(requested: str) -> str:
    if requested != "auto":
        return f"{requested} (requested)"
    try:
        from .backends.vm.accel import cache_path, host_key, kvm_device_usable, read_verdicts

        if not kvm_device_usable():
            return "tcg (no usable /dev/kvm)"
        cached = read_verdicts(cache_path()).get(host_key())
        if cached is not None:
            return ("kvm" if cached.get("kvm_works") else "tcg") + " (cached KVM probe verdict)"
    except Exception:
        pass
    return "auto (KVM probed at first boot)"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    used = config.stash.get(_KERNELS_USED, None)
    if not used:
        return
    terminalreporter.section("ksmbench kernels used")
    for label, info in used.items():
        terminalreporter.write_line(
            f"{label}: release {info.get('kernel_release', '?')}, accelerator "
            f"{info.get('accelerator', 'none (host kernel)' if label == 'host' else '?')}")


# -- the run lock, re-entrant within this test session ---------------------------------------

class _SharedLock:
    """The machine's RunLock, held once however many fixtures of this session need it
    (a second flock from the same process on a new descriptor would block)."""

    def __init__(self):
        self.depth = 0
        self.lock = None

    def acquire(self, timeout: float) -> None:
        if self.depth == 0:
            from .kernel.lock import RunLock

            lock = RunLock(timeout=timeout)
            lock.acquire()
            self.lock = lock
        self.depth += 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.lock is not None:
            self.lock.release()
            self.lock = None


# Per test session, in pytest's own store: kernel label -> what the session saw
# of it (release, accelerator), and the session's one hold on the run lock.
_KERNELS_USED = pytest.StashKey[dict[str, dict]]()
_RUN_LOCK = pytest.StashKey[_SharedLock]()


def _kernels_used(config: pytest.Config) -> dict[str, dict]:
    return config.stash.setdefault(_KERNELS_USED, {})


def _run_lock(config: pytest.Config) -> _SharedLock:
    return config.stash.setdefault(_RUN_LOCK, _SharedLock())


def _require_host_ksm() -> None:
    from .errors import KsmUnavailable, PermissionNeeded
    from .kernel.policy import HostPolicy

    try:
        HostPolicy().check_access()
    except (KsmUnavailable, PermissionNeeded) as exc:
        pytest.skip(f"{exc.message} (or use --ksm-kernel debian:<version> for ksm_run)")


# -- ksm_tunables ----------------------------------------------------------------------------

class KsmTunables:
    """The host's KSM tunables for one test; every change is undone afterwards."""

    def __init__(self, changes):
        self._changes = changes
        self.sysfs = changes.sysfs

    def set(self, name: str, value: str | int | bool) -> None:
        self._changes.set(name, value)

    def get(self, name: str) -> str | None:
        return self.sysfs.tunable(name)

    def counter(self, name: str) -> int | None:
        """A KSM counter (signed; None where this kernel lacks it)."""
        return self.sysfs.read_int(name)

    @property
    def changed(self) -> dict[str, str]:
        """name -> the value it had before this test changed it."""
        return dict(self._changes.originals)


def repair_killed_sessions(sysfs) -> list[str]:
    """Restore what killed ksmbench runs or pytest sessions left changed.

    Every undo stack journals to its own file, so this fixture's stack and a
    host session's stack nested inside it never overwrite each other; a dead
    process's stacks are undone innermost first (see kernel/tunables.py).
    """
    from .kernel.tunables import repair

    message = repair(sysfs)
    return [message] if message else []


@pytest.fixture
def ksm_tunables(request):
    from .kernel.sysfs import KsmSysfs
    from .kernel.tunables import TunableChanges

    _require_host_ksm()
    lock = _run_lock(request.config)
    lock.acquire(_lock_wait(request.config))
    try:
        sysfs = KsmSysfs()
        repair_killed_sessions(sysfs)
        changes = TunableChanges(sysfs)
        try:
            yield KsmTunables(changes)
        finally:
            changes.restore()
    finally:
        lock.release()


# -- results ---------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    """The observation points of one scenario on one kernel (or the emulator)."""

    scenario: str
    kernel: str
    points: list = field(default_factory=list)
    error: str | None = None
    info: dict = field(default_factory=dict)
    rundir: Path | None = None
    #: for a prediction: metric -> True where the emulator predicts nothing on
    #: purpose (the documented list, ksmbench.metrics.UNMODELLED)
    unmodelled: Any = None

    @property
    def kernel_release(self) -> str | None:
        return self.info.get("kernel_release")

    def at(self, step: int, scan: int | None = None, *, raw: bool = False
           ) -> Mapping[str, int | None]:
        """Every metric at one point (KeyError if the run never got there).

        Absolute global counters count from the scenario's baseline, as the
        runner judges them: what the kernel held before the scenario started
        (a ksm_zero_pages leaked by an earlier run stays until reboot) is
        subtracted.  ``raw=True``: the values as read."""
        for p in self.points:
            if p.step == step and p.scan == scan:
                return p.values if raw else self._from_baseline(p.values)
        raise KeyError(f"{self.scenario} [{self.kernel}] has no observation at step {step}"
                       + (f" scan {scan}" if scan else "")
                       + (f" (it stopped: {self.error})" if self.error else ""))

    @property
    def final(self) -> Mapping[str, int | None]:
        """Every metric after the scenario's last step (before its teardown),
        absolute global counters from the baseline as in :meth:`at`."""
        steps = [p for p in self.points if p.op not in ("baseline", "teardown")]
        if not steps:
            raise KeyError(f"{self.scenario} [{self.kernel}] made no observation: {self.error}")
        return self._from_baseline(steps[-1].values)

    def _from_baseline(self, values: Mapping[str, int | None]) -> Mapping[str, int | None]:
        from .observation import from_baseline

        return from_baseline(values, self.baseline)

    @property
    def baseline(self) -> Mapping[str, int | None] | None:
        """The absolute global counters where the scenario started."""
        return next((p.values for p in self.points if p.op == "baseline"), None)

    @property
    def teardown(self) -> Mapping[str, int | None] | None:
        """The global counters after every scenario process exited and ksmd
        scanned once more (None if the scenario did not get there)."""
        return next((p.values for p in self.points if p.op == "teardown"), None)

    def __getitem__(self, metric: str) -> int | None:
        """A metric's value at the last point."""
        return self.final[metric]

    def series(self, metric: str) -> list[tuple[int, int | None, int | None]]:
        """(step, scan, value) at every point."""
        return [(p.step, p.scan, p.values.get(metric)) for p in self.points]

    def raise_for_error(self) -> "ScenarioResult":
        if self.error:
            raise AssertionError(f"{self.scenario} [{self.kernel}] did not complete: {self.error}")
        return self


def as_scenario(item):
    """A Scenario from a Scenario, TOML text, a file path or a built-in name."""
    from .scenario import Scenario, parse_scenario, resolve_scenarios

    if isinstance(item, Scenario):
        return item
    text = str(item)
    if "[[step]]" in text:
        return parse_scenario(text, source="<test>")
    return resolve_scenarios([text])[0]


# -- ksm_run ---------------------------------------------------------------------------------

class KsmRunner:
    """Runs scenarios on the chosen kernel through ksmbench's Runner and backends."""

    def __init__(self, config: pytest.Config, out: Path):
        self.config = config
        self.out = out
        self.kernel = _kernel_spec(config)

    def __call__(self, *scenarios, kernel: str | None = None):
        from .backends import resolve_backend
        from .errors import KsmbenchError, KsmUnavailable, PermissionNeeded
        from .results import RunDir
        from .runner import PointCollector, RunRecorder, Runner

        if not scenarios:
            raise TypeError("ksm_run() needs at least one scenario")
        spec = kernel or self.kernel
        parsed = [as_scenario(s) for s in scenarios]
        if spec == "host":
            _require_host_ksm()
        backend = resolve_backend(spec, memory=self.config.getoption("--ksm-memory"), cpus=2,
                                  accel=self.config.getoption("--ksm-accel"))
        try:
            backend.preflight()
        except (PermissionNeeded, KsmUnavailable) as exc:
            pytest.skip(exc.one_line())
        collected = PointCollector()
        lock = _run_lock(self.config)
        lock.acquire(_lock_wait(self.config))
        try:
            if spec == "host":
                from .kernel.sysfs import KsmSysfs

                repair_killed_sessions(KsmSysfs())
            rundir = RunDir(self.out)
            try:
                outcome = Runner([RunRecorder(rundir), collected],
                                 artifacts_root=rundir.path).run_kernel(backend, parsed)
            finally:
                rundir.close()
        finally:
            lock.release()
        if outcome.error and not collected.points:
            raise KsmbenchError(f"{spec}: {outcome.error}")
        _kernels_used(self.config)[backend.label] = {k: v for k, v in outcome.info.items()
                                      if k in ("kernel_release", "accelerator")}
        results = {s.name: ScenarioResult(s.name, backend.label, collected.points.get(s.name, []),
                                          outcome.scenario_error(s.name),
                                          dict(outcome.info), rundir.path) for s in parsed}
        return results[parsed[0].name] if len(parsed) == 1 else results


@pytest.fixture
def ksm_run(request, tmp_path_factory):
    return KsmRunner(request.config, tmp_path_factory.mktemp("ksmbench-runs"))


@pytest.fixture(scope="session")
def ksm_kernel(request) -> str:
    return _kernel_spec(request.config)


# -- ksm_emulator ----------------------------------------------------------------------------

class KsmEmulator:
    def __init__(self, kernel: str):
        from .emulator import Predictor

        self.predictor = Predictor()
        self.kernel = kernel

    def profile_for(self, release: str | None) -> str | None:
        return self.predictor.profile_for(release, "auto")

    def default_profile(self) -> str:
        if self.kernel == "host":
            release = os.uname().release
        elif self.kernel.startswith("debian:"):
            release = _cached_debian_release(self.kernel) or self.kernel.split(":", 1)[1] + ".0"
        else:
            from .backends.vm.kernels import image_release

            release = image_release(Path(self.kernel).expanduser())
        profile = self.profile_for(release)
        if profile is None:
            raise ValueError(f"no emulator profile for kernel {self.kernel} ({release})")
        return profile

    def predict(self, scenario, profile: str | None = None) -> ScenarioResult:
        s = as_scenario(scenario)
        name = profile or self.default_profile()
        self.predictor.check_profile(name)
        points = self.predictor.predict(s, name)
        return ScenarioResult(s.name, f"emulator:{name}", list(points), None,
                              {"emulator_profile": name},
                              unmodelled=self.predictor.unmodelled(s, name))


@pytest.fixture
def ksm_emulator(request) -> KsmEmulator:
    try:
        return KsmEmulator(_kernel_spec(request.config))
    except ImportError as exc:
        pytest.skip(f"the ksmbench emulator is not available ({exc})")


def comparable(observed: ScenarioResult, predicted: ScenarioResult,
               metrics: Iterable[str] | None = None) -> list[tuple[int, int | None, str, Any, Any]]:
    """Every cell that does not match: (step, scan, metric, observed, predicted).

    A cell differs when both sides have a value and they differ, or when only
    one side has a value and the metric is not on the emulator's documented
    unmodelled list for this scenario and profile (``ksmbench run``'s rule).
    A point only one side reached counts with all its values.  Predicted
    absolute counters start from the observed baseline; the baseline point
    itself is measured, not compared.
    """
    from .metrics import judge
    from .observation import BASELINE, rebase

    excused = predicted.unmodelled or observed.unmodelled or (lambda metric: False)
    predicted_at = {(p.step, p.scan): p.values for p in rebase(predicted.points, observed.baseline)
                    if p.op != BASELINE}
    observed_at = {(p.step, p.scan): p.values for p in observed.points if p.op != BASELINE}
    diffs = []
    for key in list(observed_at) + [k for k in predicted_at if k not in observed_at]:
        mine, other = observed_at.get(key, {}), predicted_at.get(key, {})
        for metric in (metrics or {**mine, **other}):
            a, b = mine.get(metric), other.get(metric)
            if judge(a, b, excused=excused(metric)) is False:
                diffs.append((key[0], key[1], metric, a, b))
    return diffs


__all__: Sequence[str] = ("ScenarioResult", "KsmTunables", "KsmRunner", "KsmEmulator",
                          "as_scenario", "comparable", "describe_kernel")
