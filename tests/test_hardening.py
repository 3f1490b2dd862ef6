"""Hardening: kernels shaped like 6.1 and 6.6 (counters missing) through the readers and the
host preflight; negative counters kept as such; no root and a read-only sysfs for the
selftest command too; a real read-only sysfs mount; two real runs at once on the host."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (DEFAULT_FAKE_KSM, RUN_LOCK_WAIT, host_ksm_usable, merging_scenario,
                      settled_tunables)
from ksmbench import cli
from ksmbench.kernel import features
from ksmbench.kernel.procfs import ProcFS
from ksmbench.kernel.stepping import PAGES_TO_SCAN
from ksmbench.kernel.sysfs import KsmSysfs
from ksmbench.metrics import GLOBAL_COUNTERS
from ksmbench.scenario import model as m

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]



#: files each kernel lacks, relative to the 6.18-like DEFAULT_FAKE_KSM
MISSING = {
    # 6.1: before general_profit (6.4), ksm_zero_pages and pages_scanned (6.6),
    # smart_scan/pages_skipped (6.7) and the advisor (6.8)
    "6.1": ("general_profit", "ksm_zero_pages", "pages_scanned", "smart_scan", "pages_skipped",
            "advisor_mode"),
    # 6.6: the zero-page series is in; smart scan and the advisor are not yet
    "6.6": ("smart_scan", "pages_skipped", "advisor_mode"),
}
KSM_STAT = {"6.1": "ksm_rmap_items 12\n",
            "6.6": "ksm_rmap_items 3000\nksm_zero_pages 1000\nksm_merging_pages 1000\n"
                   "ksm_process_profit -192000\n"}


def shaped_like(version: str, root: Path, proc: Path) -> tuple[KsmSysfs, ProcFS]:
    for name in MISSING[version]:
        (root / name).unlink()
    me = proc / "self"
    me.mkdir(parents=True, exist_ok=True)
    (me / "ksm_stat").write_text(KSM_STAT[version])
    return KsmSysfs(root), ProcFS(proc)


@pytest.mark.parametrize("version", ["6.1", "6.6"])
def test_old_kernel_counters_are_absent_not_zero(version, fake_ksm, fake_proc):
    sysfs, procfs = shaped_like(version, fake_ksm, fake_proc)
    counters = sysfs.counters()
    assert set(counters) == set(GLOBAL_COUNTERS)
    for name in GLOBAL_COUNTERS:
        if name in MISSING[version]:
            assert counters[name] is None, name
        else:
            assert counters[name] == int(DEFAULT_FAKE_KSM[name]), name
    assert set(MISSING[version]) & set(sysfs.tunables()) == set()
    stat = procfs.ksm_stat("self")
    if version == "6.1":
        assert stat["ksm_rmap_items"] == 12 and stat["ksm_zero_pages"] is None
        assert stat["ksm_process_profit"] is None
    else:
        assert stat["ksm_zero_pages"] == 1000 and stat["ksm_process_profit"] == -192000
    found = features.detect(sysfs, procfs)
    assert found["ksm"] and found["use_zero_pages"]
    assert found["ksm_zero_pages"] is (version == "6.6")
    assert found["ksm_stat_zero_pages"] is (version == "6.6")
    assert not found["smart_scan"] and not found["advisor"]


@pytest.mark.parametrize("version", ["6.1", "6.6"])
def test_host_preflight_and_stepping_setup_on_old_kernels(version, fake_ksm, fake_proc, state_dir,
                                                          monkeypatch):
    """The host policy's access check, taking control of ksmd, the scenario's [ksm]
    tunables and the restore: only files the kernel has are touched, and all come back."""
    from ksmbench.backends.host import HostSession
    from ksmbench.errors import PermissionNeeded
    from ksmbench.scenario.model import KsmSettings

    sysfs, procfs = shaped_like(version, fake_ksm, fake_proc)
    before = sysfs.tunables()
    really_root = os.geteuid() == 0
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    session = HostSession(sysfs_root=str(fake_ksm), proc_root=str(fake_proc))
    (fake_proc / "self" / "pagemap").symlink_to("/proc/self/pagemap")  # the real one
    if really_root:
        session.policy.check_access()
    else:  # everything up to pagemap passes; pagemap hides frames from us
        with pytest.raises(PermissionNeeded, match="pagemap shows frame numbers as 0"):
            session.policy.check_access()
    with session.changes:
        session.stepper.prepare()
        session._apply_settings(KsmSettings(use_zero_pages=True, smart_scan=False))
        assert sysfs.tunable("pages_to_scan") == str(PAGES_TO_SCAN)
        assert sysfs.tunable("use_zero_pages") == "1"
        assert not (fake_ksm / "smart_scan").exists()        # not created on a kernel without it
        assert not (fake_ksm / "advisor_mode").exists()
        changed = {name for name, _ in session.changes.originals}
        assert "smart_scan" not in changed and "advisor_mode" not in changed
    assert sysfs.tunables() == before


def test_negative_counters_are_kept_signed_end_to_end(fake_ksm, tmp_path):
    from ksmbench.results import RunDir, read_observations

    (fake_ksm / "general_profit").write_text("-192000\n")
    (fake_ksm / "ksm_zero_pages").write_text(f"{2**64 - 1}\n")  # %lu of -1 (6.6-6.9)
    values = KsmSysfs(fake_ksm).counters()
    assert values["general_profit"] == -192000 and values["ksm_zero_pages"] == -1
    rundir = RunDir(tmp_path)
    rundir.add_observations([("s", "host", 0, "scan", 1, f"global.{name}", values[name], None, None)
                             for name in ("general_profit", "ksm_zero_pages", "pages_skipped")])
    rundir.close()
    table = read_observations(rundir.path)
    got = dict(zip(table["metric"], table["observed"]))
    assert got["global.general_profit"] == -192000
    assert got["global.ksm_zero_pages"] == -1
    rows = list(csv.DictReader(open(rundir.path / "observations.csv")))
    assert rows[0]["observed"] == "-192000"


def test_selftest_command_without_root_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status = cli.main(["selftest", "--kernel", "host"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert status == 2 and len(err) == 1
    assert "needs root" in err[0] and "--kernel debian:" in err[0]


def test_selftest_command_on_a_read_only_sysfs_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("/run")
                        and mode == os.W_OK else real_access(path, mode))
    status = cli.main(["selftest", "--kernel", "host"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert status == 2 and len(err) == 1 and "not writable (read-only sysfs?)" in err[0]


def _can_unshare_mounts() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and \
        Path("/sys/kernel/mm/ksm/run").exists()


@pytest.mark.root
@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root, unshare(1) and KSM")
@pytest.mark.parametrize("command", [["run", "--kernel", "host", "zero-pages"],
                                     ["selftest", "--kernel", "host"]])
def test_a_really_read_only_ksm_sysfs(command, tmp_path):
    """/sys/kernel/mm/ksm bind-mounted read-only in a private mount namespace (EROFS)."""
    script = ("mount --bind /sys/kernel/mm/ksm /sys/kernel/mm/ksm && "
              "mount -o remount,bind,ro /sys/kernel/mm/ksm && "
              'exec "$@"')
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", *KSMBENCH, *command, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "/sys/kernel/mm/ksm is not writable (read-only sysfs?)" in lines[0]
    assert "--kernel debian:" in lines[0]
    assert not list(tmp_path.iterdir())  # refused before any run directory was made


def test_tunable_write_on_a_read_only_filesystem_names_it(tmp_path, state_dir):
    """EROFS from a write becomes one PermissionNeeded line, and nothing is left changed."""
    if not _can_unshare_mounts():
        pytest.skip("needs root and unshare(1)")
    code = (
        "import sys\n"
        "from ksmbench.kernel.sysfs import KsmSysfs\n"
        "from ksmbench.kernel.tunables import TunableChanges\n"
        "from ksmbench.errors import KsmbenchError\n"
        "try:\n"
        "    with TunableChanges(KsmSysfs(sys.argv[1])) as c:\n"
        "        c.set('pages_to_scan', 5)\n"
        "except KsmbenchError as e:\n"
        "    print(type(e).__name__, e.one_line())\n")
    root = tmp_path / "ro"
    root.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {root} && "
              f"for f in run pages_to_scan; do echo 0 > {root}/$f; done && "
              f"mount -o remount,ro {root} && exec \"$@\"")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", sys.executable, "-c", code, str(root)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KSMBENCH_STATE_DIR": str(state_dir)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PermissionNeeded ")
    assert "read-only file system" in proc.stdout and "pages_to_scan" in proc.stdout
    assert not list(state_dir.glob("tunables.*.journal.json"))


# -- two runs at once ---------------------------------------------------------------------------

BUSY = merging_scenario(
    "two-runs", 16384, ("cycle:two-runs:16", 0, 8192), ("zero", 8192, 16384), scans=40,
    then=(m.Madvise(0, m.MAIN, "a", 0, 4096, "unmergeable"), m.Scan(0, m.MAIN, 2)),
    use_zero_pages=True,
    description="long enough for a second run to arrive while this one holds the lock")


def _lock_holder() -> int | None:
    from ksmbench.kernel.tunables import state_dir

    try:
        return json.loads((state_dir() / "run.lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def _rows(rundir: Path) -> list[tuple]:
    """Observations, without the raw RssAnon (it includes each agent's interpreter)."""
    return [tuple(r.values()) for r in csv.DictReader(open(rundir / "observations.csv"))
            if not r["metric"].endswith(".rss_anon_pages")]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_two_real_runs_at_once_wait_or_refuse_and_never_mix(tmp_path):
    scenario = tmp_path / "two-runs.toml"
    scenario.write_text(BUSY)
    before = settled_tunables()

    def start(name: str, wait: str) -> subprocess.Popen:
        return subprocess.Popen([*KSMBENCH, "run", "--wait", wait, "--out", str(tmp_path / name),
                                 str(scenario)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    first = start("first", str(RUN_LOCK_WAIT))
    deadline = time.monotonic() + RUN_LOCK_WAIT
    while _lock_holder() != first.pid:  # it may queue behind someone else's run first
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never got the lock"
        time.sleep(0.02)
    refused = subprocess.run([*KSMBENCH, "run", "--wait", "0", "--out", str(tmp_path / "refused"),
                              str(scenario)], capture_output=True, text=True, timeout=120)
    waiting = start("second", str(RUN_LOCK_WAIT))
    first_out, first_err = first.communicate(timeout=RUN_LOCK_WAIT)
    second_out, second_err = waiting.communicate(timeout=RUN_LOCK_WAIT)

    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"another ksmbench run holds" in refused.stderr and f"pid {first.pid}" in refused.stderr
    assert not (tmp_path / "refused").exists()
    # every compared cell matches the emulator (exit 1 would be a mismatch)
    assert first.returncode == 0, first_out + first_err
    assert waiting.returncode == 0, second_out + second_err
    (run1,) = (tmp_path / "first").iterdir()
    (run2,) = (tmp_path / "second").iterdir()
    meta1 = json.loads((run1 / "metadata.json").read_text())
    meta2 = json.loads((run2 / "metadata.json").read_text())
    assert meta1["ended_at"] and meta2["ended_at"]
    assert meta2["started_at"] >= meta1["ended_at"], "the second run overlapped the first"
    for meta in (meta1, meta2):
        assert meta["verdicts"] == {"two-runs": meta1["verdicts"]["two-runs"]}
        assert meta["verdicts"]["two-runs"] == "match"
    rows1, rows2 = _rows(run1), _rows(run2)
    assert len(rows1) > 1000 and rows1 == rows2  # same kernel, same scenario: same table
    assert settled_tunables() == before
