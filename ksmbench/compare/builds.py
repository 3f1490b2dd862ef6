"""Base and patched kernel images from one source tree, cached.

Layout under ``$KSMBENCH_CACHE/validate/``::

    trees/<source>/src          a private copy of the source tree (hard links to
                                Debian's unpacked tree; a real copy of a user's tree)
    trees/<source>/pristine/    the original files while a patch is applied, and
    trees/<source>/applied.json the list of them: a run killed mid-build is
                                repaired by the next one
    images/<base key>/base/     bzImage, config, build.log, build-info.json and
                                build/ (the object tree every variant starts from)
    images/<base key>/variants/<name>-<key>/   bzImage, config, build.log, build-info.json

The base key hashes the source identity (Debian package and version, git
commit plus uncommitted changes, or the file list with sizes and times of a
plain tree) and the config fragment; a variant's key adds its patches'
contents.  A variant is built by applying its patches to the private tree,
building in a copy of the base's object tree (same source path, so the
compiler command lines are unchanged and make recompiles only what the
patches touch), and restoring the touched files with their original times
(so the next variant does not recompile them either).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import KsmbenchError, UsageError, os_boundary

#: build steps: bump when the way images are built changes (invalidates the cache)
RECIPE = "tinyconfig+fragment,bzImage,v1"
#: free space needed before a base build: the object tree of a 6.12 tinyconfig
#: build measured 192 MiB; 2 GiB leaves room for a bigger tree or config, and
#: for the variant's copy of it.  The private tree's hard links need inodes only.
BASE_BUILD_BYTES = 2 << 30
#: free space per variant build on top of a copy of the base object tree
VARIANT_SLACK_BYTES = 256 << 20
PATCH_TIMEOUT = 120.0


class ValidateInputError(KsmbenchError):
    """A validate input is unusable: source, patch, tools or disk space."""


class VariantError(KsmbenchError):
    """A variant could not be judged: its patch, build or boot failed."""


def cache_dir() -> Path:
    from ..sources.cache import cache_root

    return cache_root() / "validate"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_.")[:60] or "x"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


# -- sources ------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelSource:
    spec: str
    tree: Path
    #: what the tree is: Debian package and version, git commit (+ changes), or file stats
    identity: str
    #: copy the tree with hard links (a tree we own and never change in place)
    linkable: bool


def is_kernel_tree(path: Path) -> bool:
    return all((path / p).exists() for p in ("Makefile", "Kconfig", "mm/ksm.c"))


def resolve_source(spec: str, *, console=None) -> KernelSource:
    """``debian-source:X.Y`` or a kernel source directory."""
    if spec.startswith("debian-source:"):
        series = spec.partition(":")[2]
        if not re.fullmatch(r"\d+\.\d+", series):
            raise UsageError(f"SOURCE {spec}: expected debian-source:X.Y, e.g. debian-source:6.12")
        from ..sources.debian import DebianArchive, series_of

        archive = DebianArchive(console=console)
        pkg = archive.resolve_source(series)
        if series_of(pkg.version) != series and console is not None:
            console.print(f"[yellow]note:[/yellow] no linux-source-{series}; using the closest, "
                          f"{pkg.name} {pkg.version}")
        tree = archive.fetch_source(series)
        return KernelSource(spec, tree, f"debian:{pkg.name}_{pkg.version}", linkable=True)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValidateInputError(f"SOURCE {spec}: no such directory",
                                 hint="give a kernel source tree or debian-source:X.Y")
    if not path.is_dir() or not is_kernel_tree(path):
        raise ValidateInputError(f"SOURCE {spec} is not a kernel source tree "
                                 "(no Makefile, Kconfig and mm/ksm.c)",
                                 hint="give the top of a Linux tree or debian-source:X.Y")
    path = path.resolve()
    return KernelSource(spec, path, _tree_identity(path), linkable=False)


def _tree_identity(path: Path) -> str:
    """git commit and a hash of the uncommitted changes, else a hash of every file's
    path, size and mtime (a plain tree)."""
    git = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"],
                         capture_output=True, text=True)
    if git.returncode == 0:
        top, head = git.stdout.split()
        if Path(top).resolve() == path:
            diff = subprocess.run(["git", "-C", str(path), "diff", "HEAD", "--binary"],
                                  capture_output=True).stdout
            untracked = subprocess.run(["git", "-C", str(path), "ls-files", "--others",
                                        "--exclude-standard", "-z"], capture_output=True).stdout
            return f"git:{head}+{_digest(diff, untracked)[:16]}"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            p = Path(root) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"tree:{path}:{h.hexdigest()[:16]}"


# -- patches ------------------------------------------------------------------------

@dataclass(frozen=True)
class Patch:
    path: Path
    description: str
    #: paths inside the tree it touches (after -p1)
    files: tuple[str, ...]
    digest: str

    @property
    def name(self) -> str:
        return self.path.name


def read_patch(path: Path) -> Patch:
    with os_boundary(f"reading the patch {path}"):
        data = path.read_bytes()
    text = data.decode("utf-8", "replace")
    files: list[str] = []
    for line in text.splitlines():
        if line.startswith(("--- ", "+++ ")):
            name = line[4:].split("\t")[0].strip()
            if name == "/dev/null" or "/" not in name:
                continue
            name = name.split("/", 1)[1]  # -p1
            if name not in files:
                files.append(name)
    if not files:
        raise ValidateInputError(f"{path}: not a patch (no '--- a/FILE' / '+++ b/FILE' lines)")
    return Patch(path.resolve(), _description(text, path), tuple(files), _digest(data))


def _description(text: str, path: Path) -> str:
    """The mail's Subject (without [PATCH ...]), else the first line of the header."""
    for line in text.splitlines():
        if line.startswith(("diff ", "--- ", "Index: ")):
            break
        if line.startswith("Subject:"):
            return re.sub(r"^\[[^]]*\]\s*", "", line[8:].strip())
        if line.strip() and not re.match(r"^(From |From:|Date:|Signed-off-by:)", line):
            return line.strip()
    return path.stem


def series_order(directory: Path) -> list[Path]:
    """DIR/series (quilt) order when present, else sorted patch files."""
    from ..backends.vm.build import BuildError, patch_files

    if not directory.is_dir():
        raise ValidateInputError(f"--patches {directory}: no such directory")
    try:
        return patch_files(directory)
    except BuildError as exc:
        raise ValidateInputError(exc.message, hint=exc.hint) from None


@dataclass(frozen=True)
class Variant:
    name: str
    patches: tuple[Patch, ...]

    @property
    def description(self) -> str:
        if len(self.patches) == 1:
            return self.patches[0].description
        return f"{len(self.patches)} patches"

    @property
    def patch_label(self) -> str:
        return " ".join(p.name for p in self.patches)

    def key(self, base_key: str) -> str:
        return _digest(base_key, *(p.digest for p in self.patches))


def variants_from(directory: Path, *, each: bool) -> list[Variant]:
    patches = [read_patch(p) for p in series_order(directory)]
    if each:
        return [Variant(_slug(p.path.stem), (p,)) for p in patches]
    return [Variant(_slug(directory.resolve().name), tuple(patches))]


# -- the private tree -----------------------------------------------------------------

class WorkTree:
    """A private copy of the source tree that patches are applied to and reverted from."""

    def __init__(self, source: KernelSource, root: Path | None = None):
        self.source = source
        self.root = root or cache_dir() / "trees" / (
            _slug(source.identity.split(":")[1] if source.identity.startswith("debian:")
                  else source.tree.name) + "-" + _digest(source.identity)[:12])
        self.src = self.root / "src"
        self.pristine = self.root / "pristine"
        self.journal = self.root / "applied.json"

    def ready(self) -> bool:
        return (self.root / "complete").exists()

    @contextmanager
    def locked(self, timeout: float = 4 * 3600.0) -> Iterator[None]:
        """The tree to ourselves: another validate run may be applying a patch to it
        or building from it (the kernel drops the lock if its holder dies)."""
        from ..waiting import flock_exclusive

        with os_boundary(f"creating {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock_exclusive(fd, timeout=timeout, on_timeout=lambda: ValidateInputError(
                f"another ksmbench validate kept {self.src} busy for {timeout / 3600:.0f} h",
                hint="wait for it to finish"))
            yield
        finally:
            os.close(fd)

    def ensure(self, status=None) -> float:
        """Copy the tree once (returns the seconds it took, 0 when it existed) and
        undo a patch left applied by a run that was killed."""
        if self.journal.exists():
            self._restore(json.loads(self.journal.read_text()))
        if self.ready():
            return 0.0
        started = time.monotonic()
        tmp = self.root / "src.partial"
        with os_boundary(f"copying {self.source.tree} to {self.src}"):
            if tmp.exists():
                shutil.rmtree(tmp)
            self.root.mkdir(parents=True, exist_ok=True)
            if status is not None:
                status(f"copying the source tree to {self.src}")
            _copy_tree(self.source.tree, tmp, link=self.source.linkable)
            if self.src.exists():
                shutil.rmtree(self.src)
            tmp.rename(self.src)
            (self.root / "complete").write_text(self.source.identity + "\n")
        return time.monotonic() - started

    @contextmanager
    def applied(self, patches: Sequence[Patch]) -> Iterator[None]:
        """The patches applied for the duration of the block; then every touched
        file is back, byte for byte and with its original mtime."""
        touched = sorted({f for p in patches for f in p.files})
        state = {"files": {}}
        with os_boundary(f"saving the files the patches touch in {self.pristine}"):
            if self.pristine.exists():
                shutil.rmtree(self.pristine)
            self.pristine.mkdir(parents=True)
            for rel in touched:
                target = self.src / rel
                exists = target.is_file()
                state["files"][rel] = exists
                if exists:
                    saved = self.pristine / rel
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(target, saved)
                    # break a hard link to the shared tree: patch must write a file of ours
                    fresh = target.with_name(target.name + ".ksmbench-tmp")
                    shutil.copy2(target, fresh)
                    os.replace(fresh, target)
            self.journal.write_text(json.dumps(state))
        try:
            for p in patches:
                self._apply_one(p)
            yield
        finally:
            self._restore(state)

    def _apply_one(self, patch: Patch) -> None:
        base = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                "-d", str(self.src), "-i", str(patch.path)]
        dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True,
                             timeout=PATCH_TIMEOUT)
        if dry.returncode != 0:
            raise VariantError(f"patch {patch.name} does not apply: "
                               f"{_patch_failure(dry.stdout + dry.stderr)}",
                               hint=f"it does not fit {self.source.spec}")
        real = subprocess.run(base, capture_output=True, text=True, timeout=PATCH_TIMEOUT)
        if real.returncode != 0:
            raise VariantError(f"patch {patch.name} failed: "
                               f"{_patch_failure(real.stdout + real.stderr)}")

    def _restore(self, state: dict) -> None:
        with os_boundary(f"restoring the patched files of {self.src}"):
            for rel, existed in state["files"].items():
                target = self.src / rel
                for stray in (target, target.with_name(target.name + ".rej"),
                              target.with_name(target.name + ".orig")):
                    if stray.is_file() or stray.is_symlink():
                        stray.unlink()
                if existed:
                    shutil.copy2(self.pristine / rel, target)
            self.journal.unlink(missing_ok=True)
            shutil.rmtree(self.pristine, ignore_errors=True)


def _patch_failure(output: str) -> str:
    """Which file and what: 'mm/ksm.c: Hunk #1 FAILED at 3187'."""
    current = None
    for line in output.splitlines():
        m = re.match(r"(?:checking|patching) file '?([^']+?)'?$", line.strip())
        if m:
            current = m[1]
            continue
        if "FAILED" in line or "can't find file" in line or "No file to patch" in line \
                or "Reversed (or previously applied)" in line or "malformed" in line:
            what = line.strip()
            return f"{current}: {what}" if current else what
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "patch failed with no output"


def _copy_tree(src: Path, dest: Path, *, link: bool) -> None:
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        dirs[:] = [d for d in dirs if not (rel == Path(".") and d == ".git")]
        out = dest / rel
        out.mkdir(parents=True, exist_ok=True)
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                os.symlink(os.readlink(Path(root) / d), out / d)
                dirs.remove(d)
        for name in files:
            s = Path(root) / name
            if s.is_symlink():
                os.symlink(os.readlink(s), out / name)
            elif link:
                try:
                    os.link(s, out / name)
                except OSError:  # another file system: copy
                    shutil.copy2(s, out / name)
            else:
                shutil.copy2(s, out / name)


# -- images --------------------------------------------------------------------------

@dataclass
class BuiltImage:
    image: Path
    directory: Path
    #: seconds this run spent building it (None: taken from the cache)
    seconds: float | None
    info: dict = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.seconds is None


def build_tools_missing() -> list[str]:
    return [t for t in ("make", "gcc", "flex", "bison", "bc", "perl", "patch")
            if shutil.which(t) is None]


def first_error_line(log: Path) -> str | None:
    try:
        with open(log, errors="replace") as fh:
            for line in fh:
                if re.search(r"(\berror:|\*\*\* .*Error \d|Error \d+\s*$|fatal error)", line):
                    return line.strip()[:300]
    except OSError:
        return None
    return None


class ImageCache:
    """The base image and every variant's, built on demand from one WorkTree."""

    def __init__(self, tree: WorkTree, fragment: Path, *, jobs: int | None = None,
                 console=None):
        self.tree = tree
        self.fragment = fragment
        self.jobs = jobs
        self.console = console
        self.base_key = _digest(RECIPE, tree.source.identity, fragment.read_bytes())
        self.root = cache_dir() / "images" / self.base_key[:16]
        self.base_dir = self.root / "base"

    def variant_dir(self, variant: Variant) -> Path:
        return self.root / "variants" / f"{variant.name}-{variant.key(self.base_key)[:12]}"

    def cached(self, directory: Path) -> bool:
        return (directory / "done.json").is_file() and (directory / "bzImage").is_file()

    def space_needed(self, variants: Sequence[Variant]) -> int:
        need = 0
        if not self.cached(self.base_dir):
            need += BASE_BUILD_BYTES
            base_tree = BASE_BUILD_BYTES
        else:
            base_tree = _tree_bytes(self.base_dir / "build")
        if not self.tree.ready() and not self.tree.source.linkable:
            need += _tree_bytes(self.tree.source.tree)
        if any(not self.cached(self.variant_dir(v)) for v in variants):
            need += base_tree + VARIANT_SLACK_BYTES  # one copy at a time
        return need

    def base(self, status=None) -> BuiltImage:
        if not self.cached(self.base_dir):
            if status:
                status("waiting for the source tree (another validate run)")
            with self.tree.locked():
                return self._base(status)
        return self._base(status)

    def _base(self, status) -> BuiltImage:
        if self.cached(self.base_dir):
            return BuiltImage(self.base_dir / "bzImage", self.base_dir, None,
                              json.loads((self.base_dir / "done.json").read_text()))
        started = time.monotonic()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        image = self._build(self.base_dir, "base", status)
        return self._finish(self.base_dir, image, started, {"variant": "base"})

    def variant(self, variant: Variant, *, status=None, phase=None) -> BuiltImage:
        """``phase(name)`` is called when applying and when building starts."""
        if not self.cached(self.variant_dir(variant)):
            if status:
                status("waiting for the source tree (another validate run)")
            with self.tree.locked():
                return self._variant(variant, status, phase)
        return self._variant(variant, status, phase)

    def _variant(self, variant: Variant, status, phase) -> BuiltImage:
        directory = self.variant_dir(variant)
        if self.cached(directory):
            return BuiltImage(directory / "bzImage", directory, None,
                              json.loads((directory / "done.json").read_text()))
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        started = time.monotonic()
        try:
            if status:
                status("copying the base object tree")
            t = time.monotonic()
            subprocess.run(["cp", "-a", "--reflink=auto", str(self.base_dir / "build"),
                            str(directory / "build")], check=True, capture_output=True,
                           timeout=900)
            copy_seconds = time.monotonic() - t
            if phase:
                phase("apply")
            with self.tree.applied(variant.patches):
                if phase:
                    phase("build")
                t = time.monotonic()
                image = self._build(directory, variant.name, status)
                build_seconds = time.monotonic() - t
        except subprocess.CalledProcessError as exc:
            raise VariantError("copying the base object tree failed: "
                               f"{exc.stderr.decode(errors='replace').strip()[:200]}") from None
        finally:
            shutil.rmtree(directory / "build", ignore_errors=True)
        return self._finish(directory, image, started,
                            {"variant": variant.name,
                             "patches": [{"file": p.name, "sha256": p.digest,
                                          "description": p.description}
                                         for p in variant.patches],
                             "copy_seconds": round(copy_seconds, 1),
                             "rebuild_seconds": round(build_seconds, 1)})

    def _build(self, out: Path, label: str, status) -> Path:
        from rich.console import Console

        from ..backends.vm.build import BuildError, build

        quiet = Console(file=open(os.devnull, "w"), highlight=False)
        adapter = _StatusAdapter(status) if status else None
        try:
            return build(self.tree.src, out, jobs=self.jobs, fragment=self.fragment,
                         console=quiet, status=adapter)
        except BuildError as exc:
            log = out / "build.log"
            first = first_error_line(log)
            raise VariantError(f"build failed: {first or exc.message}",
                               hint=f"log: {log}") from None
        finally:
            quiet.file.close()

    def _finish(self, directory: Path, image: Path, started: float, extra: dict) -> BuiltImage:
        seconds = time.monotonic() - started
        info = {}
        try:
            info = json.loads((directory / "build-info.json").read_text())
        except (OSError, ValueError):
            pass
        done = {**extra, "source": self.tree.source.identity, "seconds": round(seconds, 1),
                "build": info.get("seconds", {}), "finished_at": time.time()}
        (directory / "done.json").write_text(json.dumps(done, indent=2) + "\n")
        return BuiltImage(image, directory, seconds, done)


class _StatusAdapter:
    """build()'s status object (``update(text)``) onto a plain callback."""

    def __init__(self, fn):
        self.fn = fn

    def update(self, text: str) -> None:
        self.fn(text)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def check_space(path: Path, need: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise ValidateInputError(
            f"too little disk space in {path}: {free / 2**30:.1f} GiB free, the builds need "
            f"about {need / 2**30:.1f} GiB",
            hint="free some space or point KSMBENCH_CACHE at a larger file system")


def nullstatus(_text: str) -> None:
    return None


__all__ = ["KernelSource", "Patch", "Variant", "WorkTree", "ImageCache", "BuiltImage",
           "ValidateInputError", "VariantError", "resolve_source", "variants_from",
           "build_tools_missing", "check_space", "cache_dir", "nullcontext"]
