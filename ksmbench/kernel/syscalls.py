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
    """
)
_libc = _ffi.dlopen(None)

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000  # 4.17; older kernels treat the address as a hint
_MAP_FAILED = _ffi.cast("void *", -1)

# include/uapi/asm-generic/mman-common.h
MADV_DONTNEED = 4
MADV_MERGEABLE = 12    # 2.6.32
MADV_UNMERGEABLE = 13  # 2.6.32
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
ADVICE = {
    "mergeable": MADV_MERGEABLE,
    "unmergeable": MADV_UNMERGEABLE,
    "dontneed": MADV_DONTNEED,
    "hugepage": MADV_HUGEPAGE,
    "nohugepage": MADV_NOHUGEPAGE,
}

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_MEMORY_MERGE = 67  # 6.4, d7597f59d1d3
PR_GET_MEMORY_MERGE = 68


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
