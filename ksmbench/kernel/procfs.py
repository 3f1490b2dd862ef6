"""Readers for /proc: ksm_stat, ksm_merging_pages, RssAnon, pagemap + kpageflags.

The /proc root is injectable so every reader can be tested against a fake tree
without root (as psutil does).  Absent files and fields are None, never 0:
the kernel's own selftest helper returns 0 for a missing ``ksm_zero_pages``
field, which makes "unsupported" look like "zero".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import KernelIOError, KsmUnavailable, PermissionNeeded, os_boundary
from ..metrics import KSM_STAT_FIELDS
from .syscalls import PAGE_SIZE

DEFAULT_ROOT = "/proc"

# Documentation/admin-guide/mm/pagemap.rst
PM_PRESENT = np.uint64(1 << 63)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
# include/uapi/linux/kernel-page-flags.h
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24

#: gaps of at most this many frames between needed frames are read through,
#: because reading a few extra entries is cheaper than another system call
_KPAGEFLAGS_GAP = 16

_STAT_LINE = re.compile(r"(?P<key>[a-z_]+):?\s+(?P<value>\S+)")


def _signed(value: int) -> int:
    # 6.6-6.9 print the per-mm ksm_zero_pages with %lu, so a negative value
    # shows as a huge number (fixed to %ld by c2dc78b86e08, 6.10).
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_ksm_stat(text: str) -> dict[str, int | None]:
    """Parse ``/proc/<pid>/ksm_stat``: every known field, None where absent.

    Lines are ``name value`` (6.1+), and since ~6.14 (3ab76c767bc7) also
    ``ksm_merge_any: yes|no`` and ``ksm_mergeable: yes|no``, reported as 1/0.
    Unknown future fields are kept too.
    """
    out: dict[str, int | None] = {name: None for name in KSM_STAT_FIELDS}
    for line in text.splitlines():
        m = _STAT_LINE.match(line.strip())
        if not m:
            continue
        raw = m["value"]
        if raw in ("yes", "no"):
            out[m["key"]] = int(raw == "yes")
        else:
            try:
                out[m["key"]] = _signed(int(raw))
            except ValueError:
                continue
    return out


def parse_status_kb(text: str, field: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            return int(parts[1])
    return None


@dataclass(frozen=True)
class RegionMetrics:
    present: int
    zero_pfn: int
    ksm: int
    distinct_frames: int


def parse_schedstat(text: str) -> int:
    """The run time in ns: the first field of /proc/<pid>/schedstat."""
    return int(text.split()[0])


class ProcFS:
    """Access to one /proc tree (the real one, or a fake one in tests)."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root)

    def path(self, pid: int | str, name: str) -> Path:
        return self.root / str(pid) / name

    def _read(self, pid: int | str, name: str) -> str | None:
        path = self.path(pid, name)
        try:
            with os_boundary(f"reading {path}"):
                return path.read_text()
        except KsmUnavailable:
            return None

    def ksm_stat(self, pid: int | str = "self") -> dict[str, int | None]:
        text = self._read(pid, "ksm_stat")
        if text is None:  # before 6.1 (cb4df4cae4f2) there is no ksm_stat
            return {name: None for name in KSM_STAT_FIELDS}
        return parse_ksm_stat(text)

    def ksm_merging_pages(self, pid: int | str = "self") -> int | None:
        text = self._read(pid, "ksm_merging_pages")  # 5.19, 7609385337a4
        return None if text is None else _signed(int(text.strip()))

    def rss_anon_pages(self, pid: int | str = "self") -> int | None:
        text = self._read(pid, "status")
        if text is None:
            return None
        kb = parse_status_kb(text, "RssAnon")
        return None if kb is None else kb * 1024 // PAGE_SIZE

    def anonymous_pages(self, pid: int | str = "self") -> int | None:
        """Anonymous pages found by walking the page tables (smaps_rollup)."""
        text = self._read(pid, "smaps_rollup")
        if text is None:
            return None
        kb = parse_status_kb(text, "Anonymous")
        return None if kb is None else kb * 1024 // PAGE_SIZE

    def voluntary_switches(self, pid: int | str) -> int | None:
        """``voluntary_ctxt_switches`` of /proc/<pid>/status: grows each time the
        task goes to sleep; None when the process is gone."""
        text = self._read(pid, "status")
        return None if text is None else parse_status_kb(text, "voluntary_ctxt_switches")

    def sched_runtime(self, pid: int | str) -> int | None:
        """The CPU time the task has used, in ns: the first field of
        /proc/<pid>/schedstat (se.sum_exec_runtime, CONFIG_SCHED_INFO), which
        is what task_sched_runtime() returns while the task sleeps; None when
        the file is missing or the process is gone."""
        text = self._read(pid, "schedstat")
        try:
            return None if text is None else parse_schedstat(text)
        except (IndexError, ValueError):
            return None

    def comm(self, pid: int | str) -> str | None:
        text = self._read(pid, "comm")
        return None if text is None else text.strip()

    def pids(self) -> list[int]:
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())

    def stat_fields(self, pid: int | str) -> list[str] | None:
        """/proc/<pid>/stat from its third field (state, ppid, pgrp, ...) on;
        None when the process is gone.  comm may hold spaces and ')', so the
        fields start after the last ')'."""
        text = self._read(pid, "stat")
        if text is None:
            return None
        return text[text.rindex(")") + 2:].split()

    def task_state(self, pid: int | str) -> str | None:
        """The one-letter state from /proc/<pid>/stat (R, S, D, I, Z, ...)."""
        fields = self.stat_fields(pid)
        return fields[0] if fields else None

    def find_kthread(self, name: str) -> int | None:
        for pid in self.pids():
            try:
                if self.comm(pid) == name:
                    fields = self.stat_fields(pid) or ["", "0"]
                    if int(fields[1]) == 2:  # children of kthreadd
                        return pid
            except (KernelIOError, PermissionNeeded, ValueError):
                continue
        return None

    def live_group_members(self, pgid: int) -> list[int]:
        """Pids of process group ``pgid`` that are not zombies (or dying)."""
        live = []
        for pid in self.pids():
            try:
                fields = self.stat_fields(pid)
            except (KernelIOError, PermissionNeeded):
                continue  # exited meanwhile
            if fields and len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                live.append(pid)
        return live

    def smaps(self, pid: int | str) -> str | None:
        return self._read(pid, "smaps")


class FrameReader:
    """Frame-level view of this process's memory: pagemap + kpageflags.

    Keeps both files open; one ``pread`` covers a region's pagemap entries,
    and one ``pread`` covers each run of needed frames in kpageflags.
    """

    def __init__(self, procfs: ProcFS | None = None, pid: int | str = "self"):
        self.procfs = procfs or ProcFS()
        pagemap = self.procfs.path(pid, "pagemap")
        kpageflags = self.procfs.root / "kpageflags"
        with os_boundary(f"opening {pagemap}"):
            self._pagemap = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with os_boundary(f"opening {kpageflags}"):
                self._kpageflags = os.open(kpageflags, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._pagemap)
            raise

    def close(self) -> None:
        for fd in (self._pagemap, self._kpageflags):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pagemap(self, addr: int, npages: int) -> np.ndarray:
        """Raw pagemap entries (uint64) of ``npages`` pages from ``addr``."""
        with os_boundary("reading pagemap"):
            data = os.pread(self._pagemap, npages * 8, (addr // PAGE_SIZE) * 8)
        if len(data) != npages * 8:
            raise KernelIOError(f"short pagemap read ({len(data)} of {npages * 8} bytes)", None)
        return np.frombuffer(data, dtype=np.uint64)

    def kpageflags(self, pfns: np.ndarray) -> np.ndarray:
        """Flags of each frame in ``pfns`` (any order, repeats allowed)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        # not np.unique(return_inverse=True): that argsorts, and numpy's SIMD
        # int64 argsort returns wrong orders in QEMU 7.2 TCG guests (measured
        # in a debian:6.1 guest: unsorted "unique" arrays, negative read
        # sizes, EINVAL); np.sort and searchsorted are correct there
        uniq = np.unique(pfns)
        return self._flags_of_sorted(uniq)[np.searchsorted(uniq, pfns)]

    def _flags_of_sorted(self, uniq: np.ndarray) -> np.ndarray:
        """Flags of distinct frames given in ascending order.

        One ``pread`` per run of frames.  The kernel computes every entry it is
        asked for (stable_page_flags(), about 80 ns each here), so runs are
        only bridged across small gaps, where a few extra entries cost less
        than another system call.
        """
        if uniq.size == 0:
            return np.zeros(0, dtype=np.uint64)
        breaks = np.flatnonzero(np.diff(uniq) > _KPAGEFLAGS_GAP) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [uniq.size])).tolist()
        firsts = uniq[starts].tolist()
        chunks = []
        with os_boundary("reading /proc/kpageflags"):
            for s, e, first in zip(starts, ends, firsts):
                count = int(uniq[e - 1]) - first + 1
                chunks.append(os.pread(self._kpageflags, count * 8, first * 8))
        data = np.frombuffer(b"".join(chunks), dtype=np.uint64)
        # position of each frame in the concatenated reads
        run_of = np.repeat(np.arange(len(starts)), np.diff(np.concatenate((starts, [uniq.size]))))
        run_base = np.cumsum([0] + [len(c) // 8 for c in chunks[:-1]])
        offsets = run_base[run_of] + (uniq - np.asarray(firsts, dtype=np.int64)[run_of])
        return data[offsets]

    def frames(self, addr: int, npages: int) -> np.ndarray:
        """Frame number of each page, or -1 where nothing is present."""
        entries = self.pagemap(addr, npages)
        present = (entries & PM_PRESENT) != 0
        pfns = (entries & PM_PFN_MASK).astype(np.int64)
        if present.any() and not pfns[present].any():
            raise PermissionNeeded(
                "pagemap shows frame numbers as 0: CAP_SYS_ADMIN is needed",
                hint="run as root, or use a VM kernel (--kernel debian:<version>)")
        return np.where(present, pfns, -1)

    def region_metrics(self, addr: int, npages: int, zero_pfns: Sequence[int]) -> RegionMetrics:
        frames = self.frames(addr, npages)
        pfns = frames[frames >= 0]
        zero_mask = pfns == zero_pfns[0]
        for z in zero_pfns[1:]:  # MIPS/s390 colour the zero page: several frames
            zero_mask |= pfns == z
        real = pfns[~zero_mask]
        uniq, counts = np.unique(real, return_counts=True)  # the one sort
        flags = self._flags_of_sorted(uniq)
        is_ksm = (flags & np.uint64(1 << KPF_KSM)) != 0
        return RegionMetrics(
            present=int(pfns.size),
            zero_pfn=int(np.count_nonzero(zero_mask)),
            ksm=int(counts[is_ksm].sum()),
            distinct_frames=int(uniq.size),
        )

    def thp_mask(self, addr: int, npages: int) -> np.ndarray:
        """True for each page present and part of an anonymous transparent huge
        page (KPF_THP; the huge zero page, which also has it, excluded)."""
        frames = self.frames(addr, npages)
        present = frames >= 0
        out = np.zeros(npages, dtype=bool)
        if present.any():
            flags = self.kpageflags(frames[present])
            out[present] = (((flags & np.uint64(1 << KPF_THP)) != 0)
                            & ((flags & np.uint64(1 << KPF_ZERO_PAGE)) == 0))
        return out

    def discover_zero_pfn(self) -> int:
        """Find the shared zero page's frame by faulting it in and looking.

        A read fault on a never-written private anonymous page maps the
        shared zero page (do_anonymous_page(), unless mm_forbids_zeropage()).
        MADV_NOHUGEPAGE keeps a PMD-sized area from getting the huge zero
        page, which has another frame.  The answer is confirmed with
        KPF_ZERO_PAGE (kpageflags bit 24, since 4.0).
        """
        from .syscalls import Region

        probe = Region(1)
        try:
            probe.madvise("nohugepage")
            probe.read_pages()
            pfn = int(self.frames(probe.addr, 1)[0])
        finally:
            probe.munmap()
        if pfn < 0:
            raise KernelIOError("finding the zero page: a read fault mapped nothing", None)
        flags = int(self.kpageflags(np.array([pfn], dtype=np.uint64))[0])
        if not flags & (1 << KPF_ZERO_PAGE):
            raise KernelIOError(
                f"finding the zero page: frame {pfn} lacks KPF_ZERO_PAGE "
                "(does this architecture forbid the zero page?)", None)
        return pfn
