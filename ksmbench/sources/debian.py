"""Debian's kernels and kernel sources, through a private apt configuration.

``--kernel debian:6.12`` needs the newest generic amd64 kernel of the 6.12
series that Debian ships today, in whichever suite it is (bookworm, trixie,
their backports, sid, experimental).  Package names and versions move with
every upload, so nothing here hard-codes them: the suites, the mirror and the
package-name patterns are data (``catalogue.toml``, shipped in this package),
and the packages are resolved against the archive's current, signed indexes
at run time.

Everything lives under the cache root (:func:`.cache.cache_root`:
``$KSMBENCH_CACHE``, default ``~/.cache/ksmbench``)::

    apt/          apt.conf, sources.list, lists/ (the indexes), cache/, status
    debs/         downloaded .deb files (checked against the SHA256 of the index)
    kernels/      unpacked kernel packages: <package>_<version>/{boot,lib/modules}
    sources/      unpacked source trees: linux-source-X.Y_<version>/linux-source-X.Y/

apt reads only our own ``apt.conf`` (``APT_CONFIG``): our sources.list, no
source parts, no pinning, our own lists/cache/status directories.  The
machine's ``apt.conf.d`` is still read, so a configured proxy keeps working;
the machine's sources and package state are never read or changed.

Used by the VM backend (kernels) and by the selftest and page-types helpers
(sources).  The API (``DebianArchive`` and its methods) is kept stable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..console import esc
from ..errors import KernelNotFound, KsmbenchError, os_boundary, run_tool
from ..waiting import flock_exclusive
from .cache import cache_root
from .packaged import packaged_file

#: the catalogue shipped with the package (``KSMBENCH_CATALOGUE`` names another)
CATALOGUE_FILE = packaged_file(__package__, "catalogue.toml")

UPDATE_TIMEOUT = 300.0
DOWNLOAD_TIMEOUT = 1800.0
UNPACK_TIMEOUT = 600.0


class ArchiveError(KsmbenchError):
    """The Debian archive could not be reached, or a package could not be fetched."""


# -- Debian version ordering ---------------------------------------------------------

def _order(c: str) -> int:
    # dpkg's ordering of one character of a non-digit part: '~' sorts before
    # everything (even the end of the part), letters before other characters
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    ia = ib = 0
    while ia < len(a) or ib < len(b):
        while (ia < len(a) and not a[ia].isdigit()) or (ib < len(b) and not b[ib].isdigit()):
            ca = _order(a[ia]) if ia < len(a) and not a[ia].isdigit() else 0
            cb = _order(b[ib]) if ib < len(b) and not b[ib].isdigit() else 0
            if ca != cb:
                return ca - cb
            ia += 1
            ib += 1
        ja, jb = ia, ib
        while ia < len(a) and a[ia].isdigit():
            ia += 1
        while ib < len(b) and b[ib].isdigit():
            ib += 1
        na, nb = int(a[ja:ia] or 0), int(b[jb:ib] or 0)
        if na != nb:
            return na - nb
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e or 0)
    if "-" in v:
        upstream, revision = v.rsplit("-", 1)
    else:
        upstream, revision = v, ""
    return epoch, upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Compare two Debian versions as dpkg does: <0, 0 or >0."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)


class DebianVersion:
    """A Debian version string with dpkg's ordering (for ``sorted``/``max``)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __lt__(self, other: "DebianVersion") -> bool:
        return compare_versions(self.text, other.text) < 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DebianVersion) and compare_versions(self.text, other.text) == 0

    def __hash__(self) -> int:
        return hash(self.text)


def series_of(version: str) -> str | None:
    """``"6.12.57-1"`` -> ``"6.12"``; ``"7.3~rc7-1~exp1"`` -> ``"7.3"``."""
    _, upstream, _ = _split_version(version)
    m = re.match(r"(\d+)\.(\d+)", upstream)
    return f"{m[1]}.{m[2]}" if m else None


def _series_key(series: str) -> tuple[int, int]:
    major, minor = series.split(".")
    return int(major), int(minor)


# -- packages --------------------------------------------------------------------------

@dataclass(frozen=True)
class DebPackage:
    """One binary package version as listed in a suite's Packages index."""

    name: str
    version: str
    suite: str
    filename: str  # path below the mirror
    size: int
    sha256: str
    #: names in Depends (alternatives flattened): since Debian's 6.19 packaging the
    #: image package is a small package depending on linux-binary-* and linux-modules-*
    depends: tuple[str, ...] = ()

    @property
    def series(self) -> str | None:
        return series_of(self.version)

    @property
    def deb_name(self) -> str:
        return Path(self.filename).name

    def describe(self) -> str:
        return f"{self.name} {self.version} ({self.suite})"


@dataclass(frozen=True)
class FetchedKernel:
    """An unpacked kernel package: what virtme-ng needs to boot it."""

    package: DebPackage
    root: Path        # the unpacked tree (has boot/ and lib/modules/)
    vmlinuz: Path
    modules_dir: Path  # root/lib/modules/<release>
    release: str


@dataclass(frozen=True)
class Catalogue:
    mirror: str
    keyring: str
    components: tuple[str, ...]
    architecture: str
    suites: tuple[str, ...]
    refresh_seconds: float
    kernel_image_pattern: str
    source_pattern: str
    kernel_parts_pattern: str

    @classmethod
    def load(cls, path: Path | None = None) -> "Catalogue":
        path = Path(os.environ.get("KSMBENCH_CATALOGUE", path or CATALOGUE_FILE))
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise KsmbenchError(f"the kernel catalogue {path} is missing",
                                hint="unset KSMBENCH_CATALOGUE, or reinstall ksmbench "
                                     "(the catalogue ships in ksmbench/sources/)") from None
        except tomllib.TOMLDecodeError as exc:
            raise KsmbenchError(f"the kernel catalogue {path} is not valid TOML: {exc}") from None
        return cls(mirror=data["mirror"].rstrip("/"), keyring=data["keyring"],
                   components=tuple(data["components"]), architecture=data["architecture"],
                   suites=tuple(data["suites"]), refresh_seconds=float(data["refresh_seconds"]),
                   kernel_image_pattern=data["kernel_image_pattern"],
                   source_pattern=data["source_pattern"],
                   kernel_parts_pattern=data["kernel_parts_pattern"])


def parse_packages(text: str, suite: str, wanted: re.Pattern[str]) -> list[DebPackage]:
    """The stanzas of a Packages index whose package name matches ``wanted``."""
    out = []
    for stanza in text.split("\n\n"):
        if not stanza.startswith("Package: "):
            stanza = stanza.lstrip("\n")
            if not stanza.startswith("Package: "):
                continue
        name = stanza[9:stanza.find("\n")] if "\n" in stanza else stanza[9:]
        if not wanted.match(name.strip()):
            continue
        fields = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ": " not in line:
                continue
            key, value = line.split(": ", 1)
            fields[key] = value.strip()
        depends = tuple(alt.split("(")[0].split(":")[0].strip()
                        for group in fields.get("Depends", "").split(",") if group.strip()
                        for alt in group.split("|"))
        try:
            out.append(DebPackage(fields["Package"], fields["Version"], suite, fields["Filename"],
                                  int(fields["Size"]), fields["SHA256"], depends))
        except (KeyError, ValueError):
            continue  # an incomplete stanza cannot be fetched safely
    return out


def select_kernel(packages: Iterable[DebPackage], series: str, pattern: str,
                  complete: Callable[[DebPackage], bool] = lambda p: True) -> DebPackage | None:
    """The newest generic image package of ``series`` (e.g. "6.12"), or None.

    Among all suites, the highest Debian version wins; for that version an
    ``-unsigned`` package is preferred to its signed twin (same kernel).
    ``complete`` filters out packages that cannot be fetched whole (a split
    package whose modules package is missing from the lists).
    """
    regex = re.compile(pattern)
    candidates = [p for p in packages if regex.match(p.name) and p.series == series and complete(p)]
    if not candidates:
        return None  # type: ignore[return-value]
    newest = max(DebianVersion(p.version) for p in candidates)
    best = [p for p in candidates if DebianVersion(p.version) == newest]
    best.sort(key=lambda p: (0 if regex.match(p.name)["unsigned"] else 1, p.suite))
    return best[0]


def select_source(packages: Iterable[DebPackage], series: str, pattern: str) -> DebPackage | None:
    """The closest ``linux-source-X.Y``: the same series if any, else the nearest one
    (by major then minor; on a tie the newer), newest version of it."""
    regex = re.compile(pattern)
    by_series: dict[str, list[DebPackage]] = {}
    for p in packages:
        m = regex.match(p.name)
        if m:
            by_series.setdefault(m["series"], []).append(p)
    if not by_series:
        return None
    want = _series_key(series)

    def distance(s: str) -> tuple[int, int, int]:
        k = _series_key(s)
        return (abs(k[0] - want[0]), abs(k[1] - want[1]) if k[0] == want[0] else abs(k[1]),
                -k[0] * 1000 - k[1])

    chosen = min(by_series, key=distance)
    return max(by_series[chosen], key=lambda p: DebianVersion(p.version))


def kernel_series(packages: Iterable[DebPackage], pattern: str,
                  complete: Callable[[DebPackage], bool] = lambda p: True) -> dict[str, DebPackage]:
    """series -> the package ``debian:<series>`` resolves to (by series, oldest first)."""
    packages = list(packages)
    regex = re.compile(pattern)
    found = sorted({p.series for p in packages if regex.match(p.name) and p.series},
                   key=_series_key)
    chosen = {s: select_kernel(packages, s, pattern, complete) for s in found}
    return {s: p for s, p in chosen.items() if p is not None}


# -- the archive ---------------------------------------------------------------------

class DebianArchive:
    """Debian's archive seen through a private apt configuration under ``cache_dir``."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, *,
                 catalogue: Catalogue | None = None, console=None):
        self.cache = Path(cache_dir) if cache_dir else cache_root()
        self.catalogue = catalogue or Catalogue.load()
        self.apt_dir = self.cache / "apt"
        self.console = console
        self._index: list[DebPackage] | None = None

    # -- apt configuration ----------------------------------------------------------
    def _write_config(self) -> Path:
        c = self.catalogue
        with os_boundary(f"creating the apt cache {self.apt_dir}"):
            for sub in ("lists/partial", "cache/archives/partial", "etc"):
                (self.apt_dir / sub).mkdir(parents=True, exist_ok=True)
            status = self.apt_dir / "status"
            if not status.exists():
                status.write_text("")
            sources = "".join(
                f"deb [signed-by={c.keyring} arch={c.architecture}] {c.mirror} {suite} "
                f"{' '.join(c.components)}\n" for suite in c.suites)
            _write_if_changed(self.apt_dir / "etc" / "sources.list", sources)
            conf = "\n".join([
                "// ksmbench's private apt configuration: never the machine's sources or state",
                f'Dir::Etc::SourceList "{self.apt_dir}/etc/sources.list";',
                'Dir::Etc::SourceParts "/dev/null";',
                'Dir::Etc::Preferences "/dev/null";',
                'Dir::Etc::PreferencesParts "/dev/null";',
                f'Dir::State "{self.apt_dir}";',
                f'Dir::State::Lists "{self.apt_dir}/lists";',
                f'Dir::State::status "{self.apt_dir}/status";',
                f'Dir::Cache "{self.apt_dir}/cache";',
                f'APT::Architecture "{c.architecture}";',
                f'APT::Architectures {{ "{c.architecture}"; }};',
                'Acquire::Languages "none";',
                # our directories are root's: skip the _apt sandbox (a warning otherwise)
                'APT::Sandbox::User "root";',
                "",
            ])
            path = self.apt_dir / "apt.conf"
            _write_if_changed(path, conf)
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["APT_CONFIG"] = str(self._write_config())
        env["LC_ALL"] = "C"
        return env

    @contextmanager
    def _locked(self, what: str, timeout: float = 900.0) -> Iterator[None]:
        """One ksmbench process at a time changes the cache (flock, dropped on death)."""
        with os_boundary(f"creating {self.cache}"):
            self.cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flock_exclusive(fd, timeout=timeout, on_timeout=lambda: ArchiveError(
                f"timed out after {timeout:.0f} s waiting for another ksmbench process to "
                f"finish with {self.cache} ({what})"))
            yield
        finally:
            os.close(fd)

    # -- indexes -------------------------------------------------------------------
    def _stamp(self) -> Path:
        return self.apt_dir / "updated"

    def lists_age(self) -> float | None:
        """Seconds since the last successful update, None if never."""
        try:
            return time.time() - self._stamp().stat().st_mtime
        except FileNotFoundError:
            return None

    def update(self, *, force: bool = False, timeout: float = UPDATE_TIMEOUT) -> bool:
        """Refresh the indexes when older than the catalogue's refresh period.

        Returns True when apt really ran.  Bounded by ``timeout``; if the
        archive cannot be reached but older indexes exist, they are used.
        """
        age = self.lists_age()
        if not force and age is not None and age < self.catalogue.refresh_seconds:
            return False
        with self._locked("apt-get update"):
            age = self.lists_age()
            if not force and age is not None and age < self.catalogue.refresh_seconds:
                return False
            with _status(self.console, "updating Debian package lists"):
                try:
                    proc = subprocess.run(["apt-get", "-q", "update"], env=self._env(),
                                          capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc = None
                except FileNotFoundError:
                    raise ArchiveError("apt-get is not installed",
                                       hint="ksmbench fetches Debian kernels with apt") from None
            failed = proc is None or proc.returncode != 0 or "\nW: Failed" in (proc.stdout + proc.stderr) \
                or "\nE: " in "\n" + proc.stderr
            if failed:
                why = ("timed out after %.0f s" % timeout if proc is None
                       else _last_line(proc.stderr or proc.stdout))
                if age is not None:
                    _warn(self.console, f"apt-get update failed ({why}); using package lists "
                                        f"from {age / 3600:.0f} h ago")
                    return False
                raise ArchiveError(f"apt-get update of the Debian archive failed: {why}",
                                   hint=f"check that {self.catalogue.mirror} is reachable")
            self._stamp().touch()
            self._index = None
            return True

    def _index_files(self) -> list[tuple[str, Path]]:
        proc = subprocess.run(
            ["apt-get", "indextargets", "--format", "$(RELEASE)\t$(FILENAME)",
             "Identifier: Packages"],
            env=self._env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ArchiveError(f"apt-get indextargets failed: {_last_line(proc.stderr)}")
        out = []
        for line in proc.stdout.splitlines():
            if "\t" in line:
                suite, filename = line.split("\t", 1)
                if Path(filename).exists():
                    out.append((suite, Path(filename)))
        return out

    def packages(self) -> list[DebPackage]:
        """Kernel image and kernel source packages of every suite (cached per index state)."""
        if self._index is not None:
            return self._index
        if self.lists_age() is None:
            self.update()
        files = self._index_files()
        key = [[suite, str(f), f.stat().st_mtime_ns] for suite, f in files]
        key.append(["catalogue", self.catalogue.kernel_image_pattern,
                    self.catalogue.source_pattern, self.catalogue.kernel_parts_pattern])
        cache_file = self.apt_dir / "kernel-index.json"
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                self._index = [DebPackage(**{**p, "depends": tuple(p.get("depends", ()))})
                               for p in cached["packages"]]
                return self._index
        except (OSError, ValueError, TypeError):
            pass
        wanted = re.compile(f"(?:{self.catalogue.kernel_image_pattern})|"
                            f"(?:{self.catalogue.source_pattern})|"
                            f"(?:{self.catalogue.kernel_parts_pattern})")
        index: list[DebPackage] = []
        with _status(self.console, "reading Debian package lists"):
            for suite, f in files:
                # the lists may be kept compressed (Acquire::GzipIndexes): apt-helper reads any
                proc = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(f)],
                                      env=self._env(), capture_output=True, timeout=120)
                if proc.returncode != 0:
                    raise ArchiveError(f"reading {f} failed: {_last_line(proc.stderr.decode())}")
                index.extend(parse_packages(proc.stdout.decode("utf-8", "replace"), suite, wanted))
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "packages": [p.__dict__ for p in index]}))
        os.replace(tmp, cache_file)
        self._index = index
        return index

    # -- kernels ---------------------------------------------------------------------
    def kernel_series(self) -> dict[str, DebPackage]:
        """``{"6.1": package, "6.12": package, ...}``: what ``debian:<series>`` resolves to."""
        return kernel_series(self.packages(), self.catalogue.kernel_image_pattern, self.is_complete)

    def resolve_kernel(self, series: str) -> DebPackage:
        """The package ``debian:<series>`` means today (newest across all suites)."""
        _check_series(series)
        self.update()
        pkg = select_kernel(self.packages(), series, self.catalogue.kernel_image_pattern,
                            self.is_complete)
        if pkg is None:
            have = ", ".join(self.kernel_series()) or "none"
            raise KernelNotFound(f"no Debian kernel package of the {series} series in "
                                 f"{', '.join(self.catalogue.suites)}",
                                 hint=f"available series: {have} (see: ksmbench kernels)")
        return pkg

    def kernel_parts(self, pkg: DebPackage) -> list[DebPackage]:
        """The packages that together make the kernel: the image package and, for
        Debian's split packaging (6.19 and later), its linux-binary-*/linux-modules-*."""
        regex = re.compile(self.catalogue.kernel_parts_pattern)
        parts = [pkg]
        for name in pkg.depends:
            if not regex.match(name):
                continue
            same = [p for p in self.packages() if p.name == name and p.version == pkg.version]
            if not same:
                raise ArchiveError(f"{pkg.describe()} needs {name} {pkg.version}, "
                                   "which the package lists do not have",
                                   hint="the archive may be mid-upload; retry later")
            parts.append(same[0])
        return parts

    def is_complete(self, pkg: DebPackage) -> bool:
        """Every part of the kernel is in the lists (the archive can list an image
        package whose linux-modules-* package is gone: such a kernel is skipped)."""
        try:
            self.kernel_parts(pkg)
        except ArchiveError:
            return False
        return True

    def kernel_dir(self, pkg: DebPackage) -> Path:
        return self.cache / "kernels" / f"{pkg.name}_{pkg.version}"

    def cached_kernel(self, pkg: DebPackage) -> FetchedKernel | None:
        root = self.kernel_dir(pkg)
        if not (root / ".complete").exists():
            return None
        return _describe_kernel(pkg, root)

    def cached_kernels(self) -> list[Path]:
        base = self.cache / "kernels"
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if (p / ".complete").exists())

    def fetch_kernel(self, pkg: DebPackage) -> FetchedKernel:
        """Download (once) and unpack (once) a kernel image package."""
        have = self.cached_kernel(pkg)
        if have is not None:
            return have
        with self._locked(f"fetching {pkg.name}"):
            have = self.cached_kernel(pkg)
            if have is not None:
                return have
            debs = [self.download(part) for part in self.kernel_parts(pkg)]
            root = self.kernel_dir(pkg)
            tmp = root.with_name(root.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            root.parent.mkdir(parents=True, exist_ok=True)
            for deb in debs:
                with _status(self.console, f"unpacking {deb.name}"):
                    _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}",
                         timeout=UNPACK_TIMEOUT)
            # trixie and later keep modules under usr/lib/modules; virtme-ng looks
            # for lib/modules next to the image's root
            if not (tmp / "lib").exists() and (tmp / "usr" / "lib").is_dir():
                (tmp / "lib").symlink_to("usr/lib")
            _describe_kernel(pkg, tmp)  # refuse a package without an image
            (tmp / ".complete").write_text(json.dumps(pkg.__dict__) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
            return _describe_kernel(pkg, root)

    # -- sources ---------------------------------------------------------------------
    def resolve_source(self, series: str) -> DebPackage:
        """The closest ``linux-source-X.Y`` package to ``series`` (newest version of it)."""
        _check_series(series)
        self.update()
        pkg = select_source(self.packages(), series, self.catalogue.source_pattern)
        if pkg is None:
            raise KernelNotFound("no linux-source-X.Y package in "
                                 f"{', '.join(self.catalogue.suites)}")
        return pkg

    def fetch_source(self, series: str, members: Sequence[str] | None = None) -> Path:
        """The unpacked source tree of the closest ``linux-source`` package.

        ``members``: paths inside the tree to extract (e.g.
        ``["tools/testing/selftests/mm", "tools/mm", "tools/include"]``); None
        extracts the whole tree.  Parts extracted earlier are kept and not
        extracted again.  Returns the tree's root (``.../linux-source-X.Y``).
        """
        pkg = self.resolve_source(series)
        top = pkg.name  # the tarball's top directory is the package name
        base = self.cache / "sources" / f"{pkg.name}_{pkg.version}"
        tree = base / top
        stamp = base / ".extracted.json"

        def extracted() -> list[str]:
            try:
                return json.loads(stamp.read_text())
            except (OSError, ValueError):
                return []

        def covered(done: list[str]) -> bool:
            if "" in done:
                return True
            return members is not None and all(
                any(m.strip("/") == d or m.strip("/").startswith(d + "/") for d in done)
                for m in members)

        if covered(extracted()):
            return tree
        with self._locked(f"extracting {pkg.name}"):
            done = extracted()
            if covered(done):
                return tree
            deb = self.download(pkg)
            base.mkdir(parents=True, exist_ok=True)
            wanted = [""] if members is None else [m.strip("/") for m in members]
            _extract_source(deb, top, base, None if members is None else wanted,
                            console=self.console)
            stamp.write_text(json.dumps(sorted(set(done) | set(wanted))))
        return tree

    # -- downloads -------------------------------------------------------------------
    def download(self, pkg: DebPackage) -> Path:
        """The .deb of ``pkg`` in the cache, downloaded and SHA256-checked if missing."""
        debs = self.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        dest = debs / pkg.deb_name
        if dest.exists() and dest.stat().st_size == pkg.size:
            return dest
        url = f"{self.catalogue.mirror}/{pkg.filename}"
        tmp = dest.with_suffix(".partial")
        digest = hashlib.sha256()
        deadline = time.monotonic() + DOWNLOAD_TIMEOUT
        opener = urllib.request.build_opener(*self._proxy_handlers())
        try:
            with opener.open(url, timeout=60) as resp, open(tmp, "wb") as out, \
                    _download_progress(self.console, pkg.deb_name, pkg.size) as advance:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
                    if time.monotonic() > deadline:
                        raise ArchiveError(f"downloading {url} took longer than "
                                           f"{DOWNLOAD_TIMEOUT:.0f} s")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ArchiveError(f"downloading {url} failed: {exc}",
                               hint=f"check that {self.catalogue.mirror} is reachable") from None
        if digest.hexdigest() != pkg.sha256:
            tmp.unlink(missing_ok=True)
            raise ArchiveError(f"{pkg.deb_name}: SHA256 does not match the signed index",
                               hint="retry; if it persists the mirror is broken")
        os.replace(tmp, dest)
        return dest

    def _proxy_handlers(self) -> list:
        """An HTTP proxy configured for apt (Acquire::http::Proxy) is used for downloads too."""
        try:
            proc = subprocess.run(["apt-config", "shell", "PROXY", "Acquire::http::Proxy"],
                                  env=self._env(), capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return []
        m = re.search(r"PROXY='([^']+)'", proc.stdout)
        if not m or m[1] in ("DIRECT", "false"):
            return []
        return [urllib.request.ProxyHandler({"http": m[1], "https": m[1]})]


# -- helpers --------------------------------------------------------------------------

def _check_series(series: str) -> None:
    if not re.fullmatch(r"\d+\.\d+", series):
        raise KernelNotFound(f"'{series}' is not a kernel series",
                             hint="use major.minor, e.g. debian:6.12")


def _describe_kernel(pkg: DebPackage, root: Path) -> FetchedKernel:
    # boot/vmlinuz-<release> up to Debian's 6.18 packaging; since 6.19 the image is
    # usr/lib/modules/<release>/vmlinuz (linux-binary-*)
    for vmlinuz in sorted((root / "boot").glob("vmlinuz-*")):
        release = vmlinuz.name[len("vmlinuz-"):]
        break
    else:
        found = sorted((root / "usr" / "lib" / "modules").glob("*/vmlinuz")) + \
            sorted((root / "lib" / "modules").glob("*/vmlinuz"))
        if not found:
            raise ArchiveError(f"{pkg.describe()} holds no boot/vmlinuz-* nor lib/modules/*/vmlinuz")
        vmlinuz = found[0]
        release = vmlinuz.parent.name
    modules = root / "lib" / "modules" / release
    if not modules.is_dir():
        modules = root / "usr" / "lib" / "modules" / release
    return FetchedKernel(pkg, root, vmlinuz, modules, release)


def _extract_source(deb: Path, top: str, dest: Path, members: list[str] | None, *, console) -> None:
    """Stream the tarball out of the .deb and extract only ``members`` of it."""
    # the .deb holds ./usr/src/<top>.tar.xz; no intermediate copy is written
    inner = f"./usr/src/{top}.tar.xz"
    what = "all of it" if members is None else ", ".join(members)
    with _status(console, f"extracting {top} ({what})"):
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        outer = subprocess.Popen(["tar", "-xO", "-f", "-", inner], stdin=fsys.stdout,
                                 stdout=subprocess.PIPE)
        fsys.stdout.close()
        argv = ["tar", "-xJ", "-f", "-", "-C", str(dest)]
        if members is not None:
            argv += [f"{top}/{m}" for m in members]
        try:
            proc = subprocess.run(argv, stdin=outer.stdout, capture_output=True, text=True,
                                  timeout=UNPACK_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in (fsys, outer):
                p.kill()
            raise ArchiveError(f"extracting {top} took longer than {UNPACK_TIMEOUT:.0f} s") from None
        finally:
            outer.stdout.close()
        outer.wait(timeout=60)
        fsys.wait(timeout=60)
    if proc.returncode != 0:
        raise ArchiveError(f"extracting {what} from {deb.name} failed: {_last_line(proc.stderr)}",
                           hint="check the member paths (relative to the source tree's top)")


def _run(argv: list[str], what: str, *, timeout: float) -> None:
    run_tool(argv, what, timeout=timeout, error=ArchiveError)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    path.write_text(text)


def _stderr_console(console):
    if console is not None:
        return console
    from ..console import make_console

    return make_console(stderr=True)


@contextmanager
def _status(console, message: str) -> Iterator[None]:
    """A spinner on a terminal; one line otherwise (long work shows progress)."""
    con = _stderr_console(console)
    if con.is_terminal:
        with con.status(esc(message)):
            yield
    else:
        started = time.monotonic()
        yield
        con.print(f"{esc(message)}: done in {time.monotonic() - started:.1f} s")


@contextmanager
def _download_progress(console, name: str, total: int):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    con = _stderr_console(console)
    started = time.monotonic()
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=con,
                  transient=True, disable=not con.is_terminal) as progress:
        task = progress.add_task(f"downloading {name}", total=total)
        yield lambda n: progress.update(task, advance=n)
    if not con.is_terminal:
        con.print(f"downloaded {esc(name)} ({total / 1e6:.1f} MB) in {time.monotonic() - started:.1f} s")


def _warn(console, message: str) -> None:
    _stderr_console(console).print(f"[yellow]warning:[/yellow] {esc(message)}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ksmbench.sources.debian kernel 6.12`` / ``source 6.12 [MEMBER...]``: fetch and print paths."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ksmbench.sources.debian")
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("series")
    s = sub.add_parser("source")
    s.add_argument("series")
    s.add_argument("members", nargs="*")
    args = p.parse_args(argv)
    archive = DebianArchive()
    try:
        if args.what == "kernel":
            fetched = archive.fetch_kernel(archive.resolve_kernel(args.series))
            print(f"{fetched.package.describe()}\n{fetched.vmlinuz}\n{fetched.modules_dir}\n"
                  f"{fetched.release}")
        else:
            print(archive.fetch_source(args.series, args.members or None))
    except KsmbenchError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
