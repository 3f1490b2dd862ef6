"""Real boots under QEMU (marker ``vm``): Debian 6.1 and 6.12 run the whole built-in
suite, every cell judged against the emulator (its swap scenarios on the
guest's zram device); failures end in bounded time.

Downloads the Debian 6.1 and 6.12 kernel packages once (cached in $KSMBENCH_CACHE).
Under TCG a boot takes 15-40 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

KERNEL = "debian:6.12"


def _need_vm_tools():
    missing = [t for t in ("qemu-system-x86_64", "busybox") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing}: run vm/install-host-deps")


@pytest.fixture(scope="module")
def kernel():
    _need_vm_tools()
    from ksmbench.backends.vm.kernels import resolve

    return resolve(KERNEL)


def _qemu_processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if "qemu-system" in cmdline and text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("spec", ["debian:6.12", "debian:6.1"])
def test_the_whole_suite_in_one_boot_matches_the_emulator(spec, tmp_path):
    """One boot per kernel runs every built-in scenario through the guest's host
    backend; the observations stream back and every cell is judged against the
    emulator's profile for that kernel: all must match.  Then the host-kernel
    checks (kernel_expectations.py) run on the guest's observations, with the
    flags fitted to them: 6.1 predates the zero-page series, 6.12 has it."""
    from kernel_expectations import (CHECKS, Cells, assert_every_cell_matches, fitted_flags, load,
                                     not_applicable)
    from ksmbench.backends.vm import VMBackend
    from ksmbench.emulator import Predictor
    from ksmbench.results import RunDir
    from ksmbench.progress import StatusLine
    from ksmbench.runner import RunRecorder, Runner, exit_status
    from ksmbench.scenario import builtin_suite

    _need_vm_tools()
    series = spec.split(":", 1)[1]
    scenarios = builtin_suite()
    rundir = RunDir(tmp_path)
    statuses = []
    runner = Runner([RunRecorder(rundir, predictor=Predictor()),
                     StatusLine(lambda k, msg: statuses.append(msg))], artifacts_root=rundir.path)
    backend = VMBackend(spec, memory="2G", cpus=2, accel="auto")
    outcome = runner.run_kernel(backend, scenarios)
    rundir.close()
    assert outcome.error is None, outcome.error

    meta = json.loads((rundir.path / "metadata.json").read_text())
    assert meta["backend"] == "vm" and meta["kernel"] == spec
    assert meta["kernel_release"].startswith(series + ".")
    assert meta["accelerator"] in ("kvm", "tcg")
    assert meta["qemu_version"] and Path(meta["kernel_image"]).exists()
    assert meta["ksm_tunables_after"]["run"] == "0"
    assert any(s.startswith("booting") for s in statuses)
    # the console log and the raw event stream are kept in the run directory
    artifacts = rundir.path / spec.replace(":", "_")
    assert f"Linux version {series}" in (artifacts / "console.log").read_text(errors="replace")
    assert (artifacts / "events.jsonl").stat().st_size > 0

    df = load(rundir.path / "observations.csv")
    assert set(df.kernel) == {spec}
    flags = fitted_flags(df, meta["kernel_release"])
    na = not_applicable(scenarios, flags)  # prctl before 6.4, the advisor before 6.8
    verdicts = {name: o.verdict for name, o in outcome.scenarios.items()}
    assert verdicts == {s.name: "n/a" if s.name in na else "match" for s in scenarios}, \
        [mm.describe() for o in outcome.scenarios.values() for mm in o.mismatches][:12]
    assert exit_status([outcome]) == 0
    assert all(o.finished and not o.expect_failures for name, o in outcome.scenarios.items()
               if name not in na)
    compared = assert_every_cell_matches(df, outcome.profile)
    assert compared > 0.45 * len(df), (compared, len(df))
    for check in CHECKS:
        check(Cells(df), flags)
    # the series is in 6.12, not in 6.1
    assert ("zero_page_tracking" in flags) == (series != "6.1")
    _assert_the_guest_swapped(df, artifacts)


def _assert_the_guest_swapped(df, artifacts):
    """The suite's swap scenarios (swap = true) ran on a zram device and really
    swapped: their cells matching a model without swap would be a false pass."""
    assert "zram0" in (artifacts / "console.log").read_text(errors="replace")
    # MADV_PAGEOUT took the 16 unique pages of swap-pageout-ksm out of the
    # region (without swap they stay present)
    present = df[(df.scenario == "swap-pageout-ksm") & (df.metric == "region.main.a.present")]
    by_step = {int(r.step): int(r.observed) for r in present.itertuples() if r.op != "scan"}
    assert by_step[6] == 56 and by_step[8] == 40, by_step
    # op reclaim took the KSM page mapped 16 times, which MADV_PAGEOUT never does
    reclaimed = df[(df.scenario == "swap-reclaim-ksm") & (df.step == 6)]
    observed = dict(zip(reclaimed.metric, reclaimed.observed))
    assert observed["region.main.a.present"] == 8 and observed["region.main.a.zero_pfn"] == 8


def test_a_panicking_kernel_ends_in_bounded_time(kernel, tmp_path):
    """rdinit= pointing nowhere: the kernel cannot start init and panics."""
    from ksmbench.backends.vm.boot import GuestRun
    from ksmbench.errors import VMError

    run = GuestRun(kernel, ["/bin/true"], shared_dir=tmp_path, accelerator="tcg", memory="1G",
                   cpus=1, append=["rdinit=/nonexistent", "root=/dev/nonexistent"],
                   boot_timeout=180)
    started = time.monotonic()
    with pytest.raises(VMError) as err, run:
        run.wait()
    assert time.monotonic() - started < 180
    assert "panic" in str(err.value).lower() or "stopped" in str(err.value)
    assert "Kernel panic" in run.console_log.read_text(errors="replace")
    # it panics every time: booted twice (boot.BOOT_ATTEMPTS), both logs kept, then the error
    assert len(run.boot_failures) == 1 and "Kernel panic" in run.boot_failures[0]
    assert "1 earlier boot(s) failed too" in str(err.value)
    first = run.console_log.with_name("console.boot1.log")
    assert "Kernel panic" in first.read_text(errors="replace")
    assert not _qemu_processes_mentioning(str(tmp_path))


def test_a_boot_that_dies_before_user_space_is_tried_once_more(tmp_path, monkeypatch):
    """The first boot panics before init (rdinit= pointing nowhere, as a TCG
    text-patching oops would end it), the second is a normal boot: the scenario
    runs and matches, the run's metadata names the failed boot, both console
    logs are kept."""
    from ksmbench.backends.vm import VMBackend, backend as vm_backend
    from ksmbench.backends.vm.boot import GuestRun
    from ksmbench.emulator import Predictor
    from ksmbench.progress import StatusLine
    from ksmbench.results import RunDir
    from ksmbench.runner import RunRecorder, Runner
    from ksmbench.scenario import builtin_suite

    _need_vm_tools()

    class FirstBootPanics(GuestRun):
        def vng_argv(self):
            argv = super().vng_argv()
            if not self.boot_failures:
                at = argv.index("--exec")
                argv[at:at] = ["--append", "rdinit=/nonexistent", "--append", "root=/dev/nonexistent"]
            return argv

    monkeypatch.setattr(vm_backend, "GuestRun", FirstBootPanics)
    scenarios = [s for s in builtin_suite() if s.name == "zero-pages"]
    rundir = RunDir(tmp_path)
    statuses = []
    runner = Runner([RunRecorder(rundir, predictor=Predictor()),
                     StatusLine(lambda k, msg: statuses.append(msg))], artifacts_root=rundir.path)
    outcome = runner.run_kernel(VMBackend(KERNEL, memory="1G", cpus=2, accel="tcg"), scenarios)
    rundir.close()
    assert outcome.error is None, outcome.error
    assert outcome.scenarios["zero-pages"].verdict == "match"
    meta = json.loads((rundir.path / "metadata.json").read_text())
    assert len(meta["boot_failures"]) == 1 and "Kernel panic" in meta["boot_failures"][0]
    assert any("booting again" in s for s in statuses), statuses
    artifacts = rundir.path / KERNEL.replace(":", "_")
    assert "Kernel panic" in (artifacts / "console.boot1.log").read_text(errors="replace")
    assert "Kernel panic" not in (artifacts / "console.log").read_text(errors="replace")
    assert not _qemu_processes_mentioning(str(tmp_path))


def test_a_kernel_that_never_boots_ends_at_the_boot_timeout(kernel, tmp_path):
    """A truncated image (valid header, half the payload) never reaches user space."""
    from ksmbench.backends.vm.boot import GuestRun
    from ksmbench.backends.vm.kernels import BootableKernel
    from ksmbench.errors import VMError

    data = kernel.boot_image.read_bytes()
    broken = tmp_path / "boot" / "vmlinuz-broken"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 2])
    bad = BootableKernel("broken", broken, broken, kernel.release)
    shared = tmp_path / "shared"
    run = GuestRun(bad, ["/bin/true"], shared_dir=shared, accelerator="tcg", memory="512M",
                   cpus=1, boot_timeout=25)
    started = time.monotonic()
    with pytest.raises(VMError), run:
        run.wait()
    assert time.monotonic() - started < 60
    assert not _qemu_processes_mentioning(str(shared))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_qemu_outlives_a_stopped_run(kernel, tmp_path, how):
    """`ksmbench run` stopped while its VM boots: SIGTERM (exit 2, cleanup) and SIGKILL (the guard)."""
    env = {**os.environ, "KSMBENCH_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "results"
    ksmbench = str(Path(sys.executable).parent / "ksmbench")
    proc = subprocess.Popen([ksmbench, "run", "--kernel", KERNEL,
                             "--accel", "tcg", "--memory", "1G", "--out", str(out), "zero-pages"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _qemu_processes_mentioning(str(out)):
        time.sleep(0.2)
    qemus = _qemu_processes_mentioning(str(out))
    assert qemus, "QEMU never started"
    # guest RAM is not offered to the host's KSM (mem-merge=off): host runs stay possible
    for pid in qemus:
        flags = [ln for ln in Path(f"/proc/{pid}/smaps").read_text().splitlines()
                 if ln.startswith("VmFlags")]
        assert flags and not any(" mg" in ln for ln in flags)
    proc.send_signal(getattr(signal, how))
    code = proc.wait(timeout=60)
    if how == "SIGTERM":
        assert code == 2, proc.stderr.read()
    deadline = time.monotonic() + 15
    while _qemu_processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _qemu_processes_mentioning(str(out)), f"QEMU outlived a {how}ed ksmbench"
