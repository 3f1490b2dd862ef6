"""The kernel's own C tools, built from Debian's ``linux-source-X.Y``.

Used as peers to measure against: ``tools/mm/page-types`` (the region reader's
speed reference) and the KSM selftests in ``tools/testing/selftests/mm``.
Sources come through :mod:`ksmbench.sources.debian` (a private apt
configuration); builds happen inside the cached source tree and are reused.
Both ``bench`` (the ``ksm_tests -P`` cross-check, the page-types reference)
and ``selftests`` use these builds, and neither may import the other (they
are one layer), so the builds live here, with the sources they come from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import KsmbenchError
from ..kernel.features import kernel_release, parse_version
from .debian import DebianArchive

#: what must be extracted from linux-source to build tools under tools/
TOOLS_MEMBERS = ["tools", "include/uapi", "scripts", "arch/x86/include/uapi",
                 "usr", "Makefile"]


def closest_series(release: str | None = None) -> str:
    major, minor, _ = parse_version(release or kernel_release())
    return f"{major}.{minor}"


def source_tree(series: str | None = None, *, console=None) -> Path:
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


# -- the kernel's KSM selftests ---------------------------------------------------------

#: the KSM selftest programs, in the order run_vmtests.sh runs them
KSM_SELFTESTS = ("ksm_tests", "ksm_functional_tests")
#: what building them needs from linux-source: the selftests directory (``mm`` since
#: 6.3, ``vm`` before: "selftests/vm: rename selftests/vm to selftests/mm"), kselftest.h
#: and tools/include/uapi (the Makefile's TOOLS_INCLUDES), include/vdso (6.1's
#: ksm_tests includes vdso/time64.h)
SELFTEST_MEMBERS = ["tools", "include/vdso", "include/uapi"]
SELFTEST_BUILD_TIMEOUT = 300.0


@dataclass(frozen=True)
class SelftestBuild:
    """The KSM selftests built from one linux-source package."""

    series: str                       #: the series asked for (e.g. the kernel's 6.18)
    package: str                      #: linux-source-X.Y actually used (the closest)
    version: str                      #: its Debian version
    directory: Path                   #: where the binaries are (run them with this cwd)
    binaries: dict[str, Path]         #: program name -> binary, for those the source has
    missing: dict[str, str]           #: program name -> why it is not there
    #: ksm_functional_tests' test functions called from main(), in order
    functional_tests: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return f"{self.package} {self.version}"


def ksm_selftests(series: str | None = None, *, console=None,
                  cache_dir: Path | None = None) -> SelftestBuild:
    """ksm_tests and ksm_functional_tests from the linux-source closest to ``series``.

    Built once per source package into ``$KSMBENCH_CACHE/selftests/<package>_<version>/``
    (never inside the shared source tree) and reused.  Compiled the way
    tools/testing/selftests/mm/Makefile does (see :func:`selftest_compile_argv`);
    ``make headers`` is avoided because it needs most of the kernel tree: the
    Makefile's TOOLS_INCLUDES (tools/include/uapi) carries every uapi header
    these two programs use that a Debian 12 libc lacks (PR_SET_MEMORY_MERGE, 6.4).
    """
    archive = DebianArchive(cache_dir, console=console)
    series = series or closest_series()
    pkg = archive.resolve_source(series)
    out = archive.cache / "selftests" / f"{pkg.name}_{pkg.version}"
    manifest = out / "manifest.json"
    try:
        cached = json.loads(manifest.read_text())
    except (OSError, ValueError):
        cached = None
    if cached is not None and all(Path(p).exists() for p in cached["binaries"].values()):
        return SelftestBuild(series, pkg.name, pkg.version, out,
                             {k: Path(v) for k, v in cached["binaries"].items()},
                             dict(cached["missing"]), tuple(cached.get("functional_tests", ())))
    tree = archive.fetch_source(series, members=SELFTEST_MEMBERS)
    testdir = selftests_dir(tree)
    out.mkdir(parents=True, exist_ok=True)
    binaries: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for program in KSM_SELFTESTS:
        if not (testdir / f"{program}.c").exists():
            missing[program] = f"{pkg.name} {pkg.version} has no {program}.c"
            continue
        binary = out / program
        _compile_selftest(tree, testdir, program, binary)
        binaries[program] = binary
    functional = ()
    if "ksm_functional_tests" in binaries:
        functional = functional_test_names(
            (testdir / "ksm_functional_tests.c").read_text(errors="replace"))
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"package": pkg.name, "version": pkg.version,
                               "binaries": {k: str(v) for k, v in binaries.items()},
                               "missing": missing, "functional_tests": list(functional)},
                              indent=1))
    os.replace(tmp, manifest)
    return SelftestBuild(series, pkg.name, pkg.version, out, binaries, missing, functional)


def selftests_dir(tree: Path) -> Path:
    """tools/testing/selftests/mm, or /vm in trees before 6.3."""
    for name in ("mm", "vm"):
        d = tree / "tools" / "testing" / "selftests" / name
        if (d / "Makefile").exists():
            return d
    raise KsmbenchError(f"{tree.name} has no tools/testing/selftests/mm (or vm)")


def makefile_recipe(makefile_text: str, program: str) -> tuple[list[str], list[str]]:
    """(helper sources, extra LDLIBS) that the selftests Makefile gives ``program``.

    Understands the two shapes used since 6.1: ``$(TEST_GEN_FILES): vm_util.c ...``
    (6.3+: every program links the helpers) and ``$(OUTPUT)/<program>: vm_util.c``
    (6.1: per program), plus ``$(OUTPUT)/<program>: LDLIBS += -lnuma``.
    """
    sources: list[str] = []
    libs: list[str] = []
    # line continuations first, so that a rule split over lines is one line
    text = re.sub(r"\\\n", " ", makefile_text)
    for line in text.splitlines():
        m = re.match(r"\s*(\S+(?:\s+\$\(OUTPUT\)/\S+)*)\s*:\s*(.*)$", line)
        if not m:
            continue
        targets = m[1].split()
        body = m[2].strip()
        applies = any(t in ("$(TEST_GEN_FILES)", f"$(OUTPUT)/{program}") for t in targets)
        if not applies:
            continue
        lib = re.match(r"LDLIBS\s*\+=\s*(.*)", body)
        if lib:
            libs += lib[1].split()
        elif "=" not in body:
            sources += [w for w in body.split() if w.endswith(".c")]
    return list(dict.fromkeys(sources)), libs


def selftest_compile_argv(tree: Path, testdir: Path, program: str, output: Path,
                          cc: str = "cc") -> list[str]:
    """The compiler command line for one selftest program (run with cwd ``testdir``).

    CFLAGS as in the Makefile: ``-Wall -O2 -I <top> $(TOOLS_INCLUDES) -U_FORTIFY_SOURCE
    -no-pie`` (the x86 branch adds -no-pie), plus ``-I tools/testing/selftests``:
    7.x sources include "kselftest.h" without the ``../``.  LDLIBS ``-lrt -lpthread
    -lm`` plus what the Makefile adds for the program (ksm_tests: -lnuma).
    """
    helpers, libs = makefile_recipe((testdir / "Makefile").read_text(errors="replace"), program)
    helpers = [h for h in helpers if (testdir / h).exists() and h != f"{program}.c"]
    return [cc, "-Wall", "-O2", "-I", str(tree), "-I", str(testdir.parent),
            "-isystem", str(tree / "tools" / "include" / "uapi"), "-U_FORTIFY_SOURCE", "-no-pie",
            f"{program}.c", *helpers, "-lrt", "-lpthread", "-lm", *libs, "-o", str(output)]


def _compile_selftest(tree: Path, testdir: Path, program: str, binary: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise KsmbenchError(f"building {program} needs a C compiler",
                            hint="apt-get install gcc libnuma-dev")
    tmp = binary.with_name(binary.name + ".partial")
    argv = selftest_compile_argv(tree, testdir, program, tmp, cc)
    if "-lnuma" in argv and not any(Path(d, "numa.h").exists()
                                    for d in ("/usr/include", "/usr/local/include")):
        raise KsmbenchError(f"building {program} needs numa.h (it links libnuma)",
                            hint="apt-get install libnuma-dev")
    try:
        proc = subprocess.run(argv, cwd=testdir, capture_output=True, text=True,
                              timeout=SELFTEST_BUILD_TIMEOUT, env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise KsmbenchError(f"building {program} from {tree.name} took longer than "
                            f"{SELFTEST_BUILD_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        first = [ln.strip() for ln in proc.stderr.splitlines() if "error" in ln] or \
            proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise KsmbenchError(f"building {program} from {tree.name} failed: {first[0]}",
                            hint="apt-get install gcc libnuma-dev")
    os.replace(tmp, binary)


def functional_test_names(source: str) -> tuple[str, ...]:
    """The ``test_*()`` calls in ksm_functional_tests.c's main(), in order."""
    start = source.find("int main(")
    body = source[start:] if start >= 0 else ""
    return tuple(dict.fromkeys(re.findall(r"^\s*(test_\w+)\(\);", body, re.M)))
