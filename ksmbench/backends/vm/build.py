"""``vm/build-kernel SRC [--patches DIR] -o OUT``: a bootable kernel from a source tree.

1. Apply the patch series in DIR (if given): ``git am`` when SRC is a git
   work tree, else ``patch -p1`` per file.  The order is DIR/series when it
   exists (quilt), else file-name order (``git format-patch`` numbers them).
   A patch already applied (``patch -R --dry-run`` succeeds) is skipped, so
   re-running the command does not fail on a plain tree.
2. Configure out of tree in OUT/build: ``make tinyconfig``, merge
   ``ksmbench.config`` (package data, next to this module) with
   ``scripts/kconfig/merge_config.sh``, ``make olddefconfig``; then check
   that every option of the fragment survived (Kconfig silently drops an
   option whose dependencies are not met).
3. ``make -jN bzImage``; copy it to OUT/bzImage and print that path.

An in-tree ``.config`` makes out-of-tree builds refuse ("source tree is not
clean"); ``--mrproper`` cleans the tree first (it deletes that .config).
The make output goes to OUT/build.log; the terminal shows progress.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ...console import esc, make_console
from ...errors import KsmbenchError
from ...sources.packaged import packaged_file

#: the guest kernel's config fragment, shipped with the package
FRAGMENT = packaged_file(__package__, "ksmbench.config")
BUILD_TIMEOUT = 3 * 3600.0
PATCH_SUFFIXES = (".patch", ".diff", ".mbox", ".eml")


class BuildError(KsmbenchError):
    """The kernel could not be patched, configured or built."""


def patch_files(directory: Path) -> list[Path]:
    """The series in order: DIR/series (quilt) if present, else sorted patch files."""
    series = directory / "series"
    if series.is_file():
        out = []
        for line in series.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name = line.split()[0]
                path = directory / name
                if not path.is_file():
                    raise BuildError(f"{series}: lists {name}, which does not exist")
                out.append(path)
        return out
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in PATCH_SUFFIXES)
    if not files:
        raise BuildError(f"--patches {directory}: no *.patch/*.diff/*.mbox files and no series file")
    return files


def is_git_tree(src: Path) -> bool:
    proc = subprocess.run(["git", "-C", str(src), "rev-parse", "--is-inside-work-tree"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() == "true" and \
        Path(subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel"],
                            capture_output=True, text=True).stdout.strip()).resolve() == src.resolve()


def apply_patches(src: Path, patches: list[Path], log) -> list[str]:
    """Apply the series; returns one line per patch saying what happened."""
    done = []
    if is_git_tree(src):
        proc = subprocess.run(["git", "-C", str(src), "am", "--3way", *map(str, patches)],
                              capture_output=True, text=True)
        log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            subprocess.run(["git", "-C", str(src), "am", "--abort"], capture_output=True)
            raise BuildError(f"git am failed: {_last(proc.stderr or proc.stdout)}",
                             hint="the series does not apply to this tree (git am was aborted)")
        return [f"git am: {p.name}" for p in patches]
    for p in patches:
        reverse = subprocess.run(["patch", "-p1", "-R", "--dry-run", "-s", "-f", "-d", str(src),
                                  "-i", str(p)], capture_output=True, text=True)
        if reverse.returncode == 0:
            done.append(f"already applied: {p.name}")
            continue
        proc = subprocess.run(["patch", "-p1", "--forward", "-s", "-d", str(src), "-i", str(p)],
                              capture_output=True, text=True)
        log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BuildError(f"patch -p1 {p.name} failed: {_last(proc.stdout + proc.stderr)}",
                             hint="the series does not apply to this tree")
        done.append(f"patch -p1: {p.name}")
    return done


def fragment_options(fragment: Path) -> dict[str, str]:
    out = {}
    for line in fragment.read_text().splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def missing_options(config: Path, wanted: dict[str, str]) -> list[str]:
    have = fragment_options(config)
    return [f"{k}={v}" for k, v in wanted.items() if have.get(k, "n") != v]


def _last(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _run_logged(argv: list[str], log, what: str, *, status=None, timeout: float = BUILD_TIMEOUT
                ) -> None:
    """Run a build step with its output in the log; the status line shows its last line."""
    log.write(f"\n$ {' '.join(argv)}\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    last = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()  # the log is the user's view of a long build: keep it current
            if line.strip():
                last = line.strip()
                if status is not None:
                    status.update(esc(f"{what} ({time.monotonic() - started:.0f} s): {last[:90]}"))
            if time.monotonic() - started > timeout:
                proc.kill()
                raise BuildError(f"{what} took longer than {timeout:.0f} s")
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    log.flush()
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}): {last}",
                         hint=f"see {log.name}")


def build(src: Path, out: Path, *, patches: Path | None = None, jobs: int | None = None,
          mrproper: bool = False, fragment: Path = FRAGMENT, console=None, status=None) -> Path:
    """``status``: an object with ``update(text)`` for the progress line (default: a
    spinner on ``console``; a caller with its own progress display passes one)."""
    from contextlib import nullcontext

    console = console or make_console(stderr=True)
    src = src.expanduser().resolve()
    out = out.expanduser().resolve()
    if not (src / "Makefile").is_file() or not (src / "Kconfig").is_file():
        raise BuildError(f"{src} is not a kernel source tree (no Makefile/Kconfig)")
    missing = [t for t in ("make", "gcc", "flex", "bison", "bc", "perl") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing build tools: {', '.join(missing)}",
                         hint="run vm/install-host-deps --build (as root)")
    out.mkdir(parents=True, exist_ok=True)
    builddir = out / "build"
    builddir.mkdir(exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    started = time.monotonic()
    timings: dict[str, float] = {}
    shown = nullcontext(status) if status is not None else console.status("build-kernel")
    with open(out / "build.log", "w") as log, shown as status:
        applied: list[str] = []
        if patches is not None:
            t = time.monotonic()
            status.update(f"applying patches from {esc(patches)}")
            applied = apply_patches(src, patch_files(patches.expanduser()), log)
            for line in applied:
                console.print(f"  {esc(line)}")
            timings["patch"] = time.monotonic() - t
        if (src / ".config").exists() or (src / "include" / "config").is_dir():
            if not mrproper:
                raise BuildError(f"{src} has an in-tree build (.config or include/config), "
                                 "which makes out-of-tree builds refuse",
                                 hint="pass --mrproper to clean it (deletes that .config), "
                                      "or use a clean tree")
            _run_logged(["make", "-C", str(src), "mrproper"], log, "make mrproper", status=status)
        t = time.monotonic()
        make = ["make", "-C", str(src), f"O={builddir}"]
        _run_logged([*make, "tinyconfig"], log, "make tinyconfig", status=status)
        _run_logged([str(src / "scripts" / "kconfig" / "merge_config.sh"), "-m", "-O",
                     str(builddir), str(builddir / ".config"), str(fragment)],
                    log, "merging the config fragment", status=status)
        _run_logged([*make, "olddefconfig"], log, "make olddefconfig", status=status)
        dropped = missing_options(builddir / ".config", fragment_options(fragment))
        timings["configure"] = time.monotonic() - t
        if any(d.startswith("CONFIG_KSM=") for d in dropped):
            raise BuildError("CONFIG_KSM=y did not survive configuration (a dependency is off)",
                             hint=f"see {builddir / '.config'}")
        for d in dropped:
            console.print(f"[yellow]note:[/yellow] {esc(d)} from the fragment is not in the final "
                          "config (unmet dependency or gone in this version)")
        t = time.monotonic()
        _run_logged([*make, f"-j{jobs}", "bzImage"], log, f"make -j{jobs} bzImage", status=status)
        timings["compile"] = time.monotonic() - t
    image = builddir / "arch" / "x86" / "boot" / "bzImage"
    if not image.is_file():
        raise BuildError(f"the build finished but {image} does not exist", hint=f"see {out / 'build.log'}")
    final = out / "bzImage"
    shutil.copy2(image, final)
    shutil.copy2(builddir / ".config", out / "config")
    total = time.monotonic() - started
    info = {"source": str(src), "patches": applied, "jobs": jobs,
            "seconds": {k: round(v, 1) for k, v in {**timings, "total": total}.items()},
            "dropped_options": dropped}
    (out / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    console.print(f"built in {total:.0f} s (configure {timings['configure']:.0f} s, "
                  f"compile {timings['compile']:.0f} s with -j{jobs})")
    return final


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vm/build-kernel",
                                description="build a kernel that ksmbench can boot (--kernel OUT/bzImage)")
    p.add_argument("src", type=Path, help="kernel source tree")
    p.add_argument("--patches", type=Path, metavar="DIR",
                   help="patch series to apply first (git am in a git tree, else patch -p1)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT",
                   help="output directory (bzImage, config, build.log; build/ holds the objects)")
    p.add_argument("-j", "--jobs", type=int, help="parallel make jobs (default: all CPUs)")
    p.add_argument("--mrproper", action="store_true",
                   help="clean an in-tree build first (deletes SRC/.config)")
    p.add_argument("--config", type=Path, default=FRAGMENT, metavar="FRAGMENT",
                   help=f"config fragment (default: {FRAGMENT})")
    args = p.parse_args(argv)
    try:
        image = build(args.src, args.out, patches=args.patches, jobs=args.jobs,
                      mrproper=args.mrproper, fragment=args.config)
    except KsmbenchError as exc:
        print(f"build-kernel: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build-kernel: interrupted", file=sys.stderr)
        return 2
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
