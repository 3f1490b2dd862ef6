"""Booting a kernel with virtme-ng and running one command in it, in bounded time.

:class:`GuestRun` starts ``vng`` (which starts QEMU) and lets the caller poll
it while it runs (the VM backend tails the event file meanwhile);
:func:`.command.run_in_guest` is the blocking form other tools use
(benchmarks and the kernel selftests in guests).

The guest sees the host's filesystem read-only (virtme-ng's copy-on-write
view: writes to /etc, /usr, /tmp... stay in the guest) and one writable
directory shared with the host, where the command's results come back.

Bounded time: the guest must reach user space within ``boot_timeout``
seconds, and the command must end within ``timeout`` seconds after that; a
kernel panic ends the run at once (virtme-ng boots with ``panic=-1`` and QEMU
with ``-no-reboot``: a panic powers the VM off).  Every way out (return,
exception, Ctrl-C, SIGTERM turned into an exception) kills the VM's whole
process group; a SIGKILLed ksmbench is covered by :mod:`.guard`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ...errors import VMError, os_boundary
from ...sources.packaged import packaged_file
from .kernels import BootableKernel

#: seconds a guest may take to reach user space (TCG: a Debian kernel takes
#: 10-20 s here with the trimmed module tree)
BOOT_TIMEOUT = {"kvm": 60.0, "tcg": 240.0}
#: KSMBENCH_TIME_SCALE in TCG guests: every timeout of the host backend
#: (agent calls, scan waits) is multiplied by this (TCG runs code ~10x slower)
TCG_TIME_SCALE = 10

#: console lines that mark boot progress (virtme-ng-init's own messages)
_PHASES = (
    ("Linux version", "kernel started"),
    ("Run /init as init process", "initramfs"),
    ("virtme initramfs: mounting hostfs", "mounting the host filesystem"),
    ("virtme-ng-init: basic initialization done", "guest init"),
    ("virtme-ng-init: triggering udev coldplug", "udev"),
    ("virtme-ng-init: starting script", "command starting"),
)
#: console lines after which the guest cannot go on: a kernel panic, and QEMU's
#: own fatal KVM errors (seen here with nested KVM: "KVM internal error.
#: Suberror: 1", and "failed to set MSR 0x10a" with -cpu host)
_FATAL = re.compile(r"Kernel panic - not syncing:.*|KVM internal error.*|.*failed to set MSR.*")
#: boots tried before a guest that dies before user space is an error.  Under
#: TCG a Debian kernel has been seen (once in several hundred CI boots) to oops
#: 1.8 s into its boot, "int3" in sched_clock_cpu() while it patches its own
#: text: a race of QEMU's translated code with the kernel's text_poke, before
#: any command ran.  The second boot of the same image went through.  A kernel
#: that fails every time still fails, after two bounded boots.
BOOT_ATTEMPTS = 2


@dataclass
class GuestResult:
    returncode: int
    stdout: str
    stderr: str
    accelerator: str
    kernel_release: str | None
    seconds: float
    #: facts the guest reported (cpu_model: "QEMU TCG CPU ..." under TCG)
    facts: dict = field(default_factory=dict)
    console_log: Path | None = None


def vng_binary() -> str:
    """vng from this Python's environment (virtme-ng comes from PyPI with ksmbench)."""
    here = Path(sys.executable).parent / "vng"
    if here.exists():
        return str(here)
    found = shutil.which("vng")
    if not found:
        raise VMError("virtme-ng (vng) is not installed",
                      hint="pip install virtme-ng (it is a ksmbench dependency)")
    return found


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        raise VMError("qemu-system-x86_64 is not installed",
                      hint="run vm/install-host-deps (Debian package qemu-system-x86)") from None
    m = re.search(r"version (\S+)", out)
    return m[1] if m else out.strip().splitlines()[0] if out.strip() else "unknown"


#: runs in the guest: the command virtme-ng executes (see the script's header)
LAUNCHER = packaged_file(__package__, "launcher.sh")

_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9_./+-]+$")


def python_dirs() -> list[str]:
    """Host directories every ksmbench process in the guest imports from.

    The guest's root is a 9p mount without caching (virtme-ng's choice): every
    stat() and open() is a round trip to QEMU, and Python's imports do
    thousands of them.  Under TCG one took 2 ms idle and 50 ms on a loaded
    host here; starting an agent process cost 10-60 s.  These directories are
    therefore exported a second time and mounted with ``cache=loose`` over the
    same paths in the guest (they do not change during a run).
    """
    import sysconfig

    import ksmbench

    # the interpreter's own tree (binary, libpython, stdlib) when it is not /usr
    # (virtme-ng overlays /usr in the guest), else just the stdlib
    base = Path(sys.base_prefix)
    interpreter = base if str(base.resolve()) not in ("/usr", "/") else Path(sysconfig.get_path("stdlib"))
    candidates = [interpreter, Path(sys.prefix), Path(ksmbench.__file__).resolve().parent]
    out: list[str] = []
    for path in candidates:
        path = path.resolve()
        text = str(path)
        if not path.is_dir() or not _PLAIN_PATH.match(text) or text == "/":
            continue
        if any(text == o or text.startswith(o + "/") for o in out):
            continue
        out = [o for o in out if not o.startswith(text + "/")] + [text]
    return out


def _check_host_tools() -> None:
    missing = [tool for tool in ("qemu-system-x86_64", "busybox", "depmod")
               if shutil.which(tool) is None and not Path("/sbin", tool).exists()]
    if missing:
        raise VMError(f"missing host tools for booting kernels: {', '.join(missing)}",
                      hint="run vm/install-host-deps (as root)")


def _mebibytes(size: str) -> int:
    """QEMU's and virtme-ng's memory size (``2G``, ``1536M``, ``1536``: MiB) in MiB."""
    m = re.fullmatch(r"(\d+)([MmGg]?)", size.strip())
    if not m:
        raise VMError(f"guest memory {size!r}: give MiB or GiB, like 2G or 1536M")
    return int(m[1]) * (1024 if m[2] in ("G", "g") else 1)


def numa_qemu_opts(memory: str, cpus: int, nodes: int) -> list[str]:
    """QEMU options for a guest with ``nodes`` NUMA nodes (none for 1): the
    memory split evenly over one RAM backend per node (merge=off, as for the
    whole guest above), and every vCPU on node 0.  With no CPU on the other
    nodes, the default (local) policy allocates on node 0, so a region a
    scenario does not bind stays on node 0 as the emulator assumes; a bound
    region goes where mbind() puts it."""
    if nodes <= 1:
        return []
    total = _mebibytes(memory)
    if total % nodes or total // nodes < 256:
        raise VMError(f"guest memory {memory} does not split into {nodes} NUMA nodes of "
                      "equal whole MiB, at least 256 MiB each",
                      hint=f"give --memory a multiple of {nodes * 256}M")
    opts: list[str] = []
    for node in range(nodes):
        opts += ["-object", f"memory-backend-ram,id=ksmnuma{node},size={total // nodes}M,"
                            "merge=off",
                 "-numa", f"node,nodeid={node},memdev=ksmnuma{node}"
                          + (f",cpus=0-{cpus - 1}" if node == 0 else "")]
    return opts


class GuestRun:
    """One VM running one command; use as a context manager (the VM dies on exit)."""

    def __init__(self, kernel: BootableKernel, argv: Sequence[str], *, shared_dir: Path,
                 accelerator: str, memory: str = "2G", cpus: int = 2,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 console_log: Path | None = None, append: Sequence[str] = (),
                 boot_timeout: float | None = None, timeout: float = 600.0,
                 cached_dirs: Sequence[str] | None = None, numa_nodes: int = 1,
                 boot_attempts: int = BOOT_ATTEMPTS):
        if accelerator not in ("kvm", "tcg"):
            raise ValueError(f"accelerator must be kvm or tcg, not {accelerator!r}")
        self.kernel = kernel
        self.argv = [str(a) for a in argv]
        self.shared_dir = Path(shared_dir).resolve()
        self.accelerator = accelerator
        self.memory = memory
        self.cpus = cpus
        self.numa_nodes = numa_nodes
        #: checked here, before any VM starts: the size must split over the nodes
        self._numa_opts = numa_qemu_opts(memory, cpus, numa_nodes)
        self.env = dict(env or {})
        self.cwd = cwd
        self.append = list(append)
        self.boot_timeout = boot_timeout if boot_timeout is not None else BOOT_TIMEOUT[accelerator]
        self.timeout = timeout
        self.work = self.shared_dir / ".ksmbench-guest"
        # a cached mount over the shared directory would hide it: skip such dirs
        shared = str(self.shared_dir)
        self.cached_dirs = [d for d in (python_dirs() if cached_dirs is None else cached_dirs)
                            if not (shared == d or shared.startswith(d + "/"))]
        self.console_log = Path(console_log) if console_log else self.work / "console.log"
        self.proc: subprocess.Popen | None = None
        self._guard: subprocess.Popen | None = None
        self._guard_pipe: int | None = None
        self._console_fh = None
        self.started_at = 0.0
        self.user_space_at: float | None = None
        self.phase = "starting QEMU"
        self._last_line = ""
        self._pump: threading.Thread | None = None
        self.panic: str | None = None
        self.boot_attempts = max(1, boot_attempts)
        #: why each earlier boot of this run died before user space; its console
        #: log is kept beside the current one (console.boot1.log, ...)
        self.boot_failures: list[str] = []

    # -- start -------------------------------------------------------------------
    def vng_argv(self) -> list[str]:
        command = shlex.join(["/bin/bash", str(LAUNCHER), str(self.work)])
        argv = [vng_binary(), "--run", str(self.kernel.boot_image),
                "--memory", self.memory, "--cpus", str(self.cpus),
                # 9p for the root filesystem: the generic Debian kernels have it; the
                # virtiofsd fallback only costs time (none on bookworm)
                "--force-9p",
                # a kernel with everything built in (vm/build-kernel) still needs
                # virtme-ng's initramfs to mount the 9p root (docs/vm-boot.md)
                "--force-initramfs",
                # the kernel console goes to vng's stderr: the console log
                "--verbose",
                "--rwdir", str(self.shared_dir),
                "--cwd", "/"]
        if self.accelerator == "tcg":
            argv.append("--disable-kvm")
        else:
            # q35 rather than microvm: the extra 9p exports below are PCI devices
            argv.append("--disable-microvm")
        if os.geteuid() != 0:
            argv += ["--user", "root"]
        append = list(self.append)
        if self.numa_nodes > 1:
            # automatic NUMA balancing would unmap PTEs (PROT_NONE hinting faults)
            # and migrate pages of unbound regions at times the kernel picks
            append.append("numa_balancing=disable")
        for arg in append:
            argv += ["--append", arg]
        # QEMU marks guest RAM MADV_MERGEABLE by default (mem-merge=on): the host's
        # ksmd would then scan it, and host runs refuse while a guest runs ("other
        # processes already have KSM-mergeable memory").  QEMU merges repeated
        # -machine options, so this adds to virtme-ng's own -machine.
        opts: list[str] = ["-machine", "mem-merge=off", *self._numa_opts]
        for i, path in enumerate(self.cached_dirs):
            opts += ["-fsdev", f"local,id=ksmfs{i},path={path},security_model=none,readonly=on,"
                               "multidevs=remap",
                     "-device", f"virtio-9p-pci,fsdev=ksmfs{i},mount_tag=ksmbench{i}"]
        # vng pastes these into a shell command line: only plain paths get here
        argv.append("--qemu-opts=" + " ".join(opts))
        argv += ["--exec", command]
        return argv

    def start(self) -> "GuestRun":
        _check_host_tools()
        with os_boundary(f"preparing the shared directory {self.shared_dir}"):
            self.work.mkdir(parents=True, exist_ok=True)
            for name in ("started", "facts.json", "stdout", "stderr", "exit", "launcher.log"):
                (self.work / name).unlink(missing_ok=True)
            env = dict(self.env)
            if self.accelerator == "tcg":
                env.setdefault("KSMBENCH_TIME_SCALE",
                               os.environ.get("KSMBENCH_TIME_SCALE", str(TCG_TIME_SCALE)))
            # what the launcher runs, NUL-separated: never a shell string
            (self.work / "argv.nul").write_bytes(b"".join(a.encode() + b"\0" for a in self.argv))
            (self.work / "env.nul").write_bytes(
                b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
            (self.work / "cwd").write_text(self.cwd or "/")
            (self.work / "mounts.tsv").write_text(
                "".join(f"ksmbench{i}\t{d}\n" for i, d in enumerate(self.cached_dirs)))
            self.console_log.parent.mkdir(parents=True, exist_ok=True)
            self._console_fh = open(self.console_log, "wb")
        host_env = dict(os.environ)
        # vng runs virtme-run, which must come from the same environment
        host_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{host_env.get('PATH', '')}"
        self.started_at = time.monotonic()
        # vng's stderr carries the kernel console (and QEMU's own messages).  It
        # must be a pipe, not a file: QEMU reopens /proc/self/fd/2 for the console
        # with O_TRUNC and its own offset, which would clobber a plain file.
        try:
            self.proc = subprocess.Popen(self.vng_argv(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         env=host_env, start_new_session=True)
        except OSError as exc:
            self._close_files()
            raise VMError(f"starting vng failed: {exc}") from None
        self._start_guard(self.proc.pid)
        self._pump = threading.Thread(target=self._pump_console, name="vm-console", daemon=True)
        self._pump.start()
        return self

    def _pump_console(self) -> None:
        """Copy the console to the log file as it comes; note boot phases and fatal lines."""
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        tail = ""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            fh = self._console_fh
            if fh is not None:
                try:
                    fh.write(chunk)
                    fh.flush()
                except (OSError, ValueError):
                    pass
            lines = (tail + chunk.decode("utf-8", "replace")).split("\n")
            tail = lines.pop()
            for line in lines:
                self._note_line(line)
        if tail:
            self._note_line(tail)

    def _note_line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        self._last_line = line
        for marker, phase in _PHASES:
            if marker in line:
                self.phase = phase
        m = _FATAL.search(line)
        if m and self.panic is None:
            self.panic = m[0].strip()

    def _start_guard(self, pgid: int) -> None:
        from .guard import start_guard

        self._guard, self._guard_pipe = start_guard(pgid)

    # -- while running ---------------------------------------------------------------
    def last_console_line(self) -> str:
        return self._last_line[:200]

    def in_user_space(self) -> bool:
        if self.user_space_at is None and (self.work / "started").exists():
            self.user_space_at = time.monotonic()
            self.phase = "running"
        return self.user_space_at is not None

    def poll(self) -> int | None:
        """vng's exit status once it ended, else None; raises VMError (and kills) on
        a panic, a boot that takes too long, or a command that overruns.  A boot
        that dies before user space is tried again, up to ``boot_attempts`` boots."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None and self._pump is not None:
            self._pump.join(timeout=10)  # the console's last lines (a panic message)
        now = time.monotonic()
        failure: str | None = None
        if self.panic is not None:
            failure = f"the guest stopped: {self.panic}"
        elif code is not None:
            if self.in_user_space() or (self.work / "exit").exists():
                return code
            failure = (f"the guest stopped before reaching user space (vng exit {code}; "
                       f"last console line: {self.last_console_line() or 'none'})")
        elif not self.in_user_space():
            if now - self.started_at > self.boot_timeout:
                failure = (f"the guest did not boot within {self.boot_timeout:.0f} s "
                           f"(stuck at: {self.phase}; last console line: "
                           f"{self.last_console_line() or 'none'})")
        elif now - self.user_space_at > self.timeout:
            self.kill()
            raise VMError(f"the command in the guest did not finish within {self.timeout:.0f} s",
                          hint=f"console log: {self.console_log}")
        if failure is None:
            return None
        self.kill()
        if not self.in_user_space() and len(self.boot_failures) + 1 < self.boot_attempts:
            self._boot_again(failure)
            return None
        earlier = (f"; {len(self.boot_failures)} earlier boot(s) failed too"
                   if self.boot_failures else "")
        raise VMError(failure + earlier, hint=f"console log: {self.console_log}")

    def _boot_again(self, failure: str) -> None:
        """Keep the failed boot's console log and start the same VM afresh."""
        self.boot_failures.append(failure)
        kept = self.console_log.with_name(
            f"{self.console_log.stem}.boot{len(self.boot_failures)}{self.console_log.suffix}")
        with os_boundary(f"keeping the failed boot's console log {kept}"):
            if self.console_log.exists():
                self.console_log.replace(kept)
        self.proc = None
        self._pump = None
        self.panic = None
        self.phase = "starting QEMU"
        self._last_line = ""
        self.user_space_at = None
        self.start()

    def wait(self, poll_interval: float = 0.1) -> GuestResult:
        while self.poll() is None:
            time.sleep(poll_interval)
        return self.result()

    def facts(self) -> dict:
        try:
            return json.loads((self.work / "facts.json").read_text())
        except (OSError, ValueError):
            return {}

    def result(self) -> GuestResult:
        assert self.proc is not None
        vng_code = self.proc.wait(timeout=30)
        if self._pump is not None:
            self._pump.join(timeout=10)
        self._close_files()
        exit_file = self.work / "exit"
        if exit_file.exists():
            returncode = int(exit_file.read_text().strip() or 255)
        elif not self.in_user_space():
            last = self.last_console_line()
            if self.panic:
                raise VMError(f"the guest stopped: {self.panic}",
                              hint=f"console log: {self.console_log}")
            raise VMError(f"the guest stopped before reaching user space (vng exit {vng_code}; "
                          f"last console line: {last or 'none'})",
                          hint=f"console log: {self.console_log}")
        else:
            raise VMError(f"the guest stopped while the command ran (vng exit {vng_code}; "
                          f"last console line: {self.last_console_line() or 'none'})",
                          hint=f"console log: {self.console_log}")
        facts = self.facts()
        return GuestResult(
            returncode=returncode,
            stdout=_read_text(self.work / "stdout"),
            stderr=_read_text(self.work / "stderr"),
            accelerator=observed_accelerator(self.accelerator, facts),
            kernel_release=facts.get("kernel_release"),
            seconds=time.monotonic() - self.started_at,
            facts=facts,
            console_log=self.console_log,
        )

    # -- ending --------------------------------------------------------------------
    def kill(self) -> None:
        """Kill the VM's whole process group (vng, virtme-run, QEMU) and wait for it."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if self._pump is not None:
                self._pump.join(timeout=10)
        self._stop_guard()
        self._close_files()

    def _stop_guard(self) -> None:
        if self._guard_pipe is not None:
            os.close(self._guard_pipe)  # the guard kills the (already dead) group and exits
            self._guard_pipe = None
        if self._guard is not None:
            try:
                self._guard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._guard.kill()
            self._guard = None

    def _close_files(self) -> None:
        fh, self._console_fh = self._console_fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        if self.proc is not None and self.proc.stderr is not None:
            try:
                self.proc.stderr.close()
            except OSError:
                pass

    def __enter__(self) -> "GuestRun":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def observed_accelerator(requested: str, facts: Mapping) -> str:
    """The accelerator the guest really ran under: QEMU's TCG CPU names itself."""
    model = str(facts.get("cpu_model", ""))
    if "TCG" in model:
        return "tcg"
    if requested == "kvm" and model and model != "unknown":
        return "kvm"
    return requested


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
