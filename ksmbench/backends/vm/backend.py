"""The VM backend: all scenarios of a run on one kernel booted in QEMU.

One boot per kernel: the guest runs the host backend
(:class:`~ksmbench.backends.host.HostBackend`) on every scenario and writes
its events as JSON lines into the shared directory
(:mod:`.guest_events`); this side tails that file while the VM runs and
yields each event as it appears, so the Runner writes observations as they
are produced.

Shared directory: ``artifacts_dir`` when the caller gives one (the run
directory's ``<kernel>/``: the guest console log and the raw event stream are
kept there), else a fresh directory under ``$KSMBENCH_CACHE/vm-runs``.
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from ... import errors
from ...errors import KsmUnavailable, VMError
from ...observation import BackendInfo, Event, event_from_json
from ...scenario import model as m
from . import kernels as _kernels
from .boot import GuestRun, qemu_version

#: a guest that yields no event for this long (times the TCG time scale for
#: the host backend's own timeouts to fire first) is considered hung
IDLE_SECONDS = 120.0

#: the most NUMA nodes a guest is booted with (boot.numa_qemu_opts splits its memory evenly)
MAX_GUEST_NODES = 8

#: the guest's host-backend facts worth passing through (its "backend" is "host")
_GUEST_INFO_KEYS = ("kernel_release", "ksm_tunables_before", "ksm_tunables_after", "repaired",
                    "numa_memory_nodes")


class VMBackend:
    """``--kernel debian:X.Y`` or ``--kernel PATH``: scenarios in a guest kernel."""

    def __init__(self, spec: str, *, memory: str = "2G", cpus: int = 2, accel: str = "auto",
                 modules: str | None = None, append: Sequence[str] = (),
                 boot_timeout: float | None = None, numa_nodes: int | None = None):
        _kernels.check_spec(spec, modules)
        if numa_nodes is not None and not 1 <= numa_nodes <= MAX_GUEST_NODES:
            raise errors.UsageError(f"--numa-nodes {numa_nodes}: a guest can have 1 to "
                                    f"{MAX_GUEST_NODES} NUMA nodes")
        #: None: as many as the run's scenarios bind regions to (Scenario.numa_nodes)
        self.numa_nodes = numa_nodes
        self.spec = spec
        self.label = _kernels.label_for(spec)
        self.memory = memory
        self.cpus = cpus
        self.accel = accel
        self.modules = modules
        self.append = tuple(append)
        self.boot_timeout = boot_timeout
        #: a guest's tunables are restored in the guest and come in its BackendInfo
        self.tunables_after: dict[str, str] = {}

    def preflight(self) -> None:
        """Fail fast (before locks, run directories and progress bars) when
        the kernel cannot be had: an unknown Debian series, a missing image.
        The package lists are read once per process (check_spec)."""
        _kernels.check_spec(self.spec, self.modules)

    def _shared_dir(self, artifacts_dir: Path | None) -> Path:
        if artifacts_dir is not None:
            path = Path(artifacts_dir).resolve()
            path.mkdir(parents=True, exist_ok=True)
            return path
        from ...sources.cache import cache_root

        base = cache_root() / "vm-runs"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_kernels.safe_name(self.label) + "-", dir=base))

    def events(self, scenarios: Sequence[m.Scenario], *,
               artifacts_dir: Path | None = None) -> Iterator[Event]:
        """``artifacts_dir``: the shared directory (console log, raw event stream) is kept there."""
        from .accel import choose_accelerator

        yield BackendInfo({"status": f"preparing {self.label}"})
        kernel = _kernels.resolve(self.spec, modules=self.modules)
        nodes = guest_numa_nodes(self.numa_nodes, scenarios)
        info: dict[str, Any] = {"backend": "vm", "kernel": self.label,
                                "kernel_image": str(kernel.image), "qemu_version": qemu_version(),
                                "memory": self.memory, "cpus": self.cpus, "numa_nodes": nodes}
        if kernel.package:
            info["kernel_package"] = kernel.package
        yield BackendInfo({"status": "choosing the accelerator (KVM probe if not cached)"})
        decision = choose_accelerator(self.accel, kernel, memory=self.memory)
        info["accelerator"] = decision.accelerator
        info["accelerator_reason"] = decision.reason
        yield BackendInfo(dict(info))

        shared = self._shared_dir(artifacts_dir)
        events_file = shared / "events.jsonl"
        error_file = shared / "guest-error.json"
        scenarios_file = shared / "scenarios.pickle"
        for path in (events_file, error_file):
            path.unlink(missing_ok=True)
        events_file.touch()
        scenarios_file.write_bytes(pickle.dumps(list(scenarios)))
        argv = [sys.executable, "-m", "ksmbench.backends.vm.guest_events", str(scenarios_file),
                str(events_file), str(error_file), self.label]
        # the host backend's timeouts come first; ours only catches a dead guest
        run = GuestRun(kernel, argv, shared_dir=shared, accelerator=decision.accelerator,
                       memory=self.memory, cpus=self.cpus, console_log=shared / "console.log",
                       append=self.append, boot_timeout=self.boot_timeout, numa_nodes=nodes,
                       timeout=_run_budget(scenarios, decision.accelerator))
        idle_limit = IDLE_SECONDS * (10 if decision.accelerator == "tcg" else 1)
        with run:
            last_phase = None
            pending = ""
            position = 0
            last_event_at = None
            facts_sent = False
            failures_told = 0
            while True:
                code = run.poll()
                if len(run.boot_failures) > failures_told:
                    failures_told = len(run.boot_failures)
                    last_phase = None
                    yield BackendInfo({"status": f"{self.label}: boot {failures_told} died before "
                                                 f"user space, booting again: "
                                                 f"{run.boot_failures[-1][:120]}",
                                       "boot_failures": list(run.boot_failures)})
                if not run.in_user_space() and run.phase != last_phase:
                    last_phase = run.phase
                    yield BackendInfo({"status": f"booting {self.label} ({decision.accelerator}): "
                                                 f"{run.phase}"})
                if run.in_user_space() and not facts_sent:
                    facts = run.facts()
                    if facts:
                        facts_sent = True
                        if facts.get("ksm_sysfs") is False:
                            run.kill()
                            raise KsmUnavailable(
                                f"the guest kernel {facts.get('kernel_release')} has no KSM "
                                "(/sys/kernel/mm/ksm is missing)",
                                hint="build it with CONFIG_KSM=y (vm/build-kernel does); "
                                     f"console log: {run.console_log}")
                        from .boot import observed_accelerator

                        booted = {
                            "accelerator": observed_accelerator(decision.accelerator, facts),
                            "guest_cpu_model": facts.get("cpu_model"),
                            "kernel_release": facts.get("kernel_release"),
                            "boot_seconds": round(run.user_space_at - run.started_at, 1),
                        }
                        yield BackendInfo(booted)
                        yield BackendInfo({"status": f"{self.label}: guest up after "
                                                     f"{booted['boot_seconds']} s"})
                        last_event_at = time.monotonic()
                # new complete lines of the event stream
                with open(events_file, "rb") as f:
                    f.seek(position)
                    chunk = f.read()
                if chunk:
                    position += len(chunk)
                    text = pending + chunk.decode("utf-8", "replace")
                    lines = text.split("\n")
                    pending = lines.pop()
                    for line in lines:
                        if line.strip():
                            last_event_at = time.monotonic()
                            yield _translate(event_from_json(line))
                if code is not None:
                    break
                if last_event_at is not None and time.monotonic() - last_event_at > idle_limit:
                    run.kill()
                    raise VMError(f"the guest produced no observation for "
                                  f"{idle_limit:.0f} s", hint=f"console log: {run.console_log}")
                time.sleep(0.05 if chunk else 0.1)
            result = run.result()
        if error_file.exists():
            data = json.loads(error_file.read_text())
            raise errors.rebuild(data.get("kind", "KsmbenchError"),
                                 f"in the guest: {data.get('message')}", data.get("hint"))
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise VMError(f"the scenario runner in the guest failed "
                          f"(exit {result.returncode}): {tail[0][:200]}",
                          hint=f"guest stderr: {run.work / 'stderr'}")
        yield BackendInfo({"vm_seconds": round(result.seconds, 1)})


def guest_numa_nodes(requested: int | None, scenarios: Sequence[m.Scenario]) -> int:
    """The NUMA nodes to boot with: ``requested`` (--numa-nodes), else as many
    as the scenarios bind regions to (op mmap, node); 1 boots without -numa.
    A scenario that needs more nodes than requested reads n/a in the guest."""
    nodes = requested or max((s.numa_nodes for s in scenarios), default=1)
    if nodes > MAX_GUEST_NODES:
        raise errors.UsageError(f"a scenario binds a region to NUMA node {nodes - 1}; guests "
                                f"have at most {MAX_GUEST_NODES} nodes")
    return nodes


def _translate(event: Event) -> Event:
    """The guest's host-backend facts become VM facts (kernel release, tunables)."""
    if isinstance(event, BackendInfo):
        return BackendInfo({k: v for k, v in event.info.items() if k in _GUEST_INFO_KEYS})
    return event


def _run_budget(scenarios: Sequence[m.Scenario], accelerator: str) -> float:
    """An upper bound for the whole guest run: generous, only a dead guest hits it."""
    scale = 10 if accelerator == "tcg" else 1
    per_point = 30.0 * scale
    points = sum(len(s.steps) + s.scan_count + 2 for s in scenarios)  # + baseline, teardown
    return 300.0 * scale + per_point * points
