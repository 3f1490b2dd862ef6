"""A regular (non-editable) install works: the wheel is built from a copy of the
repository, installed with its dependencies into a fresh venv, and that venv's
``ksmbench run --kernel debian:6.12`` boots the Debian kernel and judges a
built-in scenario with the guest's observations.

The point is that nothing is read from the source tree at run time: the
catalogue of Debian suites, the guest's launcher and the kernel config
fragment ship inside the package (``[tool.setuptools.package-data]``).  Every
command runs with its working directory outside the repository and without
PYTHONPATH, and the test checks that the ``ksmbench`` imported is the
installed one.  The kernel comes from the cache (``$KSMBENCH_CACHE``) that the
other VM tests fill; dependencies come through pip's own cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "debian:6.12"
SCENARIO = "zero-pages"
#: what a build needs from the repository (pyproject names README.md as the readme)
BUILD_INPUTS = ("pyproject.toml", "README.md", "ksmbench")


def _run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float,
         what: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: ksmbench stops its guest on it (tests/test_vm_boot.py)
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"{what} took longer than {timeout:.0f} s")
    print(f"{what}: {time.monotonic() - started:.1f} s")  # shown with -s
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _clean_env() -> dict[str, str]:
    """The environment without anything that would point Python or ksmbench at
    the source tree (or at another catalogue than the installed one)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "KSMBENCH_CATALOGUE")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _data_files_in_tree() -> set[str]:
    """Every file under ksmbench/ that is not Python source: the package's data."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "ksmbench").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}


def _need_vm_tools():
    missing = [t for t in ("qemu-system-x86_64", "busybox") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing}: run vm/install-host-deps")


def test_a_wheel_in_a_fresh_venv_runs_a_debian_kernel(tmp_path):
    _need_vm_tools()
    env = _clean_env()
    work = tmp_path / "work"  # every command's cwd: not the repository
    work.mkdir()

    # build from a copy holding only the build's inputs, so that no stale
    # build/ or egg-info of the checkout can leak into the wheel
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels),
                  str(src)], cwd=work, env=env, timeout=90, what="building the wheel")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("ksmbench-*.whl")

    # every data file of the package is in the wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _data_files_in_tree()
    assert {"ksmbench/sources/catalogue.toml", "ksmbench/backends/vm/ksmbench.config",
            "ksmbench/backends/vm/launcher.sh"} <= expected
    assert expected <= names, f"data files missing from the wheel: {sorted(expected - names)}"

    # a fresh venv (no system site-packages), the wheel and its dependencies
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=work, env=env, timeout=90,
                what="creating the venv")
    assert made.returncode == 0, made.stderr[-2000:]
    python = venv / "bin" / "python"
    # byte-compiled as pip does by default: the guest mounts the venv read-only
    # and would compile what it imports (cffi, pycparser...) at every start, under
    # TCG (measured: 95 s instead of 42 s from init to power-off on a loaded host)
    installed = _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], cwd=work,
                     env=env, timeout=180, what="installing the wheel and its dependencies")
    assert installed.returncode == 0, installed.stderr[-2000:]

    # the ksmbench imported is the installed one, and its data files are there
    probe = _run([str(python), "-c", (
        "import json, sysconfig, ksmbench\n"
        "from ksmbench.sources.debian import CATALOGUE_FILE\n"
        "from ksmbench.backends.vm.build import FRAGMENT\n"
        "from ksmbench.backends.vm.boot import LAUNCHER\n"
        "print(json.dumps({'module': ksmbench.__file__, 'site': sysconfig.get_paths()['purelib'], "
        "'data': "
        "[str(p) for p in (CATALOGUE_FILE, FRAGMENT, LAUNCHER)]}))")],
        cwd=work, env=env, timeout=60, what="importing the installed ksmbench")
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    print("installed ksmbench:", found["module"])
    site = Path(found["site"])
    assert site.is_relative_to(venv), site
    assert Path(found["module"]).is_relative_to(site), found["module"]
    for data in map(Path, found["data"]):
        assert data.is_relative_to(site / "ksmbench") and data.is_file(), data

    # the real thing: a guest boots the cached Debian kernel and runs a scenario
    out = tmp_path / "results"
    run = _run([str(venv / "bin" / "ksmbench"), "run", "--kernel", KERNEL, SCENARIO,
                "--out", str(out)], cwd=work, env=env, timeout=240,
               what=f"ksmbench run --kernel {KERNEL} {SCENARIO} from the venv")
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    (rundir,) = [d for d in out.iterdir() if d.is_dir()]
    meta = json.loads((rundir / "metadata.json").read_text())
    (kernel,) = meta["kernels"]
    # the observations are the guest's: its kernel (Debian's 6.12 release, not
    # the host's), a VM backend, the guest's CPU model, the scenario judged
    assert kernel["backend"] == "vm"
    assert kernel["kernel_release"].startswith("6.12.") and \
        kernel["kernel_release"] != os.uname().release
    assert kernel["guest_cpu_model"]
    assert kernel["verdicts"] == {SCENARIO: "match"}
    rows = (rundir / "observations.csv").read_text().splitlines()
    header = rows[0].split(",")
    observed = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert observed and all(r["kernel"] == KERNEL and r["scenario"] == SCENARIO for r in observed)
    assert any(r["observed"] not in ("", "0") for r in observed), "no counter moved in the guest"
