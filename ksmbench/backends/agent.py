"""A scenario process: executes its steps and reports its own observations.

Each scenario process (``main``, and every child made by ``fork``) is one
agent: a small Python process that owns its regions, serves commands from the
controller over a Unix socket, and reads its own /proc/self files and pagemap.
``fork`` is a real fork(2) of the agent, so the child inherits every region
exactly as the kernel copies it; the child gets a new socket, passed to the
controller with SCM_RIGHTS.

The agent's own interpreter memory must stay invisible to KSM, or the global
counters would count Python's heap.  Regions are the only memory given
MADV_MERGEABLE.  After PR_SET_MEMORY_MERGE=1, which marks *every* compatible
mapping mergeable (6.4, d7597f59d1d3) and every new one too, the agent sweeps
its other mappings back to unmergeable after each command, before replying, so
ksmd (which only runs while every agent is blocked waiting for a command)
never sees them.

Run as ``python -m ksmbench.backends.agent <socket-fd> <name> [--after-exec]``.
A scenario's ``exec`` is a real execve(2) of the agent into itself: the
control socket is made inheritable first and its number passed on the command
line, and the new image answers the ``exec`` request once it is up (and has
swept its interpreter out of KSM's sight, since MMF_VM_MERGE_ANY survives
exec from 6.7 on).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import sys
import time
from typing import Any

import numpy as np

from ..errors import KsmbenchError, NotApplicable, SyscallError
from ..kernel import syscalls
from ..kernel.procfs import FrameReader, ProcFS
from ..scenario.model import Step
from ..scenario.patterns import FillId, Pattern, fill_pages, parse_pattern, write_byte_values

_HEADER = struct.Struct("!I")
#: Scenario regions are placed by us, not by the kernel: ascending addresses
#: in creation order from this base, never reused, one unmapped guard page
#: between regions.  The kernel's top-down placement would put a region into
#: whatever hole the interpreter's own mappings leave (measured on 6.18: a
#: 1-page region landed above earlier regions), and the scan order of ksmd
#: (by address within an mm) decides which pages merge with which, so the
#: emulator must know it.  16 TiB is far below mmap_base and above the heap.
REGION_BASE = 0x1000_0000_0000
#: THP regions start on a PMD (2 MiB) boundary so that they can get huge pages
_PMD_SIZE = 2 << 20
_PMD_PAGES = _PMD_SIZE // syscalls.PAGE_SIZE
#: regions are filled in chunks so a 1 GiB fill does not build 1 GiB of source
_FILL_CHUNK_PAGES = 16384


def send_msg(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def recv_exact(sock: socket.socket, n: int, buf: bytearray | None = None) -> bytes:
    view = memoryview(buf if buf is not None and len(buf) >= n else bytearray(n))[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("peer closed the socket")
        got += k
    return bytes(view)


def recv_msg(sock: socket.socket, buf: bytearray | None = None) -> Any:
    (size,) = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    return pickle.loads(recv_exact(sock, size, buf))


def recv_msg_with_fds(sock: socket.socket, maxfds: int = 1) -> tuple[Any, list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, maxfds)
    if len(head) == 0:
        raise EOFError("peer closed the socket")
    if len(head) < _HEADER.size:
        head += recv_exact(sock, _HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    return pickle.loads(recv_exact(sock, size)), list(fds)


class Agent:
    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name
        self.procfs = ProcFS()
        self.regions: dict[str, syscalls.Region] = {}
        self._frames: FrameReader | None = None
        self._zero_pfn: int | None = None
        self._buf = bytearray(1 << 16)
        self._next_addr = REGION_BASE  # a forked child continues from its parent's value
        #: the scenario step being run (op_step), which names a fill's content
        self._step_id: FillId | None = None
        self._uffd: syscalls.UffdWriteProtect | None = None  # op uffd_wp: one per process
        self._mem_fd: int | None = None  # /proc/self/mem, for write_byte
        #: regions mapped with thp = true (a forked child inherits the set)
        self._thp: set[str] = set()

    # -- plumbing ------------------------------------------------------------
    def frames(self) -> FrameReader:
        if self._frames is None:
            self._frames = FrameReader(self.procfs, os.getpid())
        return self._frames

    def serve(self) -> None:
        while True:
            try:
                request = recv_msg(self.sock, self._buf)
            except (EOFError, ConnectionError):
                os._exit(0)  # the controller is gone: nothing to serve
            op, args = request[0], request[1:]
            fds: list[int] = []
            try:
                result = getattr(self, "op_" + op)(*args)
                if op in ("fork", "spawn"):
                    result, fds = result
                reply = ("ok", result)
            except KsmbenchError as exc:
                reply = ("error", type(exc).__name__, exc.message, exc.hint)
            except Exception as exc:  # report, never die silently
                what = args[0].op if op == "step" else op
                reply = ("error", "KsmbenchError", f"agent {self.name}: {what} failed: "
                         f"{type(exc).__name__}: {exc}", None)
            if op == "exit":
                send_msg(self.sock, reply)
                os._exit(0)
            self.sweep_if_merge_any()
            send_msg(self.sock, reply, fds)
            for fd in fds:
                os.close(fd)

    # -- keeping the interpreter out of KSM's sight ----------------------------
    def sweep_if_merge_any(self) -> None:
        try:
            if syscalls.prctl_get_memory_merge() != 1:
                return
        except SyscallError:
            return  # before 6.4 there is no MERGE_ANY
        spans = [(r.addr, r.addr + r.length) for r in self.regions.values() if r.mapped]
        for _ in range(4):
            foreign = [(s, e) for s, e in self._mergeable_vmas()
                       if not any(rs <= s and e <= re_ for rs, re_ in spans)]
            if not foreign:
                return
            for start, end in foreign:
                try:
                    syscalls.madvise_range(start, end - start, "unmergeable")
                except SyscallError:
                    pass  # special mappings ([vsyscall]) refuse; KSM skips them anyway

    def _mergeable_vmas(self) -> list[tuple[int, int]]:
        out = []
        start = end = 0
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    lo, hi = line.split(" ", 1)[0].split("-")
                    start, end = int(lo, 16), int(hi, 16)
                elif line.startswith("VmFlags:") and " mg" in line:
                    out.append((start, end))
        return out

    # -- ops -------------------------------------------------------------------
    def op_ping(self) -> int:
        return os.getpid()

    def op_step(self, step: Step, scenario: str) -> Any:
        """One scenario step that runs here (``runs_in == "agent"``), as the
        host backend forwards it: ``op_<name>`` gets the step's fields by
        name (model.py's op table), so a new op needs only its method here."""
        self._step_id = FillId(scenario, step.index)
        try:
            return getattr(self, "op_" + step.op)(**step.fields())
        finally:
            self._step_id = None

    def op_mmap(self, region: str, pages: int, thp: bool, node: int | None = None) -> int:
        addr = self._next_addr
        if thp:
            addr = -(-addr // _PMD_SIZE) * _PMD_SIZE
        r = syscalls.Region(pages, addr=addr)
        self._next_addr = addr + r.length + syscalls.PAGE_SIZE
        if node is not None:
            # before any page is faulted in, so that every page lands on the node
            try:
                r.bind(node)
            except SyscallError:
                r.munmap()
                raise
        # THP would let a zero-filled region merge over more scans; regions are
        # NOHUGEPAGE unless the scenario asks for THP.  A THP region is
        # MADV_HUGEPAGE only while this agent writes into it (_thp_writes), so
        # khugepaged never finds it eligible while ksmd runs: a chunk KSM split
        # is not collapsed again behind the scenario's back.
        r.madvise("nohugepage")
        self.regions[region] = r
        if thp:
            self._thp.add(region)
        return r.addr

    def _vma_edges(self) -> set[int]:
        """Start and end addresses of every VMA of this process."""
        edges: set[int] = set()
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = line.split(" ", 1)[0].split("-")
                edges.update((int(lo, 16), int(hi, 16)))
        return edges

    def _thp_writes(self, region: str, first: int, end: int, write) -> None:
        """``write()`` pages [first, end) of a region; in a THP region, each
        2 MiB chunk the write touches first (no page of it present) and that one
        VMA covers whole is made MADV_HUGEPAGE for the write, and must then be
        one huge page (do_huge_pmd_anonymous_page()).  A chunk that fell back
        to 4 KiB pages (no huge page free, THP disabled) makes the scenario not
        applicable: it says nothing about KSM, and the emulator predicts a huge
        page there."""
        if region not in self._thp:
            write()
            return
        r = self.regions[region]
        frames = self.frames()
        edges = self._vma_edges()
        fresh = []
        for c in range(first - first % _PMD_PAGES, end, _PMD_PAGES):
            if c + _PMD_PAGES > r.npages:
                continue
            lo, hi = r.addr + c * syscalls.PAGE_SIZE, r.addr + (c + _PMD_PAGES) * syscalls.PAGE_SIZE
            if any(lo < e < hi for e in edges) or (frames.frames(lo, _PMD_PAGES) >= 0).any():
                continue
            fresh.append(c)
        for c in fresh:
            r.madvise("hugepage", c, c + _PMD_PAGES)
        try:
            write()
        finally:
            for c in fresh:
                r.madvise("nohugepage", c, c + _PMD_PAGES)
        for c in fresh:
            got = int(np.count_nonzero(frames.thp_mask(r.addr + c * syscalls.PAGE_SIZE, _PMD_PAGES)))
            if got != _PMD_PAGES:
                raise NotApplicable(
                    f"region '{region}' pages {c}-{c + _PMD_PAGES - 1}: the first write got "
                    f"{got} of {_PMD_PAGES} pages in a huge page (the THP allocation fell back "
                    "to 4 KiB pages)",
                    hint="check /sys/kernel/mm/transparent_hugepage/enabled and free memory "
                         "(AnonHugePages in /proc/meminfo)")

    def op_fill(self, region: str, first: int, end: int, pattern: Pattern | str,
                scenario: str | None = None, step: int = 0) -> None:
        """``scenario`` and ``step`` name the fill (``unique`` content);
        within :meth:`op_step` they are the step's own."""
        r = self.regions[region]
        pat = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        fill = FillId(scenario, step) if scenario is not None else self._step_id
        total = end - first

        def write() -> None:
            for offset in range(0, total, _FILL_CHUNK_PAGES):
                n = min(_FILL_CHUNK_PAGES, total - offset)
                pages = fill_pages(pat, n, fill, offset=offset)
                r.write_pages(first + offset, pages)

        self._thp_writes(region, first, end, write)

    def op_read(self, region: str, first: int, end: int) -> None:
        self.regions[region].read_pages(first, end)

    def op_madvise(self, region: str, first: int, end: int, advice: str) -> None:
        if advice in ("free", "pageout"):
            # a folio still in another CPU's LRU batch cannot be made lazy-free
            # or isolated for reclaim (syscalls.drain_lru_batches)
            syscalls.drain_lru_batches()
        self.regions[region].madvise(advice, first, end)

    # --- the VMA ops: mprotect, mremap, write_byte, madvise advices -------------
    def op_mprotect(self, region: str, first: int, end: int, prot: str) -> None:
        self.regions[region].mprotect(prot, first, end)

    def op_mremap(self, region: str, pages: int, move: bool) -> int:
        """Grow or shrink in place, or move to the next free address (the
        emulator places a moved region where a new one would go)."""
        r = self.regions[region]
        if move:
            addr = self._next_addr
            r.mremap(pages, new_addr=addr)
            self._next_addr = addr + r.length + syscalls.PAGE_SIZE
        else:
            grows_top = r.addr + r.length + syscalls.PAGE_SIZE == self._next_addr
            r.mremap(pages)
            if grows_top:
                self._next_addr = r.addr + r.length + syscalls.PAGE_SIZE
        return r.addr

    def op_write_byte(self, region: str, first: int, end: int, pattern: Pattern | str) -> None:
        pat = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        values = write_byte_values(pat, end - first)
        if self._mem_fd is None:
            self._mem_fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        self._thp_writes(region, first, end, lambda: self.regions[region].write_byte_forced(
            self._mem_fd, values, first))
    # --- end of the VMA ops -----------------------------------------------------

    def op_prctl(self, merge: bool) -> None:
        syscalls.prctl_set_memory_merge(merge)

    def op_munmap(self, region: str) -> None:
        self.regions.pop(region).munmap()
        self._thp.discard(region)

    def op_write_byte_per_page(self, region: str, value: int, first: int, end: int) -> None:
        self.regions[region].write_byte_per_page(value, first, end)

    def op_timed(self, op: str, *args: Any) -> int:
        """Run another op; return the nanoseconds it took inside this process
        (benchmarks time unmerge and CoW faults without the socket round trip)."""
        fn = getattr(self, "op_" + op)
        t0 = time.perf_counter_ns()
        fn(*args)
        return time.perf_counter_ns() - t0

    def op_sentinel(self) -> int:
        """Register this mm with KSM without giving ksmd anything to scan."""
        r = syscalls.Region(1)
        r.madvise("mergeable")  # never touched: no anon_vma, no rmap items
        self.regions["__sentinel__"] = r
        return os.getpid()

    def op_fork(self, child: str):
        """A scenario's fork: the child inherits every region, and may outlive us."""
        return self._fork(child, die_with_parent=False)

    def op_spawn(self, name: str):
        """A fresh agent forked from this pre-started one (the zygote).

        Much cheaper than starting an interpreter and importing numpy, which
        takes seconds in a TCG guest.  The zygote has no regions and never
        touches KSM, so its children start as clean as a new process.
        """
        return self._fork(name, die_with_parent=True)

    def _fork(self, name: str, *, die_with_parent: bool):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the child agent
            try:
                if die_with_parent:
                    syscalls.prctl_set_pdeathsig(signal.SIGKILL)
                mine.close()
                self.sock.close()
                self.sock = theirs
                self.name = name
                if self._mem_fd is not None:  # /proc/self/mem was the parent's too
                    os.close(self._mem_fd)
                    self._mem_fd = None
                if self._frames is not None:  # /proc/self/pagemap was the parent's
                    self._frames.close()
                    self._frames = None
                if self._uffd is not None:  # the parent's userfaultfd acts on the parent's mm
                    self._uffd.close()
                    self._uffd = None
                send_msg(self.sock, ("ok", os.getpid()))
                self.serve()
            finally:
                os._exit(0)
        theirs.close()
        return pid, [mine.detach()]

    def op_exit(self) -> None:
        return None

    # -- op "exec" ----------------------------------------------------
    def op_exec(self) -> None:
        """execve() this agent again.  Only the control socket crosses: every
        other descriptor is close-on-exec (PEP 446), and the uffd is opened
        with O_CLOEXEC.  The new image replies to this request (see main)."""
        fd = self.sock.fileno()
        os.set_inheritable(fd, True)
        try:
            os.execv(sys.executable, [sys.executable, "-m", "ksmbench.backends.agent",
                                      str(fd), self.name, "--after-exec"])
        finally:  # only reached when execv failed
            os.set_inheritable(fd, False)

    # -- op "uffd_wp" ---------------------------------------------------
    def op_uffd_wp(self, region: str, first: int, end: int) -> None:
        if self._uffd is None:
            try:
                self._uffd = syscalls.UffdWriteProtect()
            except SyscallError as exc:
                raise NotApplicable(f"userfaultfd write-protect is unavailable: {exc.message}",
                                    hint=exc.hint) from None
        r = self.regions[region]
        self._uffd.protect(r.addr + first * syscalls.PAGE_SIZE, (end - first) * syscalls.PAGE_SIZE)
    # -- end of exec and uffd_wp --------------------------------------------------

    def op_observe(self) -> dict[str, Any]:
        stat = self.procfs.ksm_stat("self")
        regions = {}
        region_anon = 0
        if self.regions:
            zero = self.zero_pfn()
            for name, r in self.regions.items():
                if name.startswith("__"):
                    continue
                m = self.frames().region_metrics(r.addr, r.npages, [zero])
                regions[name] = m.__dict__.copy()
                if name in self._thp:
                    regions[name]["thp"] = int(np.count_nonzero(
                        self.frames().thp_mask(r.addr, r.npages)))
                region_anon += m.present - m.zero_pfn
        rss, walked = self._rss_pair()
        scenario_rss = None if rss is None or walked is None else rss - walked + region_anon
        return {"ksm_stat": stat, "rss_anon_pages": rss,
                "rss_anon_scenario_pages": scenario_rss, "regions": regions}

    def zero_pfn(self) -> int:
        if self._zero_pfn is None:
            self._zero_pfn = self.frames().discover_zero_pfn()
        return self._zero_pfn

    def _rss_pair(self) -> tuple[int | None, int | None]:
        """RssAnon (the counter) and the page-table walk's count, same instant.

        Reading allocates, so the interpreter may fault a page in between, and
        after op reclaim its own swapped-out pages come back as it runs: take
        walk, counter, walk, counter, walk, and keep them only when the three
        walks agree and so do the two counters.  A difference that lasts
        through such a window is measured as it is (after op reclaim Debian
        6.12 has shown one, ksmbench.metrics.UNMODELLED).
        """
        for _ in range(8):
            first = self.procfs.anonymous_pages("self")
            rss = self.procfs.rss_anon_pages("self")
            middle = self.procfs.anonymous_pages("self")
            again = self.procfs.rss_anon_pages("self")
            last = self.procfs.anonymous_pages("self")
            if first == middle == last and rss == again:
                return rss, last
        return rss, last


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller handles Ctrl-C
    # children (spawned agents, scenario forks) are reaped automatically; the
    # controller learns of their exit through a pidfd
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    fd, name = int(argv[1]), argv[2]
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    agent = Agent(sock, name)
    if "--after-exec" in argv[3:]:
        # the reply to the "exec" request that replaced the previous image
        agent.sweep_if_merge_any()
        send_msg(sock, ("ok", os.getpid()))
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
