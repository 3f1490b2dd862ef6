"""Running the kernel's KSM selftests on the running kernel, safely.

The selftests were written for a throw-away test machine, and it shows:

* they change KSM tunables and do not all put them back: ksm_functional_tests
  writes run=1 to wait for merging and leaves it so when it exits (its helper
  ``ksm_merge()`` / ``ksm_start()``), and 7.x versions also write
  pages_to_scan and sleep_millisecs;
* they wait for ksmd in busy loops with no time limit (``ksm_merge()`` polls
  full_scans until it grew by 2), so a kernel whose ksmd never completes a
  scan hangs them forever.

So each selftest program runs (a) inside :class:`TunableChanges`: every
tunable this kernel has is recorded (and journaled) before the program
starts, and written back after it ended, however it ended; (b) in its own
process group, under a time limit after which the whole group is SIGKILLed
and reaped.  If ksmbench itself is SIGKILLed, PR_SET_PDEATHSIG ends the
program and the VM backend's guard process (:mod:`ksmbench.backends.vm.guard`)
ends the rest of its group (its forked children), and the next ksmbench run
restores the tunables from the journal.  Output goes straight to a log file (line
buffered through ``stdbuf`` where available), so a killed program keeps what
it printed.

The same code runs on the host (the CLI holds the RunLock) and inside a guest
(``python -m ksmbench.selftests.execute PLAN RESULT``, started by
:func:`ksmbench.backends.vm.run_in_guest`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import KsmbenchError
from ..kernel.policy import HostPolicy
from ..kernel.procfs import ProcFS
from ..waiting import time_scale
from ..kernel.sysfs import KsmSysfs
from ..kernel.syscalls import die_with_parent
from ..kernel.tunables import TunableChanges, repair

#: seconds one selftest program may run (times KSMBENCH_TIME_SCALE: 10 under TCG): 60x
#: what ksm_functional_tests takes on this host (3 s), and more than ksm_tests' own
#: scan limit (KSM_SCAN_LIMIT_SEC_DEFAULT, 120 s), so that its own verdict comes first
DEFAULT_TIMEOUT = 180.0


@dataclass(frozen=True)
class Command:
    """One selftest program invocation."""

    id: str                  #: e.g. "ksm_tests -M -p 10"
    argv: tuple[str, ...]    #: binary first
    cwd: str                 #: the binaries' directory (test_prctl_fork_exec execs ./ksm_functional_tests)
    log: str                 #: where its output goes


@dataclass
class Execution:
    """What happened when one command ran."""

    id: str
    argv: list[str]
    log: str
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    error: str | None = None
    output: str = ""
    tunables_before: dict[str, str] = field(default_factory=dict)
    #: tunables as the program left them (before ksmbench restored them)
    tunables_left: dict[str, str] = field(default_factory=dict)
    tunables_after: dict[str, str] = field(default_factory=dict)

    @property
    def left_changed(self) -> dict[str, tuple[str, str]]:
        """name -> (before, as left) for tunables the program did not put back."""
        return {k: (self.tunables_before.get(k, "?"), v) for k, v in self.tunables_left.items()
                if self.tunables_before.get(k) != v}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Execution":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


ProgressFn = Callable[[str], None]


def preflight(sysfs: KsmSysfs, procfs: ProcFS) -> str | None:
    """Refuse when the selftests cannot run cleanly here; returns a repair message.

    Root and a writable KSM sysfs (the selftests write tunables; their PFN
    checks read as "no duplicates" without CAP_SYS_ADMIN), no tunables left
    changed by a killed ksmbench, and no other KSM user: ksm_tests judges the
    *global* pages_shared/pages_sharing, which another process's pages change.
    """
    policy = HostPolicy(sysfs_root=sysfs.root, proc_root=procfs.root)
    policy.check_access()
    message = repair(sysfs)
    policy.require_ksm_to_ourselves()
    return message


def run_commands(commands: Sequence[Command], *, timeout: float = DEFAULT_TIMEOUT,
                 sysfs: KsmSysfs | None = None, procfs: ProcFS | None = None,
                 progress: ProgressFn | None = None) -> list[Execution]:
    """Run each command in turn (see the module docstring); one Execution each."""
    sysfs = sysfs or KsmSysfs()
    procfs = procfs or ProcFS()
    say = progress or (lambda _msg: None)
    limit = timeout * time_scale()
    done: list[Execution] = []
    for command in commands:
        say(f"running {command.id}")
        done.append(run_one(command, limit, sysfs))
        result = done[-1]
        state = ("timed out" if result.timed_out else result.error or
                 f"exit {result.returncode}")
        say(f"{command.id}: {state} in {result.seconds:.1f} s")
    return done


def run_one(command: Command, limit: float, sysfs: KsmSysfs) -> Execution:
    result = Execution(command.id, list(command.argv), command.log)
    log = Path(command.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with TunableChanges(sysfs) as changes:
        # Record every tunable this kernel has before the program can touch it:
        # set() of the current value journals it and writes nothing.
        result.tunables_before = sysfs.tunables()
        for name, value in result.tunables_before.items():
            changes.set(name, value)
        argv = list(command.argv)
        stdbuf = shutil.which("stdbuf")
        if stdbuf:  # line-buffered stdout: a killed program keeps its output
            argv = [stdbuf, "-oL", "-eL", *argv]
        started = time.monotonic()
        with open(log, "wb") as out, ProgramGroup() as group:
            try:
                proc = group.start(argv, cwd=command.cwd, stdout=out)
            except OSError as exc:
                result.error = f"could not start {command.argv[0]}: {exc.strerror}"
                return result
            try:
                result.returncode = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                result.timed_out = True
                result.error = (f"{command.id} did not finish within {limit:.0f} s (its busy-wait "
                                "for ksmd has no time limit); killed")
        result.seconds = time.monotonic() - started
        result.tunables_left = sysfs.tunables()
    result.tunables_after = sysfs.tunables()
    result.output = log.read_text(errors="replace")
    return result


class ProgramGroup:
    """A process group that is killed whole on the way out, however ksmbench leaves.

    A placeholder (``sleep infinity``) leads the group and the guard watches it
    *before* the selftest starts, so there is no moment in which a SIGKILLed
    ksmbench would leave the selftest's forked children behind.  The selftest
    joins the group (same session, so setpgid is allowed).  On exit the whole
    group is SIGKILLed and waited for.
    """

    def __init__(self):
        self.leader: subprocess.Popen | None = None
        self.members: list[subprocess.Popen] = []
        self._guard = None

    def __enter__(self) -> "ProgramGroup":
        sleep = shutil.which("sleep")
        argv = [sleep, "infinity"] if sleep else [sys.executable, "-c",
                                                  "import time\nwhile True: time.sleep(3600)"]
        self.leader = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       process_group=0, preexec_fn=die_with_parent)
        try:
            from ..backends.vm.guard import start_guard

            self._guard = start_guard(self.leader.pid)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(self, argv: Sequence[str], *, cwd: str | None, stdout, stderr=subprocess.STDOUT,
              preexec_fn=die_with_parent) -> subprocess.Popen:
        """``preexec_fn`` runs in the child before exec; it must call
        die_with_parent itself when it replaces the default."""
        assert self.leader is not None
        proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, process_group=self.leader.pid,
                                preexec_fn=preexec_fn)
        self.members.append(proc)
        return proc

    def __exit__(self, *exc) -> None:
        if self.leader is not None:
            kill_group(self.leader.pid, [self.leader, *self.members])
        if self._guard is not None:
            process, pipe = self._guard
            os.close(pipe)  # the guard kills the (already empty) group and exits
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
            self._guard = None


def kill_group(pgid: int, members: Sequence[subprocess.Popen] = (), timeout: float = 30.0) -> None:
    """SIGKILL process group ``pgid`` and wait until every member is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for member in members:
        try:
            member.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    from ..backends.host import reap_orphans  # we may be their subreaper

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_orphans()
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        # Orphans of the selftest are reparented to init (or a subreaper that
        # is not us).  Once dead they are zombies that still carry the group
        # id, and an init that never reaps (a container's, CI's) keeps them
        # forever: they hold no memory and run nothing, so they do not count.
        if not ProcFS().live_group_members(pgid):
            return
        time.sleep(0.02)
    raise KsmbenchError(f"processes of selftest group {pgid} survived SIGKILL for {timeout:.0f} s")


# -- in a guest -----------------------------------------------------------------------

def write_plan(path: Path, commands: Sequence[Command], timeout: float) -> None:
    path.write_text(json.dumps({"timeout": timeout,
                                "commands": [asdict(c) for c in commands]}, indent=1))


def main(argv: list[str]) -> int:
    """``python -m ksmbench.selftests.execute PLAN RESULT``: run a plan, write results.

    Exit 0 when every command ran (whatever its verdict), 2 when the plan
    could not be carried out; the reason is in RESULT's "error".
    """
    from ..kernel.features import kernel_release
    from ..kernel.tunables import Terminated, signals_as_exceptions

    plan_path, result_path = Path(argv[0]), Path(argv[1])
    plan = json.loads(plan_path.read_text())
    commands = [Command(c["id"], tuple(c["argv"]), c["cwd"], c["log"]) for c in plan["commands"]]
    report: dict = {"kernel_release": kernel_release(), "executions": [], "error": None,
                    "repaired": None}

    def save() -> None:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, result_path)

    sysfs, procfs = KsmSysfs(), ProcFS()
    status = 0
    try:
        with signals_as_exceptions():
            report["repaired"] = preflight(sysfs, procfs)
            for command in commands:
                execution = run_one(command, float(plan["timeout"]) * time_scale(), sysfs)
                report["executions"].append(execution.to_json())
                save()
    except KsmbenchError as exc:
        report["error"] = exc.one_line()
        status = 2
    except (Terminated, KeyboardInterrupt) as exc:
        report["error"] = f"interrupted: {exc}"
        status = 2
    save()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
