"""Swap for scenarios that ask for it (top-level ``swap = true``).

ksmbench never adds swap to the machine it runs on.  A guest it boots (the
VM backend) gets a zram device: ``zram`` is a module of every Debian kernel
(CONFIG_ZRAM=m) and lives only in the guest's RAM.  The guest prepares it
once (:meth:`ZramSwap.prepare`: modprobe, size, mkswap) and the host backend
in the guest turns it on for each scenario with ``swap = true`` and off again
afterwards, so that every other scenario runs without swap, as the emulator
models it.

zram is a synchronous block device (SWP_SYNCHRONOUS_IO): a page reclaimed by
MADV_PAGEOUT is written and freed within the madvise call, and a swap entry
referenced once is read back without going through the swap cache
(do_swap_page()), so what a scenario observes does not depend on I/O timing.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KsmbenchError, os_boundary, run_tool

#: the environment variable through which the VM backend's guest tells the
#: host backend which swap device it may turn on (set by guest_events)
SWAP_DEVICE_ENV = "KSMBENCH_SWAP_DEVICE"
#: the zram device's size: far more than any built-in scenario swaps out
#: (zram allocates only for what is written)
ZRAM_BYTES = 256 << 20


#: set by the VM backend's guest instead of SWAP_DEVICE_ENV when it could not
#: prepare a swap device: why, for the n/a of every ``swap = true`` scenario
SWAP_UNAVAILABLE_ENV = "KSMBENCH_SWAP_UNAVAILABLE"


def active_swaps(proc_root: str = "/proc") -> list[str]:
    """The swap areas in use (/proc/swaps, without its header line); none on a
    kernel built without CONFIG_SWAP, which has no /proc/swaps (tinyconfig)."""
    path = Path(proc_root, "swaps")
    if not path.exists():
        return []
    with os_boundary(f"reading {path}"):
        lines = path.read_text().splitlines()
    return [line.split()[0] for line in lines[1:] if line.strip()]


def _run(argv: list[str], what: str) -> None:
    run_tool(argv, what, timeout=120, hint="install util-linux and kmod")


class ZramSwap:
    """One zram device used as swap, in a guest only."""

    def __init__(self, device: str = "/dev/zram0"):
        self.device = device
        self.on = False

    @property
    def _sysfs(self) -> Path:
        return Path("/sys/block") / Path(self.device).name

    def prepare(self) -> None:
        """Load zram, size the device and write a swap signature on it."""
        if not Path("/proc/swaps").exists():
            raise KsmbenchError("this kernel has no swap support (CONFIG_SWAP is off)")
        if not self._sysfs.exists():
            _run(["modprobe", "zram", "num_devices=1"], "loading the zram module")
        with os_boundary(f"setting up {self.device}"):
            try:
                # lzo-rle is built into every Debian kernel (CONFIG_CRYPTO_LZO=y);
                # the default lz4 is a module there
                (self._sysfs / "comp_algorithm").write_text("lzo-rle\n")
            except OSError:
                pass  # keep the kernel's default
            (self._sysfs / "disksize").write_text(f"{ZRAM_BYTES}\n")
        _run(["mkswap", self.device], f"mkswap {self.device}")

    def swapon(self) -> None:
        _run(["swapon", self.device], f"swapon {self.device}")
        self.on = True

    def swapoff(self) -> None:
        """Off again: every page still swapped out is read back first."""
        if self.on:
            self.on = False
            _run(["swapoff", self.device], f"swapoff {self.device}")


#: where the guest's cgroup v2 hierarchy is (mounted there if it is not yet)
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: what op "reclaim" asks memory.reclaim for: far more than a scenario holds,
#: so the kernel reclaims all it can and then answers EAGAIN
RECLAIM_BYTES = 1 << 40


class ReclaimCgroup:
    """A memory cgroup holding one scenario's processes, for op ``reclaim``.

    Only in a guest (next to its zram device): creating cgroups and enabling
    the memory controller would change the machine ksmbench runs on.  The
    scenario's first process is moved in before its first step; every process
    it forks is born there.
    """

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, name: str, root: Path = CGROUP_ROOT) -> "ReclaimCgroup":
        if not (root / "cgroup.controllers").exists():
            root.mkdir(parents=True, exist_ok=True)
            _run(["mount", "-t", "cgroup2", "cgroup2", str(root)], f"mounting cgroup2 on {root}")
        with os_boundary(f"creating a memory cgroup under {root}"):
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                raise KsmbenchError(f"the memory controller is not available in {root}",
                                    hint="the kernel needs CONFIG_MEMCG")
            if "memory" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+memory\n")
            path = root / f"ksmbench-{name}"
            path.mkdir()
        return cls(path)

    def add(self, pid: int) -> None:
        with os_boundary(f"moving process {pid} into {self.path}"):
            (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def reclaim(self) -> None:
        """memory.reclaim (5.19+): reclaim until nothing more can be; the
        write then fails with EAGAIN, which is the expected end."""
        import errno
        import os

        fd = None
        with os_boundary(f"writing {self.path}/memory.reclaim"):
            fd = os.open(self.path / "memory.reclaim", os.O_WRONLY)
            try:
                os.write(fd, f"{RECLAIM_BYTES}\n".encode())
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            finally:
                os.close(fd)

    def remove(self, timeout: float = 30.0) -> None:
        """rmdir once its processes are gone (they were killed and reaped)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise KsmbenchError(f"{self.path} still holds processes after "
                                        f"{timeout:.0f} s: {exc.strerror}") from None
                time.sleep(0.05)


#: the multi-gen LRU's switch (CONFIG_LRU_GEN, 6.1+): Debian 6.12 turns it on
#: at boot (CONFIG_LRU_GEN_ENABLED=y), Debian 6.1 builds it but leaves it off
LRU_GEN_ENABLED = Path("/sys/kernel/mm/lru_gen/enabled")


def multigen_lru_on(path: Path = LRU_GEN_ENABLED) -> bool:
    """Whether the multi-gen LRU is on (its enabled mask is not 0x0000)."""
    try:
        return int(path.read_text().strip(), 16) != 0
    except (OSError, ValueError):
        return False


def enable_multigen_lru(path: Path = LRU_GEN_ENABLED) -> bool:
    """Turn the multi-gen LRU on where the kernel has it (guests only: op
    ``reclaim`` needs it, see README "Swap"); True when it is on afterwards."""
    if path.exists() and not multigen_lru_on(path):
        with os_boundary(f"writing {path}"):
            path.write_text("y\n")
    return multigen_lru_on(path)
