"""What the benchmarks read besides KSM counters: ksmd's CPU time, /proc/meminfo,
and per-process memory as psutil reports it (RSS, USS, PSS).

Readers take an injectable /proc root (as :class:`~ksmbench.kernel.procfs.ProcFS`
does) so that they can be tested against fake files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KernelIOError, KsmUnavailable, os_boundary
from ..kernel.procfs import DEFAULT_ROOT, KPF_KSM, FrameReader, ProcFS

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTime:
    """A thread's CPU time at one instant, two ways.

    ``stat_seconds`` is utime+stime from /proc/<pid>/stat (clock ticks, so a
    10 ms resolution with CLK_TCK=100); ``runtime_ns`` is the first field of
    /proc/<pid>/schedstat, the scheduler's sum_exec_runtime in nanoseconds
    (None without CONFIG_SCHED_INFO).  Differences of the latter are what
    short scans need; the former is what ``top`` and ``ps`` show.
    """

    stat_seconds: float
    runtime_ns: int | None

    def __sub__(self, other: "CpuTime") -> "CpuTime":
        runtime = (None if self.runtime_ns is None or other.runtime_ns is None
                   else self.runtime_ns - other.runtime_ns)
        return CpuTime(self.stat_seconds - other.stat_seconds, runtime)

    @property
    def seconds(self) -> float:
        """Best available CPU time: schedstat when present, else stat ticks."""
        return self.runtime_ns / 1e9 if self.runtime_ns is not None else self.stat_seconds


def parse_stat_cpu(text: str) -> float:
    """utime+stime in seconds from a /proc/<pid>/stat line.

    Fields are counted after the closing parenthesis of ``comm`` (which may
    itself contain spaces): utime and stime are fields 14 and 15 of proc(5).
    """
    rest = text[text.rindex(")") + 2:].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / CLOCK_TICKS


class ThreadCpu:
    """CPU time of one thread (ksmd), read from /proc."""

    def __init__(self, pid: int, procfs: ProcFS | None = None):
        self.pid = pid
        self.procfs = procfs or ProcFS()

    def sample(self) -> CpuTime:
        stat_path = self.procfs.path(self.pid, "stat")
        with os_boundary(f"reading {stat_path}"):
            stat = stat_path.read_text()
        runtime = live_runtime_ns(self.pid) if self.procfs.root == Path(DEFAULT_ROOT) else None
        if runtime is None:
            runtime = self.procfs.sched_runtime(self.pid)  # None without CONFIG_SCHED_INFO
        return CpuTime(parse_stat_cpu(stat), runtime)


def live_runtime_ns(pid: int) -> int | None:
    """The CPU clock of process ``pid`` (clock_getcpuclockid(3)), in ns.

    /proc/<pid>/schedstat prints se.sum_exec_runtime as last accounted, which
    for a thread on a CPU lags by up to a tick: a merge of a few MiB that ksmd
    does without sleeping (sleep_millisecs=0) can read as 0 ns.  The process
    CPU clock goes through task_sched_runtime(), which adds the running
    slice.  Its id is the kernel's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    (include/linux/posix-timers_types.h), the value glibc's
    clock_getcpuclockid() returns; ksmd leads its own thread group, so the
    process clock is its own.
    """
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except (OSError, OverflowError):
        return None  # gone, or a kernel that refuses other processes' clocks


def ksmd_cpu(procfs: ProcFS | None = None, pid: int | None = None) -> ThreadCpu:
    procfs = procfs or ProcFS()
    pid = pid or procfs.find_kthread("ksmd")
    if pid is None:
        raise KsmUnavailable("no ksmd kernel thread found in /proc",
                             hint="this kernel has no KSM (CONFIG_KSM=n)")
    return ThreadCpu(pid, procfs)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {field: kB} (HugePages_* counts are kept as counts)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            try:
                out[name.strip()] = int(parts[0])
            except ValueError:
                continue
    return out


def read_meminfo(root: str | os.PathLike = "/proc") -> dict[str, int]:
    path = Path(root) / "meminfo"
    with os_boundary(f"reading {path}"):
        return parse_meminfo(path.read_text())


def parse_pcp_pages(zoneinfo: str) -> int:
    """Pages on the per-CPU free lists: the ``count:`` of every pageset in
    /proc/zoneinfo.  A freed page goes there first, not to the buddy
    allocator, and MemFree (NR_FREE_PAGES) does not count it; since 6.7
    ("mm: tune PCP high automatically") the lists grow to tens of MiB per CPU,
    so a few hundred MiB freed at once may not show in MemFree/MemAvailable."""
    total = 0
    for line in zoneinfo.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "count:":
            total += int(parts[1])
    return total


def read_pcp_pages(root: str | os.PathLike = "/proc") -> int:
    path = Path(root) / "zoneinfo"
    with os_boundary(f"reading {path}"):
        return parse_pcp_pages(path.read_text())


def parse_tlb_shootdowns(interrupts: str) -> int | None:
    """Sum over CPUs of the "TLB shootdowns" line of /proc/interrupts (x86),
    None where the architecture has no such line."""
    for line in interrupts.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "TLB":
            return sum(int(x) for x in rest.split() if x.isdigit())
    return None


def read_tlb_shootdowns(root: str | os.PathLike = "/proc") -> int | None:
    try:
        return parse_tlb_shootdowns((Path(root) / "interrupts").read_text())
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessMemory:
    """psutil's view of one process, in bytes."""

    rss: int
    uss: int
    pss: int
    swap: int


def process_memory(pid: int) -> ProcessMemory:
    """RSS (mm counters), USS and PSS (page-table walk of smaps_rollup) via psutil."""
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.NoSuchProcess:
        raise KernelIOError(f"reading memory of pid {pid}: the process is gone", None) from None
    except psutil.AccessDenied:
        raise KernelIOError(f"reading memory of pid {pid}: access denied", None,
                            hint="run as root") from None
    return ProcessMemory(rss=int(info.rss), uss=int(info.uss), pss=int(info.pss),
                         swap=int(getattr(info, "swap", 0)))


def classify_frames(reader: FrameReader, frames: np.ndarray, zero_pfn: int) -> tuple[int, int, int]:
    """(zero-page mappings, KSM-page mappings, distinct KSM pages) among
    ``frames`` (pagemap frame numbers of a benchmark's regions, -1 absent).

    A KSM page here is a frame with KPF_KSM that the regions map at least
    twice: every KSM page a benchmark makes is (its duplicates or zero pages
    merged into it), and requiring it keeps kernels whose kpageflags flag
    every anonymous page KSM (dee3d0bef2b0, 6.10; fixed in 7.2 and 6.18.y;
    Debian 6.12.117 has it) from counting unmerged pages as merged.
    """
    present = frames[frames >= 0]
    zero = int(np.count_nonzero(present == zero_pfn))
    real = present[present != zero_pfn]
    if real.size == 0:
        return zero, 0, 0
    # np.unique without return_inverse: its argsort is wrong in QEMU TCG
    # guests (see FrameReader.kpageflags)
    uniq, counts = np.unique(real, return_counts=True)
    flags = reader.kpageflags(uniq)
    ksm = ((flags & np.uint64(1 << KPF_KSM)) != 0) & (counts >= 2)
    return zero, int(counts[ksm].sum()), int(np.count_nonzero(ksm))
