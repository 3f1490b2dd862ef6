"""The peer suite in guests (marker ``vm``): Debian 6.1's old-format ksm_tests beside
ksmbench; a selftest that hangs in a guest is killed and the guest's tunables restored;
a guest without the KSM interface is reported in one line, its console log kept and no
QEMU left.  Each test boots at least once (TCG: 15-100 s a boot on a busy 2-core machine).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmbench.selftests.execute import Command, write_plan

pytestmark = [pytest.mark.vm, pytest.mark.slow]

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]


@pytest.fixture(autouse=True)
def _vm_tools():
    missing = [t for t in ("qemu-system-x86_64", "busybox", "gcc") if shutil.which(t) is None]
    if not Path("/usr/include/numa.h").exists():
        missing.append("libnuma-dev")
    if missing:
        pytest.skip(f"missing {missing}: run vm/install-host-deps")


def _qemu_for(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and str(path) in cmd:
                found.append(int(entry.name))
    return found


@pytest.mark.timeout(900)  # linux-source 6.1 fetched and built once, then a TCG boot
def test_debian_6_1_old_ksm_tests_beside_ksmbench(tmp_path):
    proc = subprocess.run([*KSMBENCH, "selftest", "--kernel", "debian:6.1", "--accel", "tcg",
                           "--memory", "1G", "--out", str(tmp_path),
                           "--only", "ksm_tests -Z -p 10 -z 1", "--only", "test_unmerge_zero_pages"],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    (rundir,) = tmp_path.iterdir()
    rows = {r["selftest"]: r for r in csv.DictReader(open(rundir / "peers.csv"))}
    assert set(rows) == {"ksm_tests -Z -p 10 -z 1", "test_unmerge_zero_pages"}
    zero_merge = rows["ksm_tests -Z -p 10 -z 1"]
    assert zero_merge["source"].startswith("linux-source-6.1 ")
    assert zero_merge["selftest_verdict"] == "pass"     # "OK", exit 0 (before KTAP)
    assert zero_merge["ksmbench_verdict"] == "pass"
    zero = rows["test_unmerge_zero_pages"]
    assert zero["selftest_verdict"] == "absent"                # 6.1 has no ksm_functional_tests
    # before 6.6 MADV_UNMERGEABLE leaves KSM zero pages mapped: ksmbench sees it
    assert zero["ksmbench_verdict"] == "fail"
    assert "region.main.a.zero_pfn = 512, wanted == 256" in zero["ksmbench_detail"]
    report = json.loads((rundir / "selftests.json").read_text())[0]
    assert report["kernel_release"].startswith("6.1.") and report["accelerator"] == "tcg"
    for e in report["executions"]:
        assert e["tunables_after"] == e["tunables_before"]
    assert (rundir / "selftests" / "debian_6.1" / "console.log").stat().st_size > 0
    assert not _qemu_for(rundir)


HANG = r"""
import sys, time
with open("/sys/kernel/mm/ksm/run", "w") as f:
    f.write("1")
print("TAP version 13\n1..1\n# [RUN] test_forever", flush=True)
while True:
    time.sleep(0.01)
"""


def _guest_plan(tmp_path: Path, timeout: float) -> tuple[Path, Path]:
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    commands = [Command("hang", (sys.executable, str(script)), "/", str(tmp_path / "hang.log"))]
    plan, result = tmp_path / "plan.json", tmp_path / "result.json"
    write_plan(plan, commands, timeout)
    return plan, result


def test_a_hanging_selftest_in_a_guest_is_killed_and_restored(tmp_path):
    from ksmbench.backends.vm import run_in_guest

    plan, result = _guest_plan(tmp_path, timeout=3)  # times KSMBENCH_TIME_SCALE=10 under TCG
    started = time.monotonic()
    guest = run_in_guest("debian:6.12", [sys.executable, "-m", "ksmbench.selftests.execute",
                                         str(plan), str(result)],
                         shared_dir=tmp_path, memory="1G", accel="tcg", timeout=600,
                         console_log=tmp_path / "console.log")
    assert time.monotonic() - started < 900
    assert guest.returncode == 0, guest.stderr
    data = json.loads(result.read_text())
    (run,) = data["executions"]
    assert run["timed_out"] and "did not finish within 30 s" in run["error"]
    assert run["tunables_left"]["run"] == "1"                  # what the hung program did
    assert run["tunables_after"] == run["tunables_before"]     # what ksmbench restored
    assert "# [RUN] test_forever" in (tmp_path / "hang.log").read_text()
    assert not _qemu_for(tmp_path)


def test_a_guest_without_the_ksm_interface_is_one_clear_error(tmp_path):
    """/sys/kernel/mm/ksm hidden under an empty tmpfs in the guest: what a CONFIG_KSM=n kernel
    shows user space."""
    from ksmbench.backends.vm import run_in_guest

    plan, result = _guest_plan(tmp_path, timeout=3)
    argv = ["sh", "-c", 'mount -t tmpfs none /sys/kernel/mm/ksm && exec "$@"', "sh",
            sys.executable, "-m", "ksmbench.selftests.execute", str(plan), str(result)]
    guest = run_in_guest("debian:6.12", argv, shared_dir=tmp_path, memory="1G", accel="tcg",
                         timeout=600, console_log=tmp_path / "console.log")
    assert guest.returncode == 2
    data = json.loads(result.read_text())
    assert data["executions"] == []
    assert data["error"] == ("/sys/kernel/mm/ksm does not exist: this kernel has no KSM "
                             "(boot a kernel built with CONFIG_KSM=y)")
    assert "Linux version 6.12" in (tmp_path / "console.log").read_text(errors="replace")
    assert not _qemu_for(tmp_path)
