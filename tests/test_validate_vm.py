"""ksmbench validate for real (markers ``vm`` and ``slow``): Debian's
linux-source-6.12 built as is and with one 1-line mutant, both booted under
QEMU, and the mutant killed.

The images are cached in $KSMBENCH_CACHE/validate (keyed by the source, the
config fragment and the patch), so only the first run on a machine builds:
the base once (about 5 min with 2 free cores, 15 min on a busy one) and the
mutant as a rebuild (under a minute).  Every run boots both kernels afresh
(--rerun): two boots with two scenarios plus identify's probes.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MUTANT = REPO / "vm" / "mutants" / "m06-general-profit-no-zero.patch"


def _need_tools():
    missing = [t for t in ("qemu-system-x86_64", "busybox", "make", "gcc", "flex", "bison", "bc")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing}: run vm/install-host-deps --build")


def _qemu_children_of_test(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmdline and marker in cmdline:
                found.append(int(entry.name))
    return found


def test_a_one_line_mutant_of_612_is_killed(tmp_path):
    _need_tools()
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(MUTANT, patches)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ksmbench.cli", "validate", "debian-source:6.12", "--patches",
         str(patches), "--each", "--rerun", "--out", str(out), "zero-pages", "cow-zero-pages"],
        capture_output=True, text=True, timeout=3600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    rundir = next(out.iterdir())
    rows = list(csv.DictReader(open(rundir / "validate.csv")))
    assert [r["variant"] for r in rows] == ["m06-general-profit-no-zero"]
    row = rows[0]
    assert row["verdict"] == "changed"
    assert int(row["unexplained"]) > 0 and int(row["cells_compared"]) > 100
    assert "global.general_profit" in row["first_cell"]
    # every changed cell is the global profit: nothing else moved
    cells = list(csv.DictReader(open(rundir / "validate-cells.csv")))
    assert cells and {c["metric"] for c in cells} == {"global.general_profit"}
    # both kernels really booted, each once
    kernels = {r["kernel"] for r in csv.DictReader(open(rundir / "observations.csv"))}
    assert kernels == {"base", "m06-general-profit-no-zero"}
    timings = {r["kernel"]: r for r in csv.DictReader(open(rundir / "validate-timings.csv"))}
    assert timings["base"]["observations"] == timings["m06-general-profit-no-zero"]["observations"] \
        == "measured"
    assert not _qemu_children_of_test(str(rundir))


def test_a_patch_that_does_not_compile_is_an_error_naming_the_log(tmp_path):
    """Exit 2, one line with the first compiler error and the build log; the
    private tree is restored (the next run's base is still the base)."""
    _need_tools()
    patches = tmp_path / "patches"
    patches.mkdir()
    broken = MUTANT.read_text().replace("+\tgeneral_profit = ksm_pages_sharing * PAGE_SIZE -",
                                        "+\tgeneral_profit = ksm_pages_sharing * no_such_symbol -")
    assert "no_such_symbol" in broken
    (patches / "broken.patch").write_text(broken)
    proc = subprocess.run(
        [sys.executable, "-m", "ksmbench.cli", "validate", "debian-source:6.12", "--patches",
         str(patches), "--out", str(tmp_path / "out"), "zero-pages"],
        capture_output=True, text=True, timeout=3600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ksmbench: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "no_such_symbol" in errors[0] and "error:" in errors[0]
    log = errors[0].rsplit("log: ", 1)[1].rstrip(")")
    assert Path(log).is_file() and "no_such_symbol" in Path(log).read_text()
    rundir = next((tmp_path / "out").iterdir())
    [row] = list(csv.DictReader(open(rundir / "validate.csv")))
    assert row["verdict"] == "error"
    from ksmbench.compare.builds import WorkTree, resolve_source

    tree = WorkTree(resolve_source("debian-source:6.12"))
    assert "no_such_symbol" not in (tree.src / "mm" / "ksm.c").read_text()
    assert not tree.journal.exists()
