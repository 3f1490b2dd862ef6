"""What ``--kernel`` names, turned into something virtme-ng can boot.

* ``debian:<major.minor>``: the newest generic amd64 package of that series in
  Debian's archive (:mod:`ksmbench.sources.debian`), downloaded and unpacked once.
* a path to a bzImage/vmlinuz (``--modules DIR`` for its modules, when it
  has any: the directory holding ``lib/modules/<release>`` or that directory
  itself).

Either way the image is booted from a *boot root*: a directory with
``boot/<image>`` and ``lib/modules/<release>`` holding only the modules the
guest needs to mount its root (9p, overlay, virtio transports) and their
dependencies.  virtme-ng finds modules next to the image; with a distribution
kernel's full module tree, the guest's udev coldplug loads a driver for every
emulated device (AHCI, CD-ROM, watchdog, kvm_amd...), which under TCG took
about 25 s of a 40 s boot here.  With the trimmed tree the same kernel runs a
command in about 15 s.  KSM is built in (CONFIG_KSM=y) in every kernel
ksmbench can use, so no KSM code lives in a module.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...errors import KernelNotFound, VMError, os_boundary, run_tool
from ...waiting import flock_exclusive

#: module aliases the guest needs (virtme-ng's own list: 9p and virtiofs root,
#: virtio console/9p devices, virtio-pci/mmio transports) plus the overlay
#: filesystem virtme-ng uses for the copy-on-write view of /etc, /usr, /tmp...
GUEST_MODULE_ALIASES = (
    "fs-9p", "fs-virtiofs", "fs-overlay", "overlay",
    "virtio:d00000009v00001AF4", "virtio:d00000003v00001AF4",
    "virtio_pci", "virtio_mmio", "virtio_console", "unix",
    # the swap device of scenarios with swap = true (kernel/swap.py): loaded
    # by the guest only when a scenario asks for it, never by udev
    "zram",
)
#: the boot root's directory name; it changes with the module list, so a
#: root trimmed for an older list is built again beside it
_ROOT_NAME = "vmroot-" + hashlib.sha1("\0".join(GUEST_MODULE_ALIASES).encode()).hexdigest()[:8]

_SERIES = re.compile(r"^debian:(\d+\.\d+)$")
#: ``--kernel debian:all``: every series the archive has today
ALL_DEBIAN = "debian:all"


@dataclass(frozen=True)
class BootableKernel:
    """A kernel ready to boot: the image inside its boot root."""

    label: str            # the kernel column: "debian:6.12", or the image path
    image: Path           # what the user named (the Debian vmlinuz or the given path)
    boot_image: Path      # the image inside the boot root (what vng --run gets)
    release: str | None   # uname -r, read from the image header
    package: str | None = None  # "linux-image-... 6.12.57-1 (trixie)" for Debian kernels
    modules: int = 0      # modules in the trimmed tree


def label_for(spec: str) -> str:
    """The kernel label of a ``--kernel`` value (the ``kernel`` column)."""
    if _SERIES.match(spec):
        return spec
    path = Path(spec).expanduser()
    try:
        path = path.resolve()
    except OSError:
        pass
    return str(path)


def safe_name(label: str) -> str:
    """A file-name-safe form of a label (artifact directories)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.")
    if len(name) > 80:
        name = name[-60:] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return name or "kernel"


_available: list[str] | None = None


def debian_series() -> list[str] | None:
    """The Debian kernel series ``debian:<series>`` can name today, oldest first
    (the archive's package lists, refreshed when older than the catalogue says;
    read once per process).  None when the archive cannot be consulted."""
    global _available
    if _available is None:
        from ...sources.debian import DebianArchive, _series_key
        from ...errors import KsmbenchError

        try:
            archive = DebianArchive()
            archive.update()
            _available = sorted(archive.kernel_series(), key=_series_key)
        except KsmbenchError:
            return None
    return list(_available)


def expand_specs(specs: list[str]) -> list[str]:
    """``--kernel`` values with ``debian:all`` replaced by every series in the
    archive (oldest first); duplicates dropped, order otherwise kept."""
    out: list[str] = []
    for spec in specs:
        if spec == ALL_DEBIAN:
            series = debian_series()
            if not series:
                raise KernelNotFound(f"--kernel {ALL_DEBIAN}: the Debian archive's package lists "
                                     "could not be read",
                                     hint="check the network, then see: ksmbench kernels")
            names = [f"debian:{s}" for s in series]
        else:
            names = [spec]
        out += [n for n in names if n not in out]
    return out


def check_spec(spec: str, modules: str | None = None) -> None:
    """Refuse a ``--kernel`` value early (before anything is downloaded or booted)."""
    if spec.startswith("debian:"):
        m = _SERIES.match(spec)
        if not m:
            raise KernelNotFound(f"--kernel {spec}: not a Debian kernel series",
                                 hint="use debian:<major.minor>, e.g. debian:6.12, or debian:all "
                                      "(see: ksmbench kernels)")
        series = debian_series()
        # an archive that cannot be reached is not the user's mistake: resolve()
        # says what failed when it really needs the package
        if series is not None and m[1] not in series:
            raise KernelNotFound(f"--kernel {spec}: Debian has no {m[1]} kernel; available: "
                                 + ", ".join(f"debian:{s}" for s in series) + ", debian:all")
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory, not a kernel image" if path.is_dir() else "no such file"
        raise KernelNotFound(f"--kernel {spec}: {what}",
                             hint="give host, debian:<major.minor>, or the path of a bzImage/vmlinuz")
    if modules is not None and not Path(modules).expanduser().is_dir():
        raise KernelNotFound(f"--modules {modules}: no such directory")


def image_release(path: Path) -> str | None:
    """The release string in an x86 boot image's header (``uname -r``), or None.

    The real-mode header (Documentation/arch/x86/boot.rst) has "HdrS" at
    0x202 and, at 0x20e, the offset (minus 0x200) of the kernel version string
    ("6.12.57+deb13-amd64 (debian-kernel@...) #1 SMP ...").
    """
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                return None
            offset = int.from_bytes(head[0x20E:0x210], "little")
            if offset == 0:
                return None
            f.seek(offset + 0x200)
            text = f.read(256).split(b"\0", 1)[0].decode("ascii", "replace")
    except OSError:
        return None
    release = text.split(" ", 1)[0]
    return release or None


def resolve(spec: str, *, modules: str | None = None, console=None, cache_dir: Path | None = None
            ) -> BootableKernel:
    """Fetch (for ``debian:``) and prepare the boot root of a ``--kernel`` value."""
    from ...sources.cache import cache_root
    from ...sources.debian import DebianArchive

    check_spec(spec, modules)
    cache = Path(cache_dir) if cache_dir else cache_root()
    m = _SERIES.match(spec)
    if m:
        archive = DebianArchive(cache, console=console)
        pkg = archive.resolve_kernel(m[1])
        fetched = archive.fetch_kernel(pkg)
        root = fetched.root / _ROOT_NAME
        boot_image, count = _boot_root(fetched.vmlinuz, fetched.release, fetched.modules_dir, root)
        return BootableKernel(spec, fetched.vmlinuz, boot_image, fetched.release,
                              pkg.describe(), count)
    image = Path(spec).expanduser().resolve()
    release = image_release(image)
    if release is None:
        raise KernelNotFound(f"--kernel {spec}: not an x86 boot image (no 'HdrS' header)",
                             hint="give a bzImage (arch/x86/boot/bzImage) or a vmlinuz")
    digest = _file_digest(image)
    root = cache / "images" / f"{safe_name(image.name)}-{digest[:16]}-{_ROOT_NAME}"
    moddir = _find_modules_dir(Path(modules).expanduser(), release) if modules else None
    boot_image, count = _boot_root(image, release, moddir, root)
    return BootableKernel(label_for(spec), image, boot_image, release, None, count)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_modules_dir(given: Path, release: str) -> Path:
    for candidate in (given, given / release, given / "lib" / "modules" / release,
                      given / "usr" / "lib" / "modules" / release):
        if (candidate / "modules.order").exists() or (candidate / "modules.dep").exists() \
                or (candidate / "kernel").is_dir():
            return candidate
    raise KernelNotFound(f"--modules {given}: no modules of release {release} there",
                         hint=f"give the directory holding lib/modules/{release} "
                              "(make modules_install INSTALL_MOD_PATH=DIR)")


def _boot_root(image: Path, release: str, moddir: Path | None, root: Path) -> tuple[Path, int]:
    """Build (once) ``root/boot/<image>`` + ``root/lib/modules/<release>`` (trimmed)."""
    boot_image = root / "boot" / image.name
    stamp = root / ".complete"
    if stamp.exists() and boot_image.exists():
        return boot_image, int(stamp.read_text().strip() or 0)
    root.parent.mkdir(parents=True, exist_ok=True)
    # several ksmbench processes may prepare the same kernel at once (a run and
    # a selftest): one builds, the others wait for it (flock, dropped on death)
    lock_fd = os.open(root.with_name(root.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        flock_exclusive(lock_fd, timeout=300, on_timeout=lambda: VMError(
            f"timed out after 300 s waiting for another ksmbench process to prepare {root}"))
        if stamp.exists() and boot_image.exists():
            return boot_image, int(stamp.read_text().strip() or 0)
        return _build_boot_root(image, release, moddir, root)
    finally:
        os.close(lock_fd)


def _build_boot_root(image: Path, release: str, moddir: Path | None, root: Path) -> tuple[Path, int]:
    boot_image = root / "boot" / image.name
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with os_boundary(f"preparing the boot root {root}"):
        (tmp / "boot").mkdir(parents=True)
        _link_or_copy(image, tmp / "boot" / image.name)
        count = 0
        if moddir is not None and moddir.is_dir():
            count = _trimmed_modules(moddir, release, tmp / "lib" / "modules" / release)
        stamp_tmp = tmp / ".complete"
        stamp_tmp.write_text(f"{count}\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return boot_image, count


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _trimmed_modules(moddir: Path, release: str, dest: Path) -> int:
    """Copy (hard-link) the modules the guest needs, with their dependencies; run depmod."""
    # modprobe resolves aliases and dependencies against a module tree; it
    # needs modules.dep etc., which Debian packages do not all ship
    base = _modules_base(moddir, release)
    if not (moddir / "modules.dep").exists():
        _run(["depmod", "-a", "-b", str(base), release], "depmod on the kernel's modules")
    files: set[Path] = set()
    for alias in GUEST_MODULE_ALIASES:
        proc = subprocess.run(["modprobe", "--show-depends", "-d", str(base), "-S", release, alias],
                              capture_output=True, text=True, timeout=60)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                files.add(Path(parts[1]))
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / name).exists():
            shutil.copy2(moddir / name, dest / name)
    real_moddir = moddir.resolve()
    for f in sorted(files):
        rel = f.resolve().relative_to(real_moddir)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(f.resolve(), dest / rel)
    _run(["depmod", "-a", "-b", str(dest.parents[2]), release], "depmod on the trimmed modules")
    return len(files)


def _modules_base(moddir: Path, release: str) -> Path:
    """The ``-b`` base for depmod/modprobe: moddir is ``<base>/lib/modules/<release>``."""
    if moddir.name == release and moddir.parent.name == "modules" and moddir.parent.parent.name == "lib":
        return moddir.parents[2]
    raise VMError(f"cannot use {moddir} as a modules directory: expected .../lib/modules/{release}")


def _run(argv: list[str], what: str) -> None:
    run_tool(argv, what, timeout=300, error=VMError, hint="install kmod (vm/install-host-deps)")
