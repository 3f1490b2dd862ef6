"""The kernel's own C tools, built from Debian's ``linux-source-X.Y``.

Used as peers to measure against: ``tools/mm/page-types`` (the region reader's
speed reference) and the KSM selftests in ``tools/testing/selftests/mm``.
Sources come through :mod:`ksmbench.debian` (a private apt configuration);
builds happen inside the cached source tree and are reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .errors import KsmbenchError
from .kernel.features import kernel_release, parse_version

#: what must be extracted from linux-source to build tools under tools/
TOOLS_MEMBERS = ["tools", "include/uapi", "scripts", "arch/x86/include/uapi",
                 "usr", "Makefile"]


def closest_series(release: str | None = None) -> str:
    major, minor, _ = parse_version(release or kernel_release())
    return f"{major}.{minor}"


def source_tree(series: str | None = None, *, console=None) -> Path:
    from .debian import DebianArchive

    return DebianArchive(console=console).fetch_source(series or closest_series(),
                                                       members=TOOLS_MEMBERS)


def build(tree: Path, subdir: str, target: str, *, timeout: float = 900) -> Path:
    """``make -C <tree>/<subdir> <target>``; returns the built binary's path."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise KsmbenchError("building the kernel's tools needs make and gcc",
                            hint="apt-get install build-essential")
    out = tree / subdir / target
    if out.exists():
        return out
    proc = subprocess.run(["make", "-s", "-C", str(tree / subdir), target],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise KsmbenchError(f"building {subdir}/{target} from {tree.name} failed: "
                            + " | ".join(tail))
    return out


def page_types(series: str | None = None, *, console=None) -> Path:
    return build(source_tree(series, console=console), "tools/mm", "page-types")
