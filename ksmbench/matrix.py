"""Many kernels at once: the kernel matrix on a Dask cluster.

``ksmbench run --jobs N`` boots up to N guests at once on an embedded Dask
``LocalCluster`` (N worker processes, one thread each); ``--scheduler
tcp://HOST:PORT`` sends the same tasks to an existing Dask cluster whose
workers have ksmbench installed.  One task per (kernel, scenario set): a task
resolves the kernel on its worker, boots it once, and runs every scenario,
with the same :class:`~ksmbench.runner.Runner` as a sequential run, so every
row is the row a sequential run writes.

How rows get home, exactly once:

* Inside a task the Runner writes into a :class:`_TaskSink` instead of a run
  directory.  When a scenario finishes, its rows (observations and
  expectations) and its outcome go to the client as one *batch* through a
  Dask ``Queue`` (``put`` returns once the scheduler holds it).
* The client commits a batch to the run directory's CSV files (appended and
  flushed at once) unless that (kernel, scenario) is already committed: the
  first complete batch wins.  The task's return value repeats every batch, so
  a lost message costs nothing: what the stream did not commit, the result
  does.
* A worker that dies mid-task (killed, OOM, machine lost) loses only the
  scenario it was running: Dask runs the task again on another worker, which
  boots the kernel afresh and runs the whole scenario set again, so every
  scenario it commits has the same history in its boot as in a sequential
  run.  The scenarios the dead attempt had committed are not written twice.
  ``metadata.json`` lists each kernel's attempts (worker, start, the
  scenarios committed from it).

The host kernel never goes to the cluster: it runs first, alone, in this
process, under the machine's run lock (:mod:`ksmbench.kernel.lock`), with
no guest booting beside it.

``ksmbench validate`` sends its kernels through the same
:class:`MatrixSession`: it builds the images on the client, ships each with
its task (:class:`ShippedImage`) and keeps the returned event stream as the
image's replay cache (``KernelTask.record``).

Row order: while the run goes on, batches are appended as they are
committed.  When the run ends, observations.csv and expectations.csv are
rewritten (atomically) in the order a sequential run writes: kernels in
command-line order, scenarios in run order, rows as produced.  So a finished
parallel run's tables are byte-for-byte those of ``--jobs 1``; only
metadata.json (times, attempts, workers) differs.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .backends.base import Backend
from .errors import KsmbenchError, UsageError
from .results import RunDir, now_iso
from .observation import Event, PointObserved, ScenarioFinished
from .progress import progress_message
from .runner import KernelOutcome, Observer, RunRecorder, Runner, ScenarioOutcome, _safe_label
from .scenario import model as m

#: QEMU's own memory beside the guest's RAM (TCG translation cache, device
#: models, virtiofsd): what one more guest costs on top of ``--memory``
GUEST_OVERHEAD_BYTES = 512 << 20
#: the share of available memory the guests may take together
MEMORY_SHARE = 0.8
#: how often a task reports progress (the points it has measured)
PROGRESS_INTERVAL = 0.5
#: bounded waits of the client
CONNECT_TIMEOUT = 10.0
CLUSTER_START_TIMEOUT = 120.0
CLOSE_TIMEOUT = 30.0


# -- the default of --jobs ----------------------------------------------------------

def parse_memory(text: str) -> int:
    """Bytes of a QEMU ``-m`` size: a number with an optional K/M/G/T suffix
    (no suffix: MiB, as QEMU reads it)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(t[-1:], None)
    number = t[:-1] if scale else t
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"--memory {text}: not a size", hint="e.g. 2G or 1536M") from None
    return int(value * (scale or 1 << 20))


@dataclass(frozen=True)
class JobsDefault:
    jobs: int
    cores: int
    by_memory: int
    explanation: str


def default_jobs(memory: str, *, cores: int | None = None,
                 available: int | None = None) -> JobsDefault:
    """How many guests to boot at once when ``--jobs`` is not given.

    One guest per core (the cores this process may run on): under TCG a
    guest's scenario runner keeps about one host core busy, and more guests
    than cores only slice the same CPU time thinner.  And no more guests than
    fit, with ``GUEST_OVERHEAD_BYTES`` each on top of ``--memory``, in
    ``MEMORY_SHARE`` of the memory available now.
    """
    import psutil

    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    if available is None:
        available = psutil.virtual_memory().available
    per_guest = parse_memory(memory) + GUEST_OVERHEAD_BYTES
    by_memory = max(1, int(available * MEMORY_SHARE) // per_guest)
    jobs = max(1, min(cores, by_memory))
    return JobsDefault(jobs, cores, by_memory,
                       f"{jobs} = min({cores} cores, {by_memory} guests of {memory} + "
                       f"{GUEST_OVERHEAD_BYTES >> 20} MiB in {MEMORY_SHARE:.0%} of "
                       f"{available / (1 << 30):.1f} GiB available)")


def jobs_for(args, backends) -> int:
    """Guests at once for a command: ``--jobs``, else (two guests or more)
    :func:`default_jobs`; 1 means one after the other in this process."""
    if args.jobs is not None:
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: must be 1 or more")
        return min(args.jobs, max(1, sum(1 for b in backends if b.label != "host")))
    from .backends.vm import VMBackend

    guests = sum(1 for b in backends if isinstance(b, VMBackend))
    if guests < 2:
        return 1
    return min(default_jobs(args.memory).jobs, guests)


# -- one task: one kernel, one scenario set (runs on a worker) ----------------------

@dataclass(frozen=True)
class KernelTask:
    index: int                 #: position on the command line (the row order)
    spec: str                  #: the --kernel value
    label: str                 #: the kernel column
    options: dict              #: resolve_backend's VM options
    profile: str               #: --profile
    run_id: str
    queue: str | None          #: the Dask Queue that carries batches home
    #: where the guest console log and raw events go: the run directory on
    #: this machine, or None on a remote cluster (a directory of the worker's
    #: cache, named in metadata.json)
    artifacts_parent: str | None
    #: a kernel image built on the client (validate's base and variants),
    #: shipped with the task: ``spec`` is its path on the client
    image: "ShippedImage | None" = None
    #: return the kernel's event stream in the result (validate keeps it as
    #: the replay cache of the image, on the client)
    record: bool = False


@dataclass(frozen=True)
class ShippedImage:
    """A boot image's bytes, carried in the task to workers that may not see
    the client's filesystem.  A tinyconfig bzImage is about 2 MiB, and
    validate's images have no modules to carry (tinyconfig leaves
    CONFIG_MODULES unset)."""

    path: str        #: where it is on the client
    sha256: str
    data: bytes

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ShippedImage":
        import hashlib

        data = Path(path).read_bytes()
        return cls(str(path), hashlib.sha256(data).hexdigest(), data)

    def materialize(self) -> str:
        """The image's path on this worker: the client's path when this
        machine has the same file there (a LocalCluster, a shared filesystem),
        else a copy in this worker's cache, keyed by its digest."""
        import hashlib

        from .errors import os_boundary
        from .sources.cache import cache_root

        here = Path(self.path)
        try:
            if here.is_file() and here.stat().st_size == len(self.data) and \
                    hashlib.sha256(here.read_bytes()).hexdigest() == self.sha256:
                return str(here)
        except OSError:
            pass  # not readable here: use the shipped bytes
        with os_boundary(f"writing the shipped kernel image {here.name} into this worker's cache"):
            target = cache_root() / "cluster-images" / self.sha256[:16] / here.name
            if not (target.is_file() and target.stat().st_size == len(self.data)):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_bytes(self.data)
                os.replace(tmp, target)
        return str(target)


@dataclass
class Batch:
    """One finished (or, at a task's end, unfinished) scenario of one attempt."""

    kernel: str
    attempt: str
    scenario: str
    observations: list[tuple]
    expectations: list[tuple]
    outcome: ScenarioOutcome


@dataclass
class TaskResult:
    kernel: str
    attempt: str
    worker: dict
    outcome: KernelOutcome
    entry: dict
    batches: list[Batch]
    #: the kernel's run (boot and every scenario) on the worker
    seconds: float | None = None
    #: the event stream as JSON lines (KernelTask.record), else None
    events: list[str] | None = None


class _EventLog(Observer):
    """Every event of the stream, as the JSON lines a replay reads."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def event(self, run: KernelOutcome, event: Event) -> None:
        from .observation import event_to_json

        self.lines.append(event_to_json(event))


class _TaskSink(Observer):
    """What the run recorder writes to inside a task, in place of a run
    directory; and, as an observer after the recorder, what sends progress and
    each finished scenario's rows home."""

    def __init__(self, task: KernelTask, attempt: str, publish: Callable[[tuple], None]):
        self.task = task
        self.attempt = attempt
        self.publish = publish
        if task.artifacts_parent is not None:
            self.path = Path(task.artifacts_parent)
        else:
            from .sources.cache import cache_root

            self.path = cache_root() / "cluster-runs" / task.run_id
            self.path.mkdir(parents=True, exist_ok=True)
        self.entry: dict[str, Any] = {"kernel": task.label, "started_at": now_iso()}
        self._obs: list[tuple] = []
        self._exp: list[tuple] = []
        self.batches: list[Batch] = []
        self.points = 0
        self._last_progress = 0.0

    # the RunDir interface the Runner uses
    def kernel_entry(self, label: str) -> dict[str, Any]:
        return self.entry

    def write_metadata(self) -> None:
        self.publish(("info", self.task.label, self.attempt, dict(self.entry)))

    def add_observations(self, rows) -> None:
        self._obs.extend(tuple(r) for r in rows)

    def add_expectations(self, rows) -> None:
        self._exp.extend(tuple(r) for r in rows)

    # the observer
    def event(self, run: KernelOutcome, event: Event) -> None:
        message = progress_message(run, event)
        if message is None:
            return
        point = isinstance(event, PointObserved)
        if point:
            self.points += 1
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL or not point:
            self._last_progress = now
            self.publish(("progress", self.task.label, self.attempt, self.points, message))
        if isinstance(event, ScenarioFinished):
            # its last row is written (the recorder saw the event first): one batch home
            batch = self._take(event.scenario, run.scenarios[event.scenario])
            self.batches.append(batch)
            self.publish(("batch", batch))

    def _take(self, scenario: str, outcome: ScenarioOutcome) -> Batch:
        obs = [r for r in self._obs if r[0] == scenario]
        exp = [r for r in self._exp if r[0] == scenario]
        self._obs = [r for r in self._obs if r[0] != scenario]
        self._exp = [r for r in self._exp if r[0] != scenario]
        return Batch(self.task.label, self.attempt, scenario, obs, exp, outcome)

    def unfinished(self, outcome: KernelOutcome) -> list[Batch]:
        """Scenarios that started but sent no batch (the kernel failed mid-way)."""
        sent = {b.scenario for b in self.batches}
        out = []
        for name, o in outcome.scenarios.items():
            if name not in sent:
                out.append(self._take(name, o))
        return out


def _worker_identity() -> dict:
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        from distributed import get_worker

        ident["worker"] = get_worker().address
    except (ImportError, ValueError):
        ident["worker"] = "local"
    return ident


def run_kernel_task(task: KernelTask, scenarios: Sequence[m.Scenario]) -> TaskResult:
    """Run one kernel's scenarios (on a Dask worker); batches go home as each
    scenario finishes, and all of them again in the result."""
    from .backends import resolve_backend

    attempt = uuid.uuid4().hex[:12]
    ident = _worker_identity()
    queue = None
    if task.queue is not None:
        from distributed import Queue

        queue = Queue(task.queue)

    def publish(message: tuple) -> None:
        if queue is not None:
            queue.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        publish(("attempt", task.label, attempt, {**ident, "started_at": now_iso()}))
        sink = _TaskSink(task, attempt, publish)
        log = _EventLog() if task.record else None
        started = time.monotonic()
        try:
            predictor = _predictor()
            spec = task.image.materialize() if task.image is not None else task.spec
            backend = resolve_backend(spec, **task.options)
            backend.label = task.label  # e.g. validate's "base" for an image path
            observers: list[Observer] = [RunRecorder(sink, predictor=predictor,
                                                     profile=task.profile), sink]
            if log is not None:
                observers.append(log)
            runner = Runner(observers, artifacts_root=sink.path)
            outcome = runner.run_kernel(backend, scenarios)
        except KsmbenchError as exc:
            outcome = KernelOutcome(task.label, None, error=exc.one_line())
        seconds = round(time.monotonic() - started, 1)
        if outcome.error:
            outcome.error = f"{outcome.error} [on {ident['host']} {ident['worker']}]"
            sink.entry["error"] = outcome.error
        sink.entry["ended_at"] = now_iso()
        if task.artifacts_parent is None:
            sink.entry["artifacts"] = f"{ident['host']}:{sink.path / _safe_label(task.label)}"
        batches = sink.batches + sink.unfinished(outcome)
        return TaskResult(task.label, attempt, ident, outcome, sink.entry, batches, seconds,
                          log.lines if log is not None else None)
    finally:
        if queue is not None:
            queue.close()


def _predictor():
    try:
        from .emulator import Predictor
    except ImportError:
        return None
    return Predictor()


# -- the client: submit, stream home, commit once --------------------------------------

@dataclass
class _KernelState:
    task: KernelTask
    committed: dict[str, ScenarioOutcome] = field(default_factory=dict)
    attempts: dict[str, dict] = field(default_factory=dict)
    outcome: KernelOutcome | None = None
    points: int = 0
    progress_task: Any = None


class MatrixRun:
    """Commits batches from tasks into one run directory, each (kernel,
    scenario) once."""

    def __init__(self, rundir: RunDir, tasks: Sequence[KernelTask], scenarios: Sequence[m.Scenario],
                 on_change: Callable[[_KernelState, str, bool], None] | None = None):
        """``on_change(state, message, milestone)``: milestone is True for an
        attempt starting, a scenario committed and a kernel ending (what a log
        without a live bar shows), False for a step."""
        self.rundir = rundir
        self.scenarios = list(scenarios)
        self.state: dict[str, _KernelState] = {}
        self.on_change = on_change or (lambda state, message, milestone: None)
        for t in tasks:
            self.add(t)

    def add(self, task: KernelTask) -> _KernelState:
        """A kernel whose batches are to be committed (before its task is submitted)."""
        state = self.state[task.label] = _KernelState(task)
        self.rundir.kernel_entry(task.label)
        return state

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "batch":
            self.commit(message[1])
            return
        label, attempt = message[1], message[2]
        state = self.state.get(label)
        if state is None:
            return
        if kind == "attempt":
            state.attempts.setdefault(attempt, {"attempt": attempt, **message[3], "committed": []})
            self._write_attempts(state)
            self.on_change(state, f"attempt on {message[3].get('worker')}", True)
        elif kind == "info":
            if state.outcome is not None:
                return  # late: the task's result has already given the final facts
            entry = self.rundir.kernel_entry(label)
            info = {k: v for k, v in message[3].items() if k not in ("kernel", "verdicts")}
            entry.update(info)
            self.rundir.write_metadata()
        elif kind == "progress" and state.outcome is None:
            state.points = message[3]
            self.on_change(state, message[4], False)

    def commit(self, batch: Batch) -> bool:
        state = self.state.get(batch.kernel)
        if state is None or batch.scenario in state.committed:
            return False
        self.rundir.add_observations(batch.observations)
        self.rundir.add_expectations(batch.expectations)
        state.committed[batch.scenario] = batch.outcome
        state.attempts.setdefault(batch.attempt, {"attempt": batch.attempt, "committed": []})[
            "committed"].append(batch.scenario)
        self._write_attempts(state)
        self.on_change(state, f"{batch.scenario}: {batch.outcome.verdict}", True)
        return True

    def finish(self, label: str, result: TaskResult | None, error: str | None) -> KernelOutcome:
        state = self.state[label]
        if result is not None:
            for batch in result.batches:
                self.commit(batch)
            state.attempts.setdefault(result.attempt, {"attempt": result.attempt,
                                                       **result.worker, "committed": []})
            state.attempts[result.attempt]["ended_at"] = result.entry.get("ended_at")
            entry = self.rundir.kernel_entry(label)
            entry.update({k: v for k, v in result.entry.items() if k not in ("kernel", "verdicts")})
            profile, info, error = result.outcome.profile, result.outcome.info, \
                result.outcome.error or error
        else:
            profile, info = None, {}
        if error:
            self.rundir.kernel_entry(label)["error"] = error
        outcome = KernelOutcome(label, profile, error=error, info=dict(info))
        order = [s.name for s in self.scenarios]
        for name in sorted(state.committed, key=lambda n: order.index(n) if n in order else len(order)):
            outcome.scenarios[name] = state.committed[name]
        entry = self.rundir.kernel_entry(label)
        entry["verdicts"] = {name: o.verdict for name, o in outcome.scenarios.items()}
        self._write_attempts(state)
        state.outcome = outcome
        self.on_change(state, "failed" if error else "done", True)
        return outcome

    def _write_attempts(self, state: _KernelState) -> None:
        self.rundir.kernel_entry(state.task.label)["attempts"] = list(state.attempts.values())
        self.rundir.write_metadata()


def _error_text(future) -> str:
    try:
        exc = future.exception(timeout=CLOSE_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - the future itself failed to report
        return f"the task could not be collected: {type(err).__name__}: {err}"
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return ("every worker that ran this kernel died (Dask gave up after "
                "distributed.scheduler.allowed-failures attempts)")
    return f"the task failed: {type(exc).__name__}: {exc}"


def connect(scheduler: str | None, jobs: int):
    """A Dask client: to ``scheduler``, or to a new LocalCluster of ``jobs``
    worker processes.  Returns (client, cluster or None).  An unreachable
    scheduler is one UsageError line naming the address."""
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT}s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"--scheduler {scheduler}: cannot reach the Dask scheduler "
                             f"({reason[:160]})",
                             hint="start one with `dask scheduler`, or check the address and port"
                             ) from None
        return client, None
    from distributed import LocalCluster

    # processes, one thread each: one guest per worker; memory_limit=0 because
    # the guest's RAM is QEMU's (a child), not the worker's, and the nanny must
    # never pause or restart a worker over it
    cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                           dashboard_address=None, memory_limit=0,
                           silence_logs=logging.ERROR)
    client = Client(cluster, set_as_default=False, timeout=f"{CLUSTER_START_TIMEOUT}s")
    return client, cluster


class MatrixSession:
    """Tasks on a Dask cluster whose batches are committed into one run
    directory as they come home (:class:`MatrixRun`).  Tasks may be submitted
    while others run: ``run`` submits every kernel at once, ``validate``
    submits its variants once the base has been judged.  ``poll()`` commits
    what has arrived and returns the kernels that ended since the last call."""

    def __init__(self, client, rundir: RunDir, scenarios: Sequence[m.Scenario], queue: str | None,
                 on_change: Callable[[_KernelState, str, bool], None] | None = None):
        from distributed import Queue

        self.client = client
        self.scenarios = list(scenarios)
        self.queue = Queue(queue, client=client) if queue else None
        self.matrix = MatrixRun(rundir, [], scenarios, on_change)
        self.futures: dict[Any, KernelTask] = {}
        self.pending: dict[Any, KernelTask] = {}
        self.outcomes: dict[str, KernelOutcome] = {}
        #: each ended kernel's task result (None when the task failed as a whole)
        self.results: dict[str, TaskResult | None] = {}

    def submit(self, task: KernelTask) -> None:
        self.matrix.add(task)
        future = self.client.submit(run_kernel_task, task, self.scenarios, pure=False,
                                    key=f"ksmbench-{task.run_id}-{task.index}-{_safe_label(task.label)}")
        self.futures[future] = task
        self.pending[future] = task

    def _drain(self) -> None:
        if self.queue is not None:
            for raw in self.queue.get(batch=True):
                self.matrix.handle(pickle.loads(raw))

    def poll(self) -> list[KernelOutcome]:
        """Commit the batches that came home; finish the tasks that ended."""
        ended = []
        try:
            self._drain()
            for future, t in list(self.pending.items()):
                if not future.done():
                    continue
                del self.pending[future]
                result = None
                if future.status == "finished":
                    try:
                        result = future.result(timeout=CLOSE_TIMEOUT)
                    except Exception as exc:  # noqa: BLE001 - e.g. the result was lost with its worker
                        error = f"the task's result could not be fetched: {type(exc).__name__}: {exc}"
                else:
                    error = _error_text(future)
                outcome = self.matrix.finish(t.label, result, None if result else error)
                self.outcomes[t.label] = outcome
                self.results[t.label] = result
                ended.append(outcome)
        except OSError as exc:  # the comm to the scheduler closed (distributed's CommClosedError)
            raise KsmbenchError(f"lost the Dask scheduler during the run ({str(exc)[:160]})",
                                hint="the scenarios committed so far are in the run directory"
                                ) from None
        return ended

    def close(self) -> None:
        """Cancel what is still running, commit what already came home; the
        kernels that did not end are named in metadata.json."""
        for future in self.futures:
            if not future.done():
                future.cancel()
        if self.queue is not None:
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                pass
            self.queue.close()
        rundir = self.matrix.rundir
        unfinished = [t.label for t in self.futures.values() if t.label not in self.outcomes]
        if unfinished:
            rundir.metadata.setdefault("matrix", {})["unfinished_kernels"] = unfinished
            rundir.write_metadata()


def run_matrix(*, console, rundir: RunDir, tasks: Sequence[KernelTask],
               scenarios: Sequence[m.Scenario], client) -> list[KernelOutcome]:
    """Submit every task to ``client``'s cluster and commit what comes back.
    Returns the outcomes in ``tasks`` order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    total = sum(len(s.steps) - sum(1 for st in s.steps if st.op == "scan") + s.scan_count
                for s in scenarios)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[kernel]}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        def on_change(state: _KernelState, message: str, milestone: bool) -> None:
            if not console.is_terminal:
                # no live bar where no terminal shows it (rich draws it once, at the end)
                if milestone:
                    console.print(f"{state.task.label}: {message} ({len(state.committed)} "
                                  f"of {len(scenarios)} scenarios)", markup=False, highlight=False)
                return
            if state.progress_task is None:
                return
            progress.update(state.progress_task, completed=min(state.points, total),
                            description=message[:70])

        session = MatrixSession(client, rundir, scenarios, tasks[0].queue if tasks else None,
                                on_change)
        try:
            for t in tasks:
                session.submit(t)
                if console.is_terminal:
                    session.matrix.state[t.label].progress_task = progress.add_task(
                        "queued", total=total, kernel=t.label)
            while session.pending:
                for outcome in session.poll():
                    if outcome.error:
                        progress.console.print(f"[red]{outcome.label}: {outcome.error}[/red]")
                    bar = session.matrix.state[outcome.label].progress_task
                    if bar is not None:
                        progress.update(bar, completed=total,
                                        description="failed" if outcome.error else "done")
                time.sleep(0.2)
        finally:
            session.close()
    return [session.outcomes[t.label] for t in tasks]


def close_cluster(client, cluster) -> None:
    """End the client and an embedded cluster (its worker processes, and with
    them any guest: each QEMU has a watchdog on its parent)."""
    try:
        client.close(timeout=CLOSE_TIMEOUT)
    except Exception:  # noqa: BLE001 - closing must not hide the run's own error
        pass
    if cluster is not None:
        try:
            cluster.close(timeout=CLOSE_TIMEOUT)
        except Exception:  # noqa: BLE001
            pass


# -- the sequential order -------------------------------------------------------------

def sequential_order(path: str | os.PathLike, kernels: Sequence[str], scenarios: Sequence[str]) -> None:
    """Rewrite observations.csv and expectations.csv of a run directory in the
    order a sequential run writes them (kernels, then scenarios, in the given
    order; rows of one scenario as produced).  Atomic: a temporary file
    replaces the table."""
    kpos = {k: i for i, k in enumerate(kernels)}
    spos = {s: i for i, s in enumerate(scenarios)}
    for name in ("observations.csv", "expectations.csv"):
        table = Path(path) / name
        if not table.exists():
            continue
        with open(table, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
        if header is None:
            continue
        col_s, col_k = header.index("scenario"), header.index("kernel")
        rows.sort(key=lambda r: (kpos.get(r[col_k], len(kpos)), spos.get(r[col_s], len(spos))))
        tmp = table.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, table)


# -- the command -----------------------------------------------------------------------

def run_kernels(args, *, console, scenarios: Sequence[m.Scenario], specs: Sequence[str],
                backends: Sequence[Backend], predictor, jobs: int, profile: str = "auto",
                extra_metadata: dict | None = None) -> tuple[RunDir, list[KernelOutcome]]:
    """``run``'s kernels on the cluster (the host alone first, under the run
    lock, in this process).  ``specs``: the ``--kernel`` value of each backend
    (a worker resolves it again); ``profile``: the emulator profile to compare
    with (``auto``: by each kernel's release).  Returns the run directory
    (closed, its tables in sequential order) and the outcomes in command-line
    order."""
    from .kernel.lock import RunLock
    from .progress import run_kernel_with_progress

    labels = [b.label for b in backends]
    seen = set()
    for label in labels:
        if label in seen:
            raise UsageError(f"--kernel {label} is given twice", hint="give each kernel once")
        seen.add(label)
    host = [b for b in backends if b.label == "host"]
    remote = [(spec, b) for spec, b in zip(specs, backends, strict=True) if b.label != "host"]
    # connect before anything is written: an unreachable scheduler leaves no run directory
    client = cluster = None
    if remote:
        client, cluster = connect(args.scheduler, jobs)
    try:
        rundir = RunDir(args.out)
        rundir.metadata["command"] = ["ksmbench", *__import__("sys").argv[1:]]
        rundir.metadata["scenarios"] = [s.name for s in scenarios]
        rundir.metadata["matrix"] = {
            "jobs": jobs if not args.scheduler else None,
            "scheduler": args.scheduler or "LocalCluster",
            "workers": len(client.scheduler_info().get("workers", {})) if client else 0,
        }
        rundir.metadata.update(extra_metadata or {})
        for label in labels:
            rundir.kernel_entry(label)
        where = args.scheduler or f"{jobs} local worker{'s' if jobs > 1 else ''}"
        console.print(f"run {rundir.run_id}: {len(scenarios)} scenarios on {', '.join(labels)} "
                      f"({where}) -> {rundir.path}")
        outcomes: dict[str, KernelOutcome] = {}
        try:
            if host:
                # alone: no guest boots beside the host's scans (none is submitted yet)
                with RunLock(timeout=args.wait):
                    outcomes["host"] = run_kernel_with_progress(console, rundir, host[0], scenarios,
                                                                predictor, profile)
            if remote:
                queue = f"ksmbench-{rundir.run_id}-{uuid.uuid4().hex[:6]}"
                local = args.scheduler is None
                tasks = [KernelTask(labels.index(b.label), spec, b.label,
                                    {"memory": args.memory, "cpus": args.cpus, "accel": args.accel,
                                     "modules": args.modules,
                                     "numa_nodes": getattr(args, "numa_nodes", None)},
                                    profile, rundir.run_id, queue,
                                    str(rundir.path.resolve()) if local else None)
                         for spec, b in remote]
                for outcome in run_matrix(console=console, rundir=rundir, tasks=tasks,
                                          scenarios=scenarios, client=client):
                    outcomes[outcome.label] = outcome
        finally:
            rundir.close()
            sequential_order(rundir.path, labels, [s.name for s in scenarios])
    finally:
        if client is not None:
            close_cluster(client, cluster)
    return rundir, [outcomes[label] for label in labels if label in outcomes]
