"""One way through the code for the event stream: every backend keeps one
contract (ksmbench/backends/base.py), and the Runner is the one loop that
consumes a backend's stream, handing each typed event to its observers.

The first tests read the source (so a second consumer loop or a probe on a
backend cannot come back unnoticed); the others run the Runner with a fake
kernel that yields typed events and check the rows, metadata and progress
its observers produce.
"""

from __future__ import annotations

import ast
import csv
import inspect
import io
import json
from pathlib import Path

import pytest

from ksmbench.backends.base import Backend
from ksmbench.observation import (BackendInfo, ObservationPoint, PointObserved, ScenarioFinished,
                                  ScenarioStarted)
from ksmbench.results import RunDir
from ksmbench.runner import PointCollector, RunRecorder, Runner
from ksmbench.scenario import builtin

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ksmbench"

#: the one module whose code iterates a backend's ``events(...)``
CONSUMER = "ksmbench/runner.py"
#: streams passed on, not consumed: file -> why it cannot go through the Runner
RELAYS = {
    # runs inside the guest and sits in the backends layer, below the runner
    # (tests/test_layering.py): it writes the host backend's events as JSON
    # lines, which the VM backend reads back and yields to the Runner
    "ksmbench/backends/vm/guest_events.py": "the guest's half of the VM backend",
}
#: what a probe would ask a backend for: the contract's members
BACKEND_MEMBERS = {"label", "tunables_after", "preflight", "events", "artifacts_dir", "spec"}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path


def test_only_the_runner_consumes_a_backends_event_stream():
    found = {}
    for name, path in _sources():
        for call in _calls(path):
            if isinstance(call.func, ast.Attribute) and call.func.attr == "events":
                found.setdefault(name, []).append(call.lineno)
    consumers = {name: lines for name, lines in found.items() if name not in RELAYS}
    assert list(consumers) == [CONSUMER], (
        f"backend event streams consumed outside the Runner: {consumers}; run the kernel "
        "through ksmbench.runner.Runner and observe it with an Observer")
    assert len(consumers[CONSUMER]) == 1, "the Runner has more than one loop over a stream"


def test_no_caller_probes_a_backend_with_getattr_or_hasattr():
    probes = []
    for name, path in _sources():
        for call in _calls(path):
            if not (isinstance(call.func, ast.Name) and call.func.id in ("getattr", "hasattr")
                    and len(call.args) >= 2):
                continue
            target, member = ast.unparse(call.args[0]), call.args[1]
            asks_member = isinstance(member, ast.Constant) and member.value in BACKEND_MEMBERS
            if asks_member or "backend" in target.lower() or "stream" in target.lower():
                probes.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
    assert not probes, ("probes on a backend (make it part of the Backend contract in "
                        "ksmbench/backends/base.py instead): " + "; ".join(probes))


def _keyword_only(method, name: str) -> bool:
    param = inspect.signature(method).parameters.get(name)
    return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


def test_every_backend_keeps_the_whole_contract(tmp_path):
    from ksmbench.backends.host import HostBackend
    from ksmbench.backends.vm import VMBackend
    from ksmbench.compare.validate import ReplayBackend
    from ksmbench.emulator.backend import EmulatorBackend

    backends = [HostBackend(), EmulatorBackend("linux-6.6"), ReplayBackend("x", tmp_path / "r")]
    for backend in backends:
        assert isinstance(backend, Backend), type(backend).__name__
        assert isinstance(backend.tunables_after, dict) and isinstance(backend.label, str)
    for cls in (*map(type, backends), VMBackend):
        assert _keyword_only(cls.events, "artifacts_dir"), cls.__name__
        assert callable(cls.preflight), cls.__name__
    # set in __init__, not probed for: a VM backend's tunables come in its BackendInfo
    assert "self.tunables_after" in inspect.getsource(VMBackend.__init__)
    EmulatorBackend("linux-6.6").preflight()  # nothing to refuse


# -- the Runner and its observers, with a fake kernel ---------------------------------------------

class FakeKernel:
    """A 'kernel' whose points are the emulator's for linux-6.6, with one cell
    one higher (``bump``), a second scenario skipped, and optionally a Ctrl-C
    before point ``interrupt_at`` of the first scenario."""

    label = "fake kernel"

    def __init__(self, bump: tuple[int, int | None, str], interrupt_at: int | None = None):
        self.bump = bump
        self.interrupt_at = interrupt_at
        self.tunables_after = {"run": "0", "use_zero_pages": "0"}
        self.yielded: list[ObservationPoint] = []
        self.artifacts_dir = "not given"

    def preflight(self) -> None:
        pass

    def events(self, scenarios, *, artifacts_dir=None):
        from ksmbench.emulator import predict
        from ksmbench.emulator.profiles import get_profile

        self.artifacts_dir = artifacts_dir
        yield BackendInfo({"status": "booting the fake kernel"})
        yield BackendInfo({"backend": "fake", "kernel_release": "6.6.0-fake"})
        first, skipped = scenarios
        yield ScenarioStarted(first.name, len(first.steps), first.scan_count)
        for i, point in enumerate(predict(first, get_profile("linux-6.6"))):
            if i == self.interrupt_at:
                raise KeyboardInterrupt
            values = dict(point.values)
            step, scan, metric = self.bump
            if (point.step, point.scan) == (step, scan):
                values[metric] += 1
            observed = ObservationPoint(point.step, point.op, point.scan, values)
            self.yielded.append(observed)
            yield PointObserved(first.name, observed)
        yield ScenarioFinished(first.name, None, 0.25)
        yield ScenarioStarted(skipped.name, len(skipped.steps), skipped.scan_count)
        yield ScenarioFinished(skipped.name, skipped="needs what this kernel lacks")


SCENARIOS = [builtin("zero-pages"), builtin("dup-at-max")]
BUMP = (3, 1, "global.full_scans")  # zero-pages step 3 is `scan`; its first scan


def _rows(rundir: RunDir) -> list[dict]:
    with open(rundir.path / "observations.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_observers_record_rows_judge_cells_and_show_progress(tmp_path):
    from rich.console import Console
    from rich.progress import Progress

    from ksmbench.emulator import Predictor
    from ksmbench.progress import ProgressBar, StatusLine

    assert SCENARIOS[0].steps[BUMP[0]].op == "scan"
    kernel = FakeKernel(BUMP)
    rundir = RunDir(tmp_path)
    shown: list[str] = []
    collected = PointCollector()
    with Progress(console=Console(file=io.StringIO())) as progress:
        bar = ProgressBar(progress, SCENARIOS)
        runner = Runner([RunRecorder(rundir, predictor=Predictor(), profile="auto"), collected,
                         StatusLine(lambda label, message: shown.append(message)), bar],
                        artifacts_root=rundir.path)
        outcome = runner.run_kernel(kernel, SCENARIOS)
        task = progress.tasks[bar.task]
        # the skipped scenario counts the points it will not produce: the bar ends full
        assert task.completed == task.total == sum(
            2 + len(s.steps) - sum(st.op == "scan" for st in s.steps) + s.scan_count
            for s in SCENARIOS)
    rundir.close()

    assert kernel.artifacts_dir == rundir.path / "fake_kernel"
    assert collected.points == {"zero-pages": kernel.yielded}
    # every yielded cell is a row; the bumped one is the only mismatch
    rows = [r for r in _rows(rundir) if r["kernel"] == "fake kernel"]
    assert len(rows) == sum(len(p.values) for p in kernel.yielded)
    assert {r["op"] for r in rows if r["predicted"] == ""} >= {"baseline"}
    bumped = [r for r in rows if r["match"] == "false"]
    assert [(r["step"], r["scan"], r["metric"]) for r in bumped] == [("3", "1", "global.full_scans")]
    assert int(bumped[0]["observed"]) == int(bumped[0]["predicted"]) + 1 == 2
    assert sum(r["match"] == "true" for r in rows) == outcome.scenarios["zero-pages"].compared - 1

    zero = outcome.scenarios["zero-pages"]
    assert outcome.profile == "linux-6.6" and zero.verdict == "mismatch"
    assert [m.describe() for m in zero.mismatches] == [
        "zero-pages [fake kernel] step 3 scan 1 global.full_scans: observed 2, predicted 1"]
    assert outcome.scenarios["dup-at-max"].verdict == "n/a"
    meta = json.loads((rundir.path / "metadata.json").read_text())
    [entry] = meta["kernels"]
    assert entry["kernel_release"] == "6.6.0-fake" and entry["emulator_profile"] == "linux-6.6"
    assert entry["verdicts"] == {"zero-pages": "mismatch", "dup-at-max": "n/a"}
    assert "status" not in entry and "interrupted" not in meta
    # the progress observer reads typed events (and the verdict the recorder judged first)
    assert shown[:3] == ["booting the fake kernel", "zero-pages: started", "zero-pages: step -1"]
    assert shown[-3:] == ["zero-pages: mismatch", "dup-at-max: started", "dup-at-max: n/a"]
    # a status, then per scenario: started, one line per point, its verdict
    assert len(shown) == 1 + (2 + len(kernel.yielded)) + 2


def test_an_interrupt_is_recorded_where_it_hit_with_the_restored_tunables(tmp_path):
    kernel = FakeKernel(BUMP, interrupt_at=3)
    rundir = RunDir(tmp_path)
    collected = PointCollector()
    with pytest.raises(KeyboardInterrupt):
        Runner([RunRecorder(rundir), collected]).run_kernel(kernel, SCENARIOS)
    rundir.close()
    last = kernel.yielded[-1]
    assert len(collected.points["zero-pages"]) == 3
    meta = json.loads((rundir.path / "metadata.json").read_text())
    assert meta["interrupted"] is True
    where = meta["interrupted_at"]
    assert (where["kernel"], where["scenario"], where["signal"]) == ("fake kernel", "zero-pages",
                                                                     "SIGINT")
    assert (where["after_step"], where["after_scan"]) == (last.step, last.scan)
    [entry] = meta["kernels"]
    assert entry["interrupted"] is True and entry["verdicts"] == {"zero-pages": "interrupted"}
    # the stream never said so: the Runner took them from the backend's contract
    assert entry["ksm_tunables_after"] == {"run": "0", "use_zero_pages": "0"}
    # no predictor: rows without predictions, written as they came
    assert {r["predicted"] for r in _rows(rundir)} == {""}


def test_expect_counts_absolute_counters_from_the_baseline(tmp_path):
    """An expect of a global counter holds when the kernel started the
    scenario with that counter already off (a leak stays until reboot)."""
    from ksmbench.observation import (BASELINE, BASELINE_STEP, ObservationPoint, PointObserved,
                                      ScenarioFinished, ScenarioStarted)
    from ksmbench.results import RunDir
    from ksmbench.runner import RunRecorder, Runner
    from ksmbench.scenario import parse_scenario

    scenario = parse_scenario('name = "t"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 1\n'
                              '[[step]]\nop = "expect"\n"global.ksm_zero_pages" = 0\n')

    class Leaked:
        label = "fake"
        tunables_after: dict = {}

        def preflight(self):
            pass

        def events(self, scenarios, *, artifacts_dir=None):
            yield ScenarioStarted("t", 2, 0)
            yield PointObserved("t", ObservationPoint(BASELINE_STEP, BASELINE, None,
                                                      {"global.ksm_zero_pages": 103}))
            yield PointObserved("t", ObservationPoint(0, "mmap", None, {"global.ksm_zero_pages": 103}))
            yield PointObserved("t", ObservationPoint(1, "expect", None,
                                                      {"global.ksm_zero_pages": 103}))
            yield ScenarioFinished("t")

    rundir = RunDir(tmp_path)
    outcome = Runner([RunRecorder(rundir)]).run_kernel(Leaked(), [scenario])
    result = outcome.scenarios["t"]
    assert result.expect_checked == 1 and result.expect_failures == []


def test_without_a_terminal_each_finished_scenario_is_a_line(tmp_path):
    """CI logs and pipes get no live bar (rich draws it once, at the end):
    the run prints a line per backend status and per finished scenario."""
    import io

    from rich.console import Console

    from ksmbench.observation import (BackendInfo, ObservationPoint, PointObserved,
                                      ScenarioFinished, ScenarioStarted)
    from ksmbench.progress import run_kernel_with_progress
    from ksmbench.results import RunDir
    from ksmbench.scenario import parse_scenario

    scenarios = [parse_scenario(f'name = "{n}"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 1\n')
                 for n in ("one", "two")]

    class Quiet:
        label = "fake"
        tunables_after: dict = {}

        def preflight(self):
            pass

        def events(self, scenarios, *, artifacts_dir=None):
            yield BackendInfo({"status": "booting"})
            for s in scenarios:
                yield ScenarioStarted(s.name, 1, 0)
                yield PointObserved(s.name, ObservationPoint(0, "mmap", None, {}))
                yield ScenarioFinished(s.name)

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    run_kernel_with_progress(console, RunDir(tmp_path), Quiet(), scenarios, None, None)
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["fake: booting (0 done)", "fake: one: observed (1 done)",
                         "fake: two: observed (2 done)"]
