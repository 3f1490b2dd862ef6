"""The host backend: scenarios on the running kernel, one full ksmd scan at a time.

The controller (this module) never maps scenario memory itself.  It starts one
agent process per scenario process (see :mod:`.agent`), tells agents what to
do, steps ksmd through :class:`~ksmbench.kernel.stepping.ScanStepper`, and
collects an observation after every step and every scan (framed by a baseline
and a teardown point, see :mod:`ksmbench.observation`): the global counters
from sysfs here, the per-process and per-region metrics from each agent.

Around every scenario: KSM is cleaned with run=2 (rmap items, stable and
unstable trees dropped, full_scans reset), the scenario's ``[ksm]`` tunables are
applied through the one undo mechanism, and afterwards every agent is gone
before the next scenario starts.  A *sentinel* agent, registered with KSM for
the whole session but with nothing to scan, keeps ksmd's mm list non-empty so
that a requested scan always happens (ksmd does nothing while the list is
empty, ``ksmd_should_run()``).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any, Iterable, Iterator, Sequence

from .. import errors
from ..errors import Busy, KsmbenchError, NotApplicable, PermissionNeeded, WaitTimeout
from ..kernel import syscalls
from ..kernel.procfs import ProcFS
from ..kernel.stepping import ScanStepper, time_scale
from ..kernel.sysfs import KsmSysfs
from ..kernel.tunables import TunableChanges, repair
from ..metrics import (GLOBAL_CUMULATIVE, GLOBAL_LEVELS, KSM_STAT_FIELDS, RSS_ANON,
                       RSS_ANON_SCENARIO, global_metric, proc_metric, region_metric)
from ..observation import (BASELINE, BASELINE_STEP, TEARDOWN, BackendInfo, Event,
                           ObservationPoint, PointObserved, ScenarioFinished, ScenarioStarted,
                           teardown_step)
from ..scenario import model as m
from .agent import recv_msg, recv_msg_with_fds, send_msg


class AgentHandle:
    """The controller's end of one agent process."""

    def __init__(self, name: str, pid: int, sock: socket.socket, popen: subprocess.Popen | None = None):
        self.name = name
        self.pid = pid
        self.sock = sock
        self.popen = popen
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None
        self.alive = True

    @classmethod
    def spawn(cls, name: str) -> "AgentHandle":
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        popen = subprocess.Popen(
            [sys.executable, "-m", "ksmbench.backends.agent", str(theirs.fileno()), name],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            preexec_fn=syscalls.die_with_parent)
        theirs.close()
        handle = cls(name, popen.pid, mine, popen)
        handle.call("ping", timeout=30)
        return handle

    @classmethod
    def fork_from(cls, parent: "AgentHandle", name: str, *, op: str = "spawn",
                  timeout: float = 60.0) -> "AgentHandle":
        """A new agent forked by ``parent``: ``spawn`` (a fresh agent from the
        zygote) or ``fork`` (a scenario's fork, inheriting every region)."""
        pid, fds = parent.call(op, name, timeout=timeout)
        sock = socket.socket(fileno=fds[0])
        child = cls(name, pid, sock)
        sock.settimeout(30 * time_scale())
        try:
            hello = recv_msg(sock)
        except (socket.timeout, EOFError, ConnectionError):
            hello = None
        if hello != ("ok", pid):
            child.kill()
            raise KsmbenchError(f"process '{name}' (pid {pid}, forked by '{parent.name}') "
                                "did not start")
        return child

    def call(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        self.sock.settimeout(timeout * time_scale())
        try:
            send_msg(self.sock, (op, *args))
            if op in ("fork", "spawn"):
                reply, fds = recv_msg_with_fds(self.sock)
            else:
                reply, fds = recv_msg(self.sock), []
        except socket.timeout:
            raise WaitTimeout(f"timed out after {timeout * time_scale():.0f} s waiting for "
                              f"process '{self.name}' (pid {self.pid}) to finish '{op}'") from None
        except (EOFError, ConnectionError):
            raise KsmbenchError(f"process '{self.name}' (pid {self.pid}) died during '{op}'") from None
        if reply[0] == "error":
            _, kind, message, hint = reply
            raise errors.rebuild(kind, f"process '{self.name}': {message}", hint)
        if op in ("fork", "spawn"):
            return reply[1], fds
        return reply[1]

    def wait_gone(self, timeout: float) -> None:
        """Wait until the process has exited (its mm torn down)."""
        if self.pidfd is not None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout * time_scale())
            if not ready:
                raise WaitTimeout(f"timed out after {timeout * time_scale():.0f} s waiting for "
                                  f"process '{self.name}' (pid {self.pid}) to exit")
        if self.popen is not None:
            self.popen.wait(timeout=timeout * time_scale())
        self.alive = False

    def kill(self) -> None:
        if self.alive:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            try:
                self.wait_gone(10)
            except WaitTimeout:
                pass
        self.close()

    def close(self) -> None:
        self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def reap_orphans() -> None:
    """Reap grandchildren reparented to us (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class HostSession:
    """Everything held for a series of scenarios on this kernel.

    Entering: repair a killed run's tunables, refuse if another process uses
    KSM, take ksmd under control, start the sentinel.  Leaving (on success,
    exception, Ctrl-C or SIGTERM): kill every agent, restore every tunable.
    """

    def __init__(self, *, sysfs_root: str = "/sys/kernel/mm/ksm", proc_root: str = "/proc"):
        self.sysfs = KsmSysfs(sysfs_root)
        self.procfs = ProcFS(proc_root)
        self.changes = TunableChanges(self.sysfs)
        self.stepper = ScanStepper(self.sysfs, self.procfs, self.changes)
        self.zygote: AgentHandle | None = None
        self.sentinel: AgentHandle | None = None
        self.agents: dict[str, AgentHandle] = {}
        self.repair_message: str | None = None
        self.tunables_before: dict[str, str] = {}
        self.tunables_after: dict[str, str] = {}
        self._stack = ExitStack()

    # -- session ---------------------------------------------------------------
    def __enter__(self) -> "HostSession":
        check_host_access(self.sysfs)
        self.repair_message = repair(self.sysfs)
        self.tunables_before = self.sysfs.tunables()
        self._stack.callback(self._finish)
        try:
            self.check_no_other_ksm_users()
            syscalls.prctl_set_child_subreaper()
            self.changes.set("run", 2)  # start clean: no rmap items, no KSM pages
            self.stepper.prepare()
            # every agent is forked from one pre-started interpreter
            self.zygote = AgentHandle.spawn("__zygote__")
            self.sentinel = self.new_agent("__sentinel__")
            self.sentinel.call("sentinel")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _finish(self) -> None:
        for agent in list(self.agents.values()):
            agent.kill()
        self.agents.clear()
        for name in ("sentinel", "zygote"):
            handle = getattr(self, name)
            if handle is not None:
                handle.kill()
                setattr(self, name, None)
        reap_orphans()
        try:
            if self.changes.changed:
                self.changes.set("run", 2)  # drop our KSM pages before restoring
        finally:
            self.changes.restore()
            self.tunables_after = self.sysfs.tunables()

    def new_agent(self, name: str) -> AgentHandle:
        assert self.zygote is not None, "the session is not entered"
        return AgentHandle.fork_from(self.zygote, name, op="spawn")

    def check_no_other_ksm_users(self, also_mine: Iterable[int] = ()) -> None:
        """``also_mine``: pids this run started itself (a measured workload)."""
        mine = {a.pid for a in self.agents.values()} | set(also_mine)
        mine |= {h.pid for h in (self.sentinel, self.zygote) if h is not None}
        others = self.procfs.mergeable_processes(exclude=mine)
        if others:
            shown = ", ".join(f"pid {pid} ({name})" for pid, name in others[:5])
            raise Busy(f"other processes already have KSM-mergeable memory: {shown}; "
                       "global KSM counters would mix their pages with the scenario's",
                       hint="stop them, or run on a VM kernel (--kernel debian:<version>)")

    # -- scenarios ---------------------------------------------------------------
    def run(self, scenario: m.Scenario) -> Iterator[ObservationPoint]:
        """Run one scenario; yield its baseline, an observation after every step
        and scan, and its teardown point (see :mod:`ksmbench.observation`)."""
        try:
            yield from self._run(scenario)
        except BaseException:
            self.stepper.prepared = False  # re-park ksmd before the next scan
            raise
        finally:
            for agent in list(self.agents.values()):
                agent.kill()
            self.agents.clear()
            reap_orphans()

    def _apply_settings(self, ksm: m.KsmSettings) -> None:
        self.changes.set("run", 2)
        self.changes.set("use_zero_pages", ksm.use_zero_pages)
        self.changes.set("max_page_sharing", ksm.max_page_sharing)
        if self.sysfs.has("smart_scan"):  # 6.7+
            self.changes.set("smart_scan", ksm.smart_scan)
        if self.sysfs.has("merge_across_nodes"):  # CONFIG_NUMA only
            self.changes.set("merge_across_nodes", ksm.merge_across_nodes)

    def check_applicable(self, scenario: m.Scenario) -> None:
        """Refuse scenarios that need an interface this kernel lacks."""
        if any(isinstance(step, m.Prctl) for step in scenario.steps):
            from ..kernel.features import detect

            if not detect(self.sysfs, self.procfs)["prctl_memory_merge"]:
                raise NotApplicable("needs PR_SET_MEMORY_MERGE (Linux 6.4, d7597f59d1d3), "
                                    "which this kernel lacks")
        # vma-ops: write_byte under PROT_NONE/PROT_READ writes through /proc/self/mem
        if (any(isinstance(step, m.WriteByte) for step in scenario.steps)
                and any(isinstance(step, m.Mprotect) and step.prot != "read-write"
                        for step in scenario.steps)):
            if not syscalls.forced_mem_writes():
                raise NotApplicable("needs forced writes through /proc/self/mem to pages "
                                    "mprotect forbids, which this kernel refuses with EIO "
                                    "(e.g. CONFIG_PROC_MEM_FORCE_PTRACE or _NO_FORCE)")

    def _run(self, scenario: m.Scenario) -> Iterator[ObservationPoint]:
        self.check_applicable(scenario)
        self.check_no_other_ksm_users()
        self._apply_settings(scenario.ksm)
        baseline = {name: self.sysfs.read_int(name) for name in GLOBAL_CUMULATIVE}
        scans_at_start = self.stepper.scans_done
        # where this scenario starts: KSM clean (run=2) and no scenario process
        # yet; absolute counters need not be 0 (a leaked ksm_zero_pages stays)
        yield ObservationPoint(BASELINE_STEP, BASELINE, None,
                               {global_metric(n): self.sysfs.read_int(n) for n in GLOBAL_LEVELS})
        self.agents[m.MAIN] = self.new_agent(m.MAIN)
        order = [m.MAIN]  # processes in creation order (for stable output)
        regions: dict[str, dict[str, int]] = {m.MAIN: {}}
        budget = _call_timeout(scenario)

        def observe(step: m.Step, scan: int | None) -> ObservationPoint:
            return observe_at(step.index, step.op, scan)

        def observe_at(index: int, op: str, scan: int | None) -> ObservationPoint:
            values: dict[str, int | None] = {}
            for name in GLOBAL_LEVELS:
                values[global_metric(name)] = self.sysfs.read_int(name)
            for name in GLOBAL_CUMULATIVE:
                if name == "full_scans":
                    # run=2 resets the kernel's full_scans; count our own scans
                    have = self.sysfs.read_int(name)
                    values[global_metric(name)] = (None if have is None else
                                                   self.stepper.scans_done - scans_at_start)
                else:
                    now, base = self.sysfs.read_int(name), baseline[name]
                    values[global_metric(name)] = None if now is None or base is None else now - base
            for proc in order:
                agent = self.agents.get(proc)
                if agent is None or not agent.alive:
                    continue
                seen = agent.call("observe", timeout=budget)
                for field in KSM_STAT_FIELDS:
                    values[proc_metric(proc, field)] = seen["ksm_stat"].get(field)
                values[proc_metric(proc, RSS_ANON)] = seen["rss_anon_pages"]
                values[proc_metric(proc, RSS_ANON_SCENARIO)] = seen["rss_anon_scenario_pages"]
                for region, metrics in seen["regions"].items():
                    for key, value in metrics.items():
                        values[region_metric(proc, region, key)] = value
            return ObservationPoint(index, op, scan, values)

        for step in scenario.steps:
            agent = self.agents.get(step.proc)
            if isinstance(step, m.Scan):
                for n in range(1, step.count + 1):
                    self.stepper.scan(pages_hint=scenario.max_pages,
                                      label=f"{scenario.name} step {step.index}")
                    yield observe(step, n)
                continue
            if isinstance(step, m.UnmergeAll):
                self.stepper.unmerge_all()
            elif isinstance(step, m.Mmap):
                agent.call("mmap", step.region, step.pages, step.thp, timeout=budget)
                regions[step.proc][step.region] = step.pages
            elif isinstance(step, m.Fill):
                agent.call("fill", step.region, step.first, step.end, str(step.pattern),
                           scenario.name, step.index, timeout=budget)
            elif isinstance(step, m.Read):
                agent.call("read", step.region, step.first, step.end, timeout=budget)
            elif isinstance(step, m.Madvise):
                agent.call("madvise", step.region, step.first, step.end, step.advice, timeout=budget)
            elif isinstance(step, m.Prctl):
                agent.call("prctl", step.merge, timeout=budget)
            elif isinstance(step, m.Munmap):
                agent.call("munmap", step.region, timeout=budget)
                del regions[step.proc][step.region]
            elif isinstance(step, m.Fork):
                child = AgentHandle.fork_from(agent, step.child, op="fork", timeout=budget)
                self.agents[step.child] = child
                order.append(step.child)
                regions[step.child] = dict(regions[step.proc])
            elif isinstance(step, m.Exit):
                self._exit_agent(step.proc, budget)
            # --- vma-ops ---
            elif isinstance(step, m.Mprotect):
                agent.call("mprotect", step.region, step.first, step.end, step.prot, timeout=budget)
            elif isinstance(step, m.Mremap):
                agent.call("mremap", step.region, step.pages, step.move, timeout=budget)
                regions[step.proc][step.region] = step.pages
            elif isinstance(step, m.WriteByte):
                agent.call("write_byte", step.region, step.first, step.end, str(step.pattern),
                           timeout=budget)
            # --- end vma-ops ---
            elif isinstance(step, m.Expect):
                pass  # checked by the runner against this step's observation
            yield observe(step, None)
        # teardown: every scenario process exits (creation order), ksmd scans
        # once more (freeing the exited mms' rmap items), globals are read
        for proc in order:
            if proc in self.agents:
                self._exit_agent(proc, budget)
        self.stepper.scan(pages_hint=scenario.max_pages, label=f"{scenario.name} teardown")
        yield observe_at(teardown_step(len(scenario.steps)), TEARDOWN, None)

    def _exit_agent(self, proc: str, budget: float) -> None:
        agent = self.agents[proc]
        agent.call("exit", timeout=budget)
        agent.wait_gone(timeout=budget)  # exit_mmap() has run when it is gone
        agent.close()
        del self.agents[proc]
        reap_orphans()


def _call_timeout(scenario: m.Scenario) -> float:
    # filling 1 GiB takes about a second here; allow for slow guests
    return 60.0 + scenario.max_pages * 20e-6


def check_host_access(sysfs: KsmSysfs) -> None:
    """Refuse early, with a useful message, when the host cannot be used."""
    sysfs.require()
    if os.geteuid() != 0:
        raise PermissionNeeded(
            "running scenarios on the host kernel needs root (KSM tunables, pagemap frame numbers)",
            hint="run as root, or use a VM kernel: --kernel debian:6.12")
    if not os.access(sysfs.root / "run", os.W_OK):
        raise PermissionNeeded(f"{sysfs.root} is not writable (read-only sysfs?)",
                               hint="use a VM kernel: --kernel debian:6.12")


class HostBackend:
    """Runs scenarios on this machine's kernel and yields the event stream."""

    label = "host"

    def __init__(self, label: str = "host"):
        self.label = label
        #: the KSM tunables after the session restored them ({} before that)
        self.tunables_after: dict[str, str] = {}

    def preflight(self) -> None:
        """Fail fast (before locks and run directories) when the host cannot be used."""
        check_host_access(KsmSysfs())

    def events(self, scenarios: Sequence[m.Scenario]) -> Iterator[Event]:
        from ..kernel.features import kernel_release

        session = HostSession()
        try:
            yield from self._events(session, scenarios, kernel_release())
        finally:
            # also when interrupted (Ctrl-C, SIGTERM, the consumer closing the
            # stream): the tunables as restored, for the run's metadata
            self.tunables_after = session.tunables_after

    def _events(self, session: "HostSession", scenarios: Sequence[m.Scenario],
                release: str) -> Iterator[Event]:
        with session:
            info: dict[str, Any] = {"backend": "host", "kernel_release": release,
                                    "ksm_tunables_before": session.tunables_before}
            if session.repair_message:
                info["repaired"] = session.repair_message
            yield BackendInfo(info)
            for scenario in scenarios:
                yield ScenarioStarted(scenario.name, len(scenario.steps), scenario.scan_count)
                started = time.monotonic()
                error = skipped = None
                try:
                    for point in session.run(scenario):
                        yield PointObserved(scenario.name, point)
                except NotApplicable as exc:
                    skipped = exc.one_line()
                except KsmbenchError as exc:
                    error = exc.one_line()
                yield ScenarioFinished(scenario.name, error, time.monotonic() - started, skipped)
        yield BackendInfo({"ksm_tunables_after": session.tunables_after})
