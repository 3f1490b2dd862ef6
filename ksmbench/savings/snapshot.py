"""What a running process would give KSM: its anonymous private pages, hashed.

For every VMA that KSM may scan, the present anonymous pages are found in
``/proc/<pid>/pagemap`` and their bytes read from ``/proc/<pid>/mem`` (both
need ptrace access; frame numbers need CAP_SYS_ADMIN).  Each page is hashed
with xxh3-128; the all-zero page is recognised by its hash.  Nothing in the
target changes: only present pages are read, so no fault is taken on its
behalf (reading a never-touched page through /proc/<pid>/mem would map the
zero page there).

Which pages ksmd visits (mm/ksm.c, scan_get_next_rmap_item(), 6.1-6.18):
every address of a VM_MERGEABLE VMA that has an anon_vma, where the PTE maps
an anonymous folio.  So copy-on-written pages of private *file* mappings
(a library's relocated data) are candidates too, and zero-page PTEs (read
faults) and page-cache pages are not.  In pagemap terms (pagemap.rst): bit 63
present, bit 61 (file page or shared anon) clear, and a frame that is not the
shared zero page.  A zero-page PTE never has bit 56 (exclusively mapped), so
only the frames of non-exclusive entries are checked in /proc/kpageflags
(KPF_ZERO_PAGE, which also marks the huge zero page).

Which VMAs are mergeable (vma_ksm_compatible(), 6.4+): private, and none of
VM_SHARED/VM_MAYSHARE/VM_PFNMAP/VM_IO/VM_DONTEXPAND/VM_HUGETLB/VM_MIXEDMAP
(smaps VmFlags sh ms pf io de ht mm).  ``scope``:

* ``merge-any``: every compatible VMA, as PR_SET_MEMORY_MERGE would make
  them (d7597f59d1d3, 6.4);
* ``mergeable``: the VMAs that are VM_MERGEABLE now (VmFlags ``mg``), e.g.
  QEMU's guest RAM with ``-machine mem-merge=on``;
* ``auto``: ``mergeable`` if the process has any such VMA, else ``merge-any``.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from ..errors import KsmbenchError, PermissionNeeded, UsageError
from ..kernel.procfs import KPF_KSM, KPF_THP, KPF_ZERO_PAGE, PM_PFN_MASK, PM_PRESENT, ProcFS
from ..kernel.syscalls import PAGE_SIZE

PM_FILE = np.uint64(1 << 61)
PM_EXCLUSIVE = np.uint64(1 << 56)
#: smaps VmFlags that make a VMA incompatible with KSM (vma_ksm_compatible())
INCOMPATIBLE_FLAGS = frozenset({"sh", "ms", "pf", "io", "de", "ht", "mm"})
SCOPES = ("auto", "merge-any", "mergeable")
#: pagemap entries read per pread (512 KiB of entries: 256 MiB of address space)
_PAGEMAP_CHUNK = 65536
#: bytes read from /proc/<pid>/mem per pread
_MEM_CHUNK = 16 << 20

ZERO_DIGEST = xxhash.xxh3_128_digest(bytes(PAGE_SIZE))


class ProcessGone(KsmbenchError):
    """The target process exited (or its memory went away) during the snapshot."""


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    path: str
    flags: frozenset[str]

    @property
    def compatible(self) -> bool:
        return self.perms[3:4] == "p" and not (self.flags & INCOMPATIBLE_FLAGS)

    @property
    def mergeable(self) -> bool:
        return "mg" in self.flags


@dataclass
class Area:
    """The candidate pages of one VMA, in address order."""

    start: int
    end: int
    path: str
    addrs: np.ndarray    # int64 page addresses
    pfns: np.ndarray     # int64 frame numbers (0: unknown, not root)
    digests: np.ndarray  # (n, 2) uint64: xxh3-128 of each page
    #: the page is part of a transparent huge page (kpageflags KPF_THP; root only)
    thp: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: the page is a KSM page already (KPF_KSM, mapped more than once; root only)
    ksm: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def pages(self) -> int:
        return int(self.addrs.size)


@dataclass
class ProcessImage:
    pid: int
    name: str
    scope: str
    areas: list[Area] = field(default_factory=list)
    zero_pfn_ptes: int = 0       # zero-page PTEs in the chosen VMAs (not candidates)
    #: their addresses: after merging, KSM zero pages are among them
    zero_pte_addrs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seconds: float = 0.0

    @property
    def pages(self) -> int:
        return sum(a.pages for a in self.areas)

    def zero_pages(self) -> int:
        return sum(int(np.count_nonzero(is_zero(a.digests))) for a in self.areas)

    def digest_map(self) -> dict[int, tuple[int, int]]:
        """address -> digest (for comparing two snapshots)."""
        out: dict[int, tuple[int, int]] = {}
        for a in self.areas:
            for addr, d0, d1 in zip(a.addrs.tolist(), a.digests[:, 0].tolist(),
                                    a.digests[:, 1].tolist()):
                out[addr] = (d0, d1)
        return out


_ZERO = np.frombuffer(ZERO_DIGEST, dtype=np.uint64)


def is_zero(digests: np.ndarray) -> np.ndarray:
    return (digests[:, 0] == _ZERO[0]) & (digests[:, 1] == _ZERO[1])


def hash_pages(data: bytes | memoryview) -> np.ndarray:
    """xxh3-128 of each 4 KiB page of ``data`` as an (n, 2) uint64 array."""
    mv = memoryview(data)
    n = len(mv) // PAGE_SIZE
    digest = xxhash.xxh3_128_digest
    out = b"".join([digest(mv[i:i + PAGE_SIZE]) for i in range(0, n * PAGE_SIZE, PAGE_SIZE)])
    return np.frombuffer(out, dtype=np.uint64).reshape(n, 2)


def parse_smaps_vmas(text: str) -> list[Vma]:
    """VMAs (range, perms, path, VmFlags) from /proc/<pid>/smaps."""
    vmas: list[Vma] = []
    cur: list | None = None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            try:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
            except ValueError:
                continue
            cur = [lo, hi, head[1], head[5].strip() if len(head) > 5 else "", frozenset()]
            vmas.append(cur)  # type: ignore[arg-type]
        elif line.startswith("VmFlags:") and cur is not None:
            cur[4] = frozenset(line.split()[1:])
    return [Vma(*v) for v in vmas]


class Snapshotter:
    """Reads process images; one zero-page frame discovery per instance."""

    def __init__(self, procfs: ProcFS | None = None):
        self.procfs = procfs or ProcFS()
        self.root = os.geteuid() == 0
        self.zero_pfn: int | None = None
        self._kpf: int | None = None
        self._frames = None
        if self.root:
            from ..kernel.procfs import FrameReader

            self._frames = FrameReader(self.procfs, "self")
            self.zero_pfn = self._frames.discover_zero_pfn()
            self._kpf = os.open(self.procfs.root / "kpageflags", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._kpf is not None:
            os.close(self._kpf)
            self._kpf = None
        if self._frames is not None:
            self._frames.close()
            self._frames = None

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one process --------------------------------------------------------------
    def vmas(self, pid: int) -> list[Vma]:
        path = self.procfs.path(pid, "smaps")
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ProcessGone(f"process {pid} does not exist",
                              hint="check the pid with ps; it may have exited") from None
        except ProcessLookupError:
            raise ProcessGone(f"process {pid} exited during the snapshot") from None
        except PermissionError:
            raise PermissionNeeded(f"reading {path}: permission denied",
                                   hint="run as root (sudo ksmbench savings ...)") from None
        return parse_smaps_vmas(text)

    def snapshot(self, pid: int, scope: str = "auto") -> ProcessImage:
        if scope not in SCOPES:
            raise UsageError(f"unknown scope '{scope}' (one of {', '.join(SCOPES)})")
        t0 = time.perf_counter()
        vmas = [v for v in self.vmas(pid) if v.compatible]
        chosen = scope
        if scope == "auto":
            chosen = "mergeable" if any(v.mergeable for v in vmas) else "merge-any"
        if chosen == "mergeable":
            vmas = [v for v in vmas if v.mergeable]
        image = ProcessImage(pid, self.procfs.comm(pid) or "?", chosen)
        pm = self._open(pid, "pagemap")
        try:
            mem = self._open(pid, "mem")
            zero_parts = []
            try:
                for vma in vmas:
                    area, zero_addrs = self._area(pid, pm, mem, vma)
                    zero_parts.append(zero_addrs)
                    if area.pages:
                        image.areas.append(area)
                if zero_parts:
                    image.zero_pte_addrs = np.concatenate(zero_parts)
                image.zero_pfn_ptes = int(image.zero_pte_addrs.size)
            finally:
                os.close(mem)
        finally:
            os.close(pm)
        image.seconds = time.perf_counter() - t0
        return image

    def _gone(self, pid: int) -> ProcessGone:
        return ProcessGone(f"process {pid} exited during the snapshot")

    def _open(self, pid: int, name: str) -> int:
        """/proc/<pid>/<name> for reading: a process that is gone, or a file
        only root may read, is one line for the user."""
        try:
            return os.open(self.procfs.path(pid, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._gone(pid) from None
        except PermissionError:
            raise PermissionNeeded(f"reading /proc/{pid}/{name}: permission denied",
                                   hint="run as root") from None

    def _area(self, pid: int, pm: int, mem: int, vma: Vma) -> tuple[Area, np.ndarray]:
        first = vma.start // PAGE_SIZE
        count = (vma.end - vma.start) // PAGE_SIZE
        addrs_parts, pfn_parts, zero_parts, excl_parts = [], [], [], []
        for off in range(0, count, _PAGEMAP_CHUNK):
            n = min(_PAGEMAP_CHUNK, count - off)
            try:
                raw = os.pread(pm, n * 8, (first + off) * 8)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.EIO):
                    raise self._gone(pid) from None
                raise
            if len(raw) < n * 8:
                if not raw and not self.procfs.path(pid, "stat").exists():
                    raise self._gone(pid)
                n = len(raw) // 8
            e = np.frombuffer(raw, dtype=np.uint64)[:n]
            present = ((e & PM_PRESENT) != 0) & ((e & PM_FILE) == 0)
            if not present.any():
                continue
            idx = np.flatnonzero(present)
            ent = e[idx]
            pfn = (ent & PM_PFN_MASK).astype(np.int64)
            keep = np.ones(idx.size, dtype=bool)
            if self.zero_pfn is not None:
                shared = (ent & PM_EXCLUSIVE) == 0
                zero = shared & (pfn == self.zero_pfn)
                others = shared & ~zero
                if others.any():
                    zero[others] = self._zero_flag(pfn[others])
                zero_parts.append((first + off + idx[zero]).astype(np.int64) * PAGE_SIZE)
                keep = ~zero
            addrs_parts.append((first + off + idx[keep]).astype(np.int64) * PAGE_SIZE)
            pfn_parts.append(pfn[keep])
            excl_parts.append(((ent & PM_EXCLUSIVE) != 0)[keep])
        addrs = np.concatenate(addrs_parts) if addrs_parts else np.zeros(0, dtype=np.int64)
        pfns = np.concatenate(pfn_parts) if pfn_parts else np.zeros(0, dtype=np.int64)
        exclusive = np.concatenate(excl_parts) if excl_parts else np.zeros(0, dtype=bool)
        digests = self._read_hash(pid, mem, addrs)
        thp = np.zeros(addrs.size, dtype=bool)
        ksm = np.zeros(addrs.size, dtype=bool)
        if self._frames is not None and addrs.size:
            flags = self._frames.kpageflags(pfns)
            thp = (flags & np.uint64(1 << KPF_THP)) != 0
            # a KSM page is never mapped exclusively; requiring that keeps the
            # kpageflags bug of dee3d0bef2b0 (KPF_KSM on every anon page) out
            ksm = ((flags & np.uint64(1 << KPF_KSM)) != 0) & ~exclusive
        zero_addrs = np.concatenate(zero_parts) if zero_parts else np.zeros(0, dtype=np.int64)
        return Area(vma.start, vma.end, vma.path, addrs, pfns, digests, thp, ksm), zero_addrs

    def _zero_flag(self, pfns: np.ndarray) -> np.ndarray:
        """KPF_ZERO_PAGE of each frame (the huge zero page has its own frames)."""
        out = np.zeros(pfns.size, dtype=bool)
        for i, pfn in enumerate(pfns.tolist()):
            raw = os.pread(self._kpf, 8, pfn * 8)
            if len(raw) == 8:
                out[i] = bool(int.from_bytes(raw, "little") & (1 << KPF_ZERO_PAGE))
        return out

    def _read_hash(self, pid: int, mem: int, addrs: np.ndarray) -> np.ndarray:
        """Read and hash the pages at ``addrs`` (sorted), one pread per run."""
        if addrs.size == 0:
            return np.zeros((0, 2), dtype=np.uint64)
        breaks = np.flatnonzero(np.diff(addrs) != PAGE_SIZE) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [addrs.size])).tolist()
        parts = []
        for s, e in zip(starts, ends):
            base = int(addrs[s])
            total = (e - s) * PAGE_SIZE
            for off in range(0, total, _MEM_CHUNK):
                length = min(_MEM_CHUNK, total - off)
                parts.append(self._read_run(pid, mem, base + off, length))
        return np.concatenate(parts)

    def _read_run(self, pid: int, mem: int, addr: int, length: int) -> np.ndarray:
        try:
            data = os.pread(mem, length, addr)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise self._gone(pid) from None
            if exc.errno != errno.EIO:
                raise
            data = b""
        if len(data) == length:
            return hash_pages(data)
        # a page went away between pagemap and mem (the process unmapped it):
        # read page by page; a missing page hashes as zero-length content
        if not Path(self.procfs.path(pid, "stat")).exists():
            raise self._gone(pid)
        out = np.zeros((length // PAGE_SIZE, 2), dtype=np.uint64)
        for i in range(length // PAGE_SIZE):
            try:
                page = os.pread(mem, PAGE_SIZE, addr + i * PAGE_SIZE)
            except OSError:
                page = b""
            if len(page) == PAGE_SIZE:
                out[i] = hash_pages(page)[0]
            else:
                out[i] = np.frombuffer(xxhash.xxh3_128_digest(b"gone"), dtype=np.uint64)
        return out
