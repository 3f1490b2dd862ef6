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

import errno as _errno
import os
import select
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .. import errors
from ..errors import KsmbenchError, NotApplicable, WaitTimeout
from ..kernel import syscalls
from ..kernel.policy import HostPolicy
from ..kernel.procfs import ProcFS
from ..kernel.stepping import ScanStepper
from ..waiting import time_scale
from ..kernel.sysfs import KsmSysfs
from ..kernel.tunables import TunableChanges, repair
from ..metrics import (GLOBAL_CUMULATIVE, GLOBAL_LEVELS, KSM_STAT_FIELDS, PAGES_TO_SCAN,
                       RSS_ANON, RSS_ANON_SCENARIO, SET_ERROR, global_metric, proc_metric,
                       region_metric, tunable_metric)
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

    def run_step(self, step: m.Step, scenario: str, *, timeout: float) -> Any:
        """A scenario step that runs in the agent (``runs_in == "agent"``),
        forwarded as it is: the agent's ``op_<name>`` gets its fields."""
        return self.call("step", step, scenario, timeout=timeout, label=step.op)

    def call(self, op: str, *args: Any, timeout: float = 60.0, label: str | None = None) -> Any:
        """``label``: the op as messages name it (default ``op``)."""
        self.sock.settimeout(timeout * time_scale())
        try:
            send_msg(self.sock, (op, *args))
            if op in ("fork", "spawn"):
                reply, fds = recv_msg_with_fds(self.sock)
            else:
                reply, fds = recv_msg(self.sock), []
        except socket.timeout:
            raise WaitTimeout(f"timed out after {timeout * time_scale():.0f} s waiting for "
                              f"process '{self.name}' (pid {self.pid}) to finish '{label or op}'") from None
        except (EOFError, ConnectionError):
            raise KsmbenchError(f"process '{self.name}' (pid {self.pid}) died during '{label or op}'") from None
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

    Entering: check host access, repair a killed run's tunables, refuse if
    another process uses KSM (both by :mod:`ksmbench.kernel.policy`), take
    ksmd under control, start the sentinel.  Leaving (on success,
    exception, Ctrl-C or SIGTERM): kill every agent, restore every tunable.
    """

    def __init__(self, *, sysfs_root: str = "/sys/kernel/mm/ksm", proc_root: str = "/proc"):
        self.sysfs = KsmSysfs(sysfs_root)
        self.procfs = ProcFS(proc_root)
        self.policy = HostPolicy(sysfs_root=sysfs_root, proc_root=proc_root)
        self.changes = TunableChanges(self.sysfs)
        self.stepper = ScanStepper(self.sysfs, self.procfs, self.changes)
        self.zygote: AgentHandle | None = None
        self.sentinel: AgentHandle | None = None
        self.agents: dict[str, AgentHandle] = {}
        self.repair_message: str | None = None
        #: a swap device this session may turn on for ``swap = true``
        #: scenarios (a guest's zram, named by the VM backend; never the host's)
        from ..kernel.swap import SWAP_DEVICE_ENV, SWAP_UNAVAILABLE_ENV, ZramSwap

        device = os.environ.get(SWAP_DEVICE_ENV)
        self.swap: ZramSwap | None = ZramSwap(device) if device else None
        #: why the guest has no swap device to offer, when it tried and failed
        self.swap_unavailable: str | None = os.environ.get(SWAP_UNAVAILABLE_ENV)
        #: the memory cgroup of a scenario with op "reclaim" (guests only)
        self.cgroup = None
        self._cgroups_made = 0
        self.tunables_before: dict[str, str] = {}
        self.tunables_after: dict[str, str] = {}
        self._stack = ExitStack()

    # -- session ---------------------------------------------------------------
    def __enter__(self) -> "HostSession":
        self.policy.check_access()
        self.repair_message = repair(self.sysfs)
        self.tunables_before = self.sysfs.tunables()
        self._stack.callback(self._finish)
        try:
            self.policy.require_ksm_to_ourselves()
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
            if self.cgroup is not None:
                cgroup, self.cgroup = self.cgroup, None
                cgroup.remove()
            if self.swap is not None:
                self.swap.swapoff()  # the scenario's processes are gone: nothing to read back

    def _apply_settings(self, ksm: m.KsmSettings) -> None:
        self.changes.set("run", 2)
        self.changes.set("use_zero_pages", ksm.use_zero_pages)
        self.changes.set("max_page_sharing", ksm.max_page_sharing)
        if self.sysfs.has("smart_scan"):  # 6.7+
            self.changes.set("smart_scan", ksm.smart_scan)
        if self.sysfs.has("merge_across_nodes"):  # CONFIG_NUMA only
            self.changes.set("merge_across_nodes", ksm.merge_across_nodes)
        prune = ksm.stable_node_chains_prune_millisecs
        self.stepper.hold_prune_clock(prune, m.prune_regime(prune) or "always")
        if ksm.advisor:  # 6.8+ (check_applicable): last, freshly reset
            self.stepper.hold_advisor({name: getattr(ksm, name) for name in m.ADVISOR_KNOBS})
            self.stepper.advisor_check = self._advisor_check(ksm)
        else:
            self.stepper.release_advisor()
            self.stepper.advisor_check = None

    @staticmethod
    def _advisor_check(ksm: m.KsmSettings):
        """After each of the advisor's scans: stop the run where the measured
        scan time and ksmd CPU time allow the kernel another pages_to_scan
        than the model's (its inputs depend on timing there, as the prune
        clock's do), docs/stepping.md "The advisor"."""
        from ..emulator.advisor import Advisor, AdvisorCheck

        check = AdvisorCheck(Advisor(min_pages=ksm.advisor_min_pages_to_scan,
                                     max_pages=ksm.advisor_max_pages_to_scan,
                                     max_cpu=ksm.advisor_max_cpu,
                                     target_scan_time=ksm.advisor_target_scan_time))

        def after_scan(where: str, scan, previous) -> None:
            why = check.after_scan(scan.scan_times(), scan.cpu_ns(previous), scan.pages_to_scan)
            if why is not None:
                raise WaitTimeout(f"{where}: {why}",
                                  hint="the advisor is exact where scans are short and cheap: "
                                       "fewer pages, or advisor_min_pages_to_scan = 1 and a "
                                       "small advisor_max_pages_to_scan")
        return after_scan

    # -- op "set" -------------------------------------------------------
    def _set_tunable(self, step: m.Set) -> dict[str, int | None]:
        """Write the tunable through the undo stack; the observation gets the
        errno the write returned (0: taken) and the value now in force, both
        empty where this kernel lacks the tunable."""
        if not self.sysfs.has(step.tunable):
            return {SET_ERROR: None, tunable_metric(step.tunable): None}
        error = 0
        try:
            self.changes.set(step.tunable, step.value)
        except errors.KernelIOError as exc:
            if exc.errno not in (_errno.EBUSY, _errno.EINVAL):
                raise
            error = exc.errno  # EBUSY: max_page_sharing_store() while KSM pages exist
        now = self.sysfs.read_int(step.tunable)
        return {SET_ERROR: error, tunable_metric(step.tunable): now}

    def _check_swap(self, scenario: m.Scenario) -> None:
        """``swap = true`` needs swap in use during the scenario; without it,
        ``madvise pageout`` is modelled with no swap at all."""
        from ..kernel.swap import active_swaps

        active = active_swaps(str(self.procfs.root))
        if scenario.swap and not active and self.swap is None:
            if self.swap_unavailable:
                raise NotApplicable(f"needs a swap device (swap = true), and this guest could "
                                    f"not make one: {self.swap_unavailable}")
            raise NotApplicable("needs a swap device (swap = true), and this machine has none; "
                                "ksmbench adds swap only to the guests it boots "
                                "(--kernel debian:X.Y gets a zram device)")
        if not scenario.swap and active and any(
                isinstance(s, m.Madvise) and s.advice == "pageout" for s in scenario.steps):
            raise NotApplicable(f"its madvise pageout steps are modelled without swap, and "
                                f"swap is in use here ({', '.join(active)}); set swap = true "
                                "to run it with swap")

    def check_applicable(self, scenario: m.Scenario) -> None:
        """Refuse scenarios that need an interface this kernel lacks."""
        self._check_swap(scenario)
        if m.has_reclaim(scenario.steps):
            from ..kernel.swap import multigen_lru_on

            if self.swap is None:
                raise NotApplicable("op 'reclaim' runs only in a guest ksmbench boots (it puts "
                                    "the scenario's processes in a memory cgroup of their own)")
            if not multigen_lru_on():
                # measured on Debian 6.1 with the classic LRU: pages just
                # written through /proc/self/mem survived memory.reclaim
                raise NotApplicable("op 'reclaim' needs the multi-gen LRU (CONFIG_LRU_GEN), "
                                    "which this kernel lacks: with the classic LRU, "
                                    "memory.reclaim leaves recently used pages behind")
        needed = {step.requires for step in scenario.steps if step.requires is not None}
        if needed:
            from ..kernel.features import detect

            have = detect(self.sysfs, self.procfs)
            for feature, what in sorted(needed):
                if not have[feature]:
                    raise NotApplicable(f"needs {what}, which this kernel lacks")
        bound = sorted({s.node for s in scenario.steps if isinstance(s, m.Mmap) and s.node is not None})
        if bound:
            from ..kernel.features import memory_nodes

            have_nodes = memory_nodes()
            if have_nodes is None:
                raise NotApplicable("binds regions to NUMA nodes (op mmap, node), and this "
                                    "kernel has no NUMA (CONFIG_NUMA)")
            missing = [n for n in bound if n not in have_nodes]
            if missing:
                raise NotApplicable(
                    f"needs NUMA node{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(map(str, missing))} (op mmap, node) and this kernel has memory "
                    f"on node{'s' if len(have_nodes) > 1 else ''} "
                    f"{', '.join(map(str, sorted(have_nodes)))} only: run it in a guest, "
                    f"which gets {scenario.numa_nodes} nodes (--kernel debian:X.Y)")
        if scenario.ksm.advisor and not self.sysfs.has("advisor_mode"):
            raise NotApplicable(f"needs {m.ADVISOR_FEATURE[1]}, which this kernel lacks")
        if any(isinstance(step, m.UffdWp) for step in scenario.steps):
            if not syscalls.uffd_wp_available():
                raise NotApplicable("needs userfaultfd write-protect on anonymous memory "
                                    "(Linux 5.7, CONFIG_USERFAULTFD), which is unavailable here")
        if any(isinstance(step, m.Mmap) and step.thp for step in scenario.steps):
            why = thp_unusable()
            if why:
                raise NotApplicable(why)
        # write_byte under PROT_NONE/PROT_READ writes through /proc/self/mem
        if (any(isinstance(step, m.WriteByte) for step in scenario.steps)
                and any(isinstance(step, m.Mprotect) and step.prot != "read-write"
                        for step in scenario.steps)):
            if not syscalls.forced_mem_writes():
                raise NotApplicable("needs forced writes through /proc/self/mem to pages "
                                    "mprotect forbids, which this kernel refuses with EIO "
                                    "(e.g. CONFIG_PROC_MEM_FORCE_PTRACE or _NO_FORCE)")

    def _run(self, scenario: m.Scenario) -> Iterator[ObservationPoint]:
        self.check_applicable(scenario)
        self.policy.require_ksm_to_ourselves()
        self._apply_settings(scenario.ksm)
        if scenario.swap and self.swap is not None:
            self.swap.swapon()  # off again when the scenario ends (run())
        baseline = {name: self.sysfs.read_int(name) for name in GLOBAL_CUMULATIVE}
        scans_at_start = self.stepper.scans_done
        # where this scenario starts: KSM clean (run=2) and no scenario process
        # yet; absolute counters need not be 0 (a leaked ksm_zero_pages stays)
        yield ObservationPoint(BASELINE_STEP, BASELINE, None,
                               {global_metric(n): self.sysfs.read_int(n) for n in GLOBAL_LEVELS})
        self.agents[m.MAIN] = self.new_agent(m.MAIN)
        if m.has_reclaim(scenario.steps):
            from ..kernel.swap import ReclaimCgroup

            self._cgroups_made += 1
            self.cgroup = ReclaimCgroup.create(f"{os.getpid()}-{self._cgroups_made}")
            self.cgroup.add(self.agents[m.MAIN].pid)  # its forks are born there
        order = [m.MAIN]  # processes in creation order (for stable output)
        budget = _call_timeout(scenario)

        def observe(step: m.Step, scan: int | None) -> ObservationPoint:
            return observe_at(step.index, step.op, scan)

        set_values: dict[str, int | None] = {}

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
            if scenario.ksm.advisor:
                values[tunable_metric(PAGES_TO_SCAN)] = self.sysfs.read_int(PAGES_TO_SCAN)
            return ObservationPoint(index, op, scan, values)

        for step in scenario.steps:
            agent = self.agents.get(step.proc)
            if isinstance(step, m.Scan) and step.pages is not None:
                self.stepper.batch(step.pages, pages_hint=scenario.max_pages,
                                   label=f"{scenario.name} step {step.index}")
                yield observe(step, 1)
                continue
            if isinstance(step, m.Scan):
                for n in range(1, step.count + 1):
                    self.stepper.scan(pages_hint=scenario.max_pages,
                                      label=f"{scenario.name} step {step.index}")
                    yield observe(step, n)
                continue
            if step.runs_in == "agent":
                agent.run_step(step, scenario.name, timeout=budget)
            elif isinstance(step, m.UnmergeAll):
                self.stepper.unmerge_all()
            elif isinstance(step, m.Reclaim):
                self.cgroup.reclaim()
            elif isinstance(step, m.Fork):
                child = AgentHandle.fork_from(agent, step.child, op="fork", timeout=budget)
                self.agents[step.child] = child
                order.append(step.child)
            elif isinstance(step, m.Exit):
                self._exit_agent(step.proc, budget)
            elif isinstance(step, m.Set):
                set_values = self._set_tunable(step)
            elif isinstance(step, m.Exec):  # a new interpreter starts (slow in TCG)
                agent.call("exec", timeout=budget + 120)
            elif step.runs_in == "controller":  # pragma: no cover - a new op without its code here
                raise TypeError(f"the host backend does not run op '{step.op}'")
            point = observe(step, None)
            if isinstance(step, m.Set):
                point.values.update(set_values)
            yield point
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


class HostBackend:
    """Runs scenarios on this machine's kernel and yields the event stream."""

    label = "host"

    def __init__(self, label: str = "host"):
        self.label = label
        #: the KSM tunables after the session restored them ({} before that)
        self.tunables_after: dict[str, str] = {}

    def preflight(self) -> None:
        """Fail fast (before locks and run directories) when the host cannot be used."""
        HostPolicy().check_access()

    def events(self, scenarios: Sequence[m.Scenario], *,
               artifacts_dir: Path | None = None) -> Iterator[Event]:
        """The host keeps no files beside the results (``artifacts_dir`` is unused)."""
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
            from ..kernel.features import memory_nodes

            nodes = memory_nodes()
            info: dict[str, Any] = {"backend": "host", "kernel_release": release,
                                    "ksm_tunables_before": session.tunables_before,
                                    # where op mmap's node can bind (None: no CONFIG_NUMA)
                                    "numa_memory_nodes": None if nodes is None else sorted(nodes)}
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


#: where the kernel shows its transparent huge page settings
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage")


def thp_unusable(root: Path = THP_SYSFS) -> str | None:
    """Why a scenario with a THP region cannot be run here, or None.

    No THP (CONFIG_TRANSPARENT_HUGEPAGE off, or ``enabled`` = never) gives no
    huge page to split.  And since 6.12 (dafff3f4c850) the deferred split
    shrinker splits a huge page with more zero-filled subpages than
    ``khugepaged/max_ptes_none`` when memory runs short (thp_underused(),
    which is always false at the default 511): with a lower value a split
    would depend on memory pressure, which no model can predict.
    """
    try:
        enabled = (root / "enabled").read_text()
    except OSError:
        return "needs transparent huge pages (CONFIG_TRANSPARENT_HUGEPAGE), which this kernel lacks"
    if "[never]" in enabled:
        return "needs transparent huge pages, which are off here (transparent_hugepage/enabled: never)"
    try:
        shrink = (root / "shrink_underused").read_text().strip()
        max_none = int((root / "khugepaged" / "max_ptes_none").read_text())
    except (OSError, ValueError):
        return None  # before 6.12: no underused-THP shrinker
    if shrink == "1" and max_none != 511:
        return (f"khugepaged/max_ptes_none is {max_none}, not 511: the THP shrinker may split "
                "huge pages with zero-filled subpages when memory runs short")
    return None
