"""System calls through cffi in ABI mode (no compiler needed at install).

Private anonymous memory (mmap/munmap), madvise, prctl, and fast page fills.
Every failing call raises :class:`~ksmbench.errors.SyscallError` naming the
call, its arguments and the errno.

Why not Python's ``mmap`` module: ``mmap.mmap(-1, n)`` is MAP_SHARED, and KSM
silently ignores MADV_MERGEABLE on shared mappings (madvise returns 0, nothing
ever merges).  Regions here are always MAP_PRIVATE|MAP_ANONYMOUS.
"""

from __future__ import annotations

import errno as _errno
import mmap as _mmap
import os

import cffi
import numpy as np

from ..errors import SyscallError

PAGE_SIZE = _mmap.PAGESIZE

_ffi = cffi.FFI()
_ffi.cdef(
    """
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);
    long syscall(long number, ...);
    int ioctl(int fd, unsigned long request, ...);
    int close(int fd);
    struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
    struct uffdio_range { uint64_t start; uint64_t len; };
    struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
    struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
    int mprotect(void *addr, size_t length, int prot);
    void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...);
    """
)
_libc = _ffi.dlopen(None)

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROTS = {"none": PROT_NONE, "read": PROT_READ, "read-write": PROT_READ | PROT_WRITE}
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000  # 4.17; older kernels treat the address as a hint
_MAP_FAILED = _ffi.cast("void *", -1)

# include/uapi/asm-generic/mman-common.h
MADV_DONTNEED = 4
MADV_FREE = 8          # 4.5
MADV_DONTFORK = 10
MADV_WIPEONFORK = 18   # 4.14
MADV_COLD = 20         # 5.4
MADV_PAGEOUT = 21      # 5.4
MADV_MERGEABLE = 12    # 2.6.32
MADV_UNMERGEABLE = 13  # 2.6.32
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
ADVICE = {
    "mergeable": MADV_MERGEABLE,
    "unmergeable": MADV_UNMERGEABLE,
    "dontneed": MADV_DONTNEED,
    "free": MADV_FREE,
    "dontfork": MADV_DONTFORK,
    "wipeonfork": MADV_WIPEONFORK,
    "cold": MADV_COLD,
    "pageout": MADV_PAGEOUT,
    "hugepage": MADV_HUGEPAGE,
    "nohugepage": MADV_NOHUGEPAGE,
}

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_MEMORY_MERGE = 67  # 6.4, d7597f59d1d3
PR_GET_MEMORY_MERGE = 68


# mbind(2) (x86-64 syscall number; include/uapi/linux/mempolicy.h): CONFIG_NUMA
NR_MBIND = 237
MPOL_BIND = 2

# include/uapi/linux/userfaultfd.h (x86-64 syscall number).  Write-protect
# mode on private anonymous memory: 63ae4391f2b8 (5.7)
NR_USERFAULTFD = 323
UFFD_API = 0xAA
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_UFFDIO_WRITEPROTECT_BIT = 0x06


def _iowr(nr: int, ctype: str) -> int:
    """_IOWR(UFFDIO, nr, ctype): direction read|write, size, type 0xAA, number."""
    return (3 << 30) | (_ffi.sizeof(ctype) << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, "struct uffdio_api")
UFFDIO_REGISTER = _iowr(0x00, "struct uffdio_register")
UFFDIO_WRITEPROTECT = _iowr(_UFFDIO_WRITEPROTECT_BIT, "struct uffdio_writeprotect")
_O_CLOEXEC = 0o2000000
_O_NONBLOCK = 0o4000


def _fail(call: str) -> SyscallError:
    err = _ffi.errno
    hint = None
    if call.startswith("prctl(PR_") and "MEMORY_MERGE" in call and err == _errno.EINVAL:
        hint = "this kernel has no PR_SET_MEMORY_MERGE (added in 6.4) or no CONFIG_KSM"
    elif call.startswith("madvise") and err == _errno.EINVAL:
        hint = "the kernel may lack CONFIG_KSM or CONFIG_TRANSPARENT_HUGEPAGE for this advice"
    elif call.startswith("userfaultfd") and err in (_errno.ENOSYS, _errno.EPERM):
        hint = ("the kernel lacks CONFIG_USERFAULTFD, or vm.unprivileged_userfaultfd=0 "
                "and the caller is not privileged")
    elif call.startswith("mbind") and err in (_errno.ENOSYS, _errno.EINVAL):
        hint = ("the kernel lacks CONFIG_NUMA, or the node is not online with memory "
                "(/sys/devices/system/node/has_memory)")
    elif err == _errno.ENOMEM:
        hint = "not enough memory, or the range is not mapped"
    return SyscallError(call, err, hint=hint)


class Region:
    """A private anonymous mapping, owned by this process until unmapped."""

    def __init__(self, npages: int, addr: int | None = None):
        """``addr``: map exactly there (MAP_FIXED_NOREPLACE), else where the kernel picks."""
        if npages < 1:
            raise ValueError("a region needs at least one page")
        self.npages = npages
        self.length = npages * PAGE_SIZE
        flags = MAP_PRIVATE | MAP_ANONYMOUS
        if addr is not None:
            flags |= MAP_FIXED_NOREPLACE
        hint = _ffi.NULL if addr is None else _ffi.cast("void *", addr)
        ptr = _libc.mmap(hint, self.length, PROT_READ | PROT_WRITE, flags, -1, 0)
        if ptr == _MAP_FAILED:
            where = "" if addr is None else f" at {hex(addr)}"
            raise _fail(f"mmap({self.length} bytes{where}, MAP_PRIVATE|MAP_ANONYMOUS)")
        if addr is not None and int(_ffi.cast("unsigned long", ptr)) != addr:
            _libc.munmap(ptr, self.length)
            raise SyscallError(f"mmap({self.length} bytes at {hex(addr)}, MAP_FIXED_NOREPLACE)",
                               _errno.EEXIST, hint="the kernel placed the mapping elsewhere "
                               "(MAP_FIXED_NOREPLACE needs Linux 4.17)")
        self._ptr = _ffi.cast("char *", ptr)
        self.addr = int(_ffi.cast("unsigned long", ptr))
        self._view = np.frombuffer(_ffi.buffer(ptr, self.length), dtype=np.uint8)

    @property
    def mapped(self) -> bool:
        return self._ptr is not None

    def _check(self, first: int, end: int) -> None:
        if self._ptr is None:
            raise ValueError("region is unmapped")
        if not 0 <= first < end <= self.npages:
            raise ValueError(f"page range [{first}, {end}) outside region of {self.npages} pages")

    def madvise(self, advice: str, first: int = 0, end: int | None = None) -> None:
        end = self.npages if end is None else end
        self._check(first, end)
        ret = _libc.madvise(self._ptr + first * PAGE_SIZE, (end - first) * PAGE_SIZE, ADVICE[advice])
        if ret != 0:
            raise _fail(f"madvise({hex(self.addr + first * PAGE_SIZE)}, "
                        f"{end - first} pages, MADV_{advice.upper()})")

    def write_pages(self, first: int, pages: np.ndarray) -> None:
        """Write ``pages`` (n x PAGE_SIZE bytes) starting at page ``first``.

        Every page is written in full, so every page takes a write fault even
        when its content does not change.
        """
        n = pages.shape[0]
        self._check(first, first + n)
        dst = self._view[first * PAGE_SIZE:(first + n) * PAGE_SIZE].reshape(n, PAGE_SIZE)
        np.copyto(dst, pages)

    def write_byte_per_page(self, value: int, first: int = 0, end: int | None = None) -> None:
        """Store one byte at the start of each page in range (one write fault
        per page that is not yet privately writable: CoW of a KSM page or of
        the zero page, or first touch).  A strided store in C, so a timed call
        measures the faults, not the interpreter."""
        end = self.npages if end is None else end
        self._check(first, end)
        self._view[first * PAGE_SIZE:end * PAGE_SIZE:PAGE_SIZE] = value

    def read_pages(self, first: int = 0, end: int | None = None) -> int:
        """Read one byte of each page (a read fault per never-touched page)."""
        end = self.npages if end is None else end
        self._check(first, end)
        return int(self._view[first * PAGE_SIZE:end * PAGE_SIZE:PAGE_SIZE].sum())

    # --- the VMA ops: mprotect, mremap, write_byte, madvise advices -----------
    def mprotect(self, prot: str, first: int = 0, end: int | None = None) -> None:
        end = self.npages if end is None else end
        self._check(first, end)
        if _libc.mprotect(self._ptr + first * PAGE_SIZE, (end - first) * PAGE_SIZE, PROTS[prot]) != 0:
            raise _fail(f"mprotect({hex(self.addr + first * PAGE_SIZE)}, {end - first} pages, "
                        f"{prot})")

    def mremap(self, npages: int, new_addr: int | None = None) -> None:
        """Resize in place, or move to ``new_addr`` (MREMAP_MAYMOVE|MREMAP_FIXED)."""
        self._check(0, self.npages)
        length = npages * PAGE_SIZE
        if new_addr is None:
            ptr = _libc.mremap(self._ptr, self.length, length, _ffi.cast("int", 0))
        else:
            ptr = _libc.mremap(self._ptr, self.length, length,
                               _ffi.cast("int", MREMAP_MAYMOVE | MREMAP_FIXED),
                               _ffi.cast("void *", new_addr))
        if ptr == _MAP_FAILED:
            where = "in place" if new_addr is None else f"to {hex(new_addr)}"
            raise _fail(f"mremap({hex(self.addr)}, {self.npages} -> {npages} pages {where})")
        self._view = None
        self._ptr = _ffi.cast("char *", ptr)
        self.addr = int(_ffi.cast("unsigned long", ptr))
        self.npages = npages
        self.length = length
        self._view = np.frombuffer(_ffi.buffer(ptr, length), dtype=np.uint8)

    def write_byte_forced(self, mem_fd: int, values: np.ndarray, first: int) -> None:
        """Store values[i] at byte 0 of page first+i through /proc/self/mem:
        a FOLL_FORCE write, which works under any protection (as ptrace
        does) and breaks CoW like a write fault."""
        self._check(first, first + len(values))
        for i, v in enumerate(values.tolist()):
            addr = self.addr + (first + i) * PAGE_SIZE
            if os.pwrite(mem_fd, bytes((v,)), addr) != 1:
                raise SyscallError(f"pwrite(/proc/self/mem, {hex(addr)}, 1 byte)", _errno.EIO)
    # --- end of the VMA ops ---------------------------------------------------

    def bind(self, node: int) -> None:
        """mbind(MPOL_BIND) to one NUMA node: every page faulted in later
        (first touch, CoW, unshare) is allocated there, in forked children
        too (dup_mmap() copies the VMA's policy)."""
        self._check(0, self.npages)
        mask = _ffi.new("unsigned long[2]")
        mask[node // 64] = 1 << (node % 64)
        # get_nodes() reads maxnode - 1 bits (the historic off-by-one): 65 reads 64
        ret = _libc.syscall(NR_MBIND, _ffi.cast("unsigned long", self.addr),
                            _ffi.cast("unsigned long", self.length), _ffi.cast("int", MPOL_BIND),
                            mask, _ffi.cast("unsigned long", 65), _ffi.cast("unsigned int", 0))
        if ret != 0:
            raise _fail(f"mbind({hex(self.addr)}, {self.npages} pages, MPOL_BIND, node {node})")

    def munmap(self) -> None:
        if self._ptr is None:
            return
        self._view = None
        if _libc.munmap(self._ptr, self.length) != 0:
            raise _fail(f"munmap({hex(self.addr)}, {self.npages} pages)")
        self._ptr = None


def prctl_set_memory_merge(enable: bool) -> None:
    if _libc.prctl(PR_SET_MEMORY_MERGE, 1 if enable else 0, 0, 0, 0) != 0:
        raise _fail(f"prctl(PR_SET_MEMORY_MERGE, {int(enable)})")


def prctl_get_memory_merge() -> int:
    ret = _libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
    if ret < 0:
        raise _fail("prctl(PR_GET_MEMORY_MERGE)")
    return ret


def prctl_set_pdeathsig(signum: int) -> None:
    if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise _fail(f"prctl(PR_SET_PDEATHSIG, {signum})")


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): for ``preexec_fn`` and forked children, so
    that nothing ksmbench starts outlives it."""
    prctl_set_pdeathsig(9)


def prctl_set_child_subreaper() -> None:
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_CHILD_SUBREAPER, 1)")


SYS_MOVE_PAGES = 279  # x86-64


def drain_lru_batches() -> None:
    """Empty every CPU's LRU batches (``__lru_add_drain_all(true)``).

    A folio in a per-CPU batch (just faulted in, deactivated, or being made
    lazy-free, on whichever CPU the process ran) is off the LRU since 6.11
    and cannot be isolated: MADV_FREE and MADV_PAGEOUT would skip it, and the
    outcome would depend on CPU migration.  move_pages() starts with
    lru_cache_disable() (do_pages_move(), 5.13), which drains all CPUs; it is
    asked to "move" one page of our own to the node it is already on."""
    region = Region(1)
    try:
        region.write_byte_per_page(1)
        pages = _ffi.new("void *[1]", [region._ptr])
        status = _ffi.new("int[1]")
        nodes = _ffi.new("int[1]")
        calls = ((_ffi.NULL, "query"), (nodes, "move"))
        for node_arg, what in calls:
            if node_arg != _ffi.NULL:
                nodes[0] = status[0]  # where the page is
            ret = _libc.syscall(_ffi.cast("long", SYS_MOVE_PAGES), _ffi.cast("int", 0),
                                _ffi.cast("unsigned long", 1), pages, node_arg, status,
                                _ffi.cast("int", 0))
            if ret != 0:
                raise _fail(f"move_pages(self, 1 page, {what})")
    finally:
        region.munmap()


def forced_mem_writes() -> bool:
    """Whether this process may write through /proc/self/mem to a page its
    protection forbids (FOLL_FORCE, as ptrace does).  Kernels built with
    CONFIG_PROC_MEM_FORCE_PTRACE or CONFIG_PROC_MEM_NO_FORCE (6.12+), or
    booted with proc_mem.force_override, refuse it with EIO."""
    region = Region(1)
    fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        region.mprotect("none")
        os.pwrite(fd, b"\x01", region.addr)
        return True
    except OSError as exc:
        if exc.errno in (_errno.EIO, _errno.EPERM, _errno.EACCES):
            return False
        raise
    finally:
        os.close(fd)
        region.munmap()


def madvise_range(addr: int, length: int, advice: str) -> None:
    """madvise on an address range that is not a :class:`Region` (e.g. from smaps)."""
    ret = _libc.madvise(_ffi.cast("void *", addr), length, ADVICE[advice])
    if ret != 0:
        raise _fail(f"madvise({hex(addr)}, {length} bytes, MADV_{advice.upper()})")


class UffdWriteProtect:
    """One userfaultfd context (the process's, kept open) in write-protect mode.

    Nothing ever reads the descriptor: a write to a protected page would wait
    for a handler forever, so the scenario loader refuses writes to protected
    ranges.  KSM's unsharing does not write: since 6cce3314b928 (6.2) it
    takes an unshare fault, which userfaultfd-wp does not intercept.
    """

    def __init__(self) -> None:
        fd = _libc.syscall(NR_USERFAULTFD, _ffi.cast("int", _O_CLOEXEC | _O_NONBLOCK))
        if fd < 0:
            raise _fail("userfaultfd(O_CLOEXEC|O_NONBLOCK)")
        self.fd = int(fd)
        api = _ffi.new("struct uffdio_api *", {"api": UFFD_API,
                                               "features": UFFD_FEATURE_PAGEFAULT_FLAG_WP})
        if _libc.ioctl(self.fd, UFFDIO_API, api) != 0:
            err = _fail("ioctl(UFFDIO_API, UFFD_FEATURE_PAGEFAULT_FLAG_WP)")
            self.close()
            raise err
        if not api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            self.close()
            raise SyscallError("ioctl(UFFDIO_API)", _errno.EOPNOTSUPP,
                               hint="the kernel offers no userfaultfd write-protect mode "
                                    "(UFFD_FEATURE_PAGEFAULT_FLAG_WP, 5.7)")

    def protect(self, addr: int, length: int) -> None:
        """UFFDIO_REGISTER_MODE_WP over the range, then UFFDIO_WRITEPROTECT it."""
        reg = _ffi.new("struct uffdio_register *", {"range": {"start": addr, "len": length},
                                                     "mode": UFFDIO_REGISTER_MODE_WP})
        if _libc.ioctl(self.fd, UFFDIO_REGISTER, reg) != 0:
            raise _fail(f"ioctl(UFFDIO_REGISTER, {hex(addr)}, {length} bytes, MODE_WP)")
        if not reg.ioctls & (1 << _UFFDIO_WRITEPROTECT_BIT):
            raise SyscallError(f"ioctl(UFFDIO_REGISTER, {hex(addr)})", _errno.EOPNOTSUPP,
                               hint="UFFDIO_WRITEPROTECT is not offered for this range")
        wp = _ffi.new("struct uffdio_writeprotect *", {"range": {"start": addr, "len": length},
                                                        "mode": UFFDIO_WRITEPROTECT_MODE_WP})
        if _libc.ioctl(self.fd, UFFDIO_WRITEPROTECT, wp) != 0:
            raise _fail(f"ioctl(UFFDIO_WRITEPROTECT, {hex(addr)}, {length} bytes)")

    def close(self) -> None:
        if self.fd >= 0:
            _libc.close(self.fd)
            self.fd = -1


def uffd_wp_available() -> bool:
    """Whether userfaultfd write-protect mode can be set up here (a probe)."""
    try:
        UffdWriteProtect().close()
        return True
    except SyscallError:
        return False
