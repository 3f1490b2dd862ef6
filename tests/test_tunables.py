"""The one undo mechanism: exact restore on success, exception, SIGINT, SIGTERM,
and repair from the journal after SIGKILL (against a fake sysfs: no root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import sigint_disposition
from ksmbench.kernel.sysfs import KsmSysfs
from ksmbench.kernel.tunables import TunableChanges, journals, repair


def read_all(root):
    return {p.name: p.read_text().strip() for p in root.iterdir()}


def test_restore_on_success_puts_back_exact_values(fake_ksm, state_dir):
    (fake_ksm / "sleep_millisecs").write_text("37\n")
    before = read_all(fake_ksm)
    sysfs = KsmSysfs(fake_ksm)
    with TunableChanges(sysfs, state_dir) as ch:
        ch.set("sleep_millisecs", 60000)
        ch.set("sleep_millisecs", 60001)
        ch.set("use_zero_pages", True)
        ch.set("run", 1)
        assert sysfs.tunable("sleep_millisecs") == "60001"
        assert sysfs.tunable("use_zero_pages") == "1"
        (path,) = journals(state_dir)
        journal = json.loads(path.read_text())
        # the first previous value is what is journaled, in change order
        assert journal["originals"] == [["sleep_millisecs", "37"], ["use_zero_pages", "0"],
                                        ["run", "0"]]
        assert journal["pid"] == os.getpid()
    assert read_all(fake_ksm) == before
    assert not journals(state_dir)


def test_restore_on_exception(fake_ksm, state_dir):
    before = read_all(fake_ksm)
    with pytest.raises(RuntimeError):
        with TunableChanges(KsmSysfs(fake_ksm), state_dir) as ch:
            ch.set("max_page_sharing", 16)
            raise RuntimeError("boom")
    assert read_all(fake_ksm) == before


def test_setting_a_tunable_the_kernel_lacks_is_an_error(fake_ksm, state_dir):
    (fake_ksm / "smart_scan").unlink()
    from ksmbench.errors import KernelIOError

    with TunableChanges(KsmSysfs(fake_ksm), state_dir) as ch:
        with pytest.raises(KernelIOError, match="no .*smart_scan"):
            ch.set("smart_scan", 0)


CHILD = textwrap.dedent("""
    import os, sys, time
    from ksmbench.kernel.sysfs import KsmSysfs
    from ksmbench.kernel.tunables import TunableChanges, signals_as_exceptions
    with signals_as_exceptions():
        try:
            with TunableChanges(KsmSysfs(sys.argv[1])) as ch:
                ch.set("run", 1)
                ch.set("pages_to_scan", 5000)
                print("changed", flush=True)
                time.sleep(30)
        except KeyboardInterrupt as exc:
            print("interrupted:", exc, flush=True)
            sys.exit(2)
""")


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_restore_on_sigint_and_sigterm(fake_ksm, state_dir, signum, inherited):
    """Also when the child starts with SIGINT ignored, as a background job of a
    non-interactive shell does: the undo stack still runs on ``kill -INT``."""
    before = read_all(fake_ksm)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(fake_ksm)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=sigint_disposition(inherited))
    assert proc.stdout.readline().strip() == "changed"
    assert (fake_ksm / "run").read_text().strip() == "1"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "interrupted" in out
    assert read_all(fake_ksm) == before
    assert not journals(state_dir)


def test_sigkill_leaves_a_journal_that_the_next_run_repairs(fake_ksm, state_dir):
    before = read_all(fake_ksm)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(fake_ksm)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "changed"
    proc.kill()
    proc.wait(timeout=20)
    assert read_all(fake_ksm) != before
    assert journals(state_dir)
    message = repair(KsmSysfs(fake_ksm), state_dir)
    assert message and f"pid {proc.pid}" in message and "run=0" in message
    assert "pages_to_scan=100" in message
    assert read_all(fake_ksm) == before
    assert not journals(state_dir)
    assert repair(KsmSysfs(fake_ksm), state_dir) is None  # nothing left to do


def test_journal_of_a_live_run_is_left_alone(fake_ksm, state_dir):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(fake_ksm)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "changed"
        assert repair(KsmSysfs(fake_ksm), state_dir) is None
        assert (fake_ksm / "run").read_text().strip() == "1"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_journal_from_an_earlier_boot_is_discarded_not_applied(fake_ksm, state_dir):
    (state_dir / "tunables.1.1.journal.json").write_text(json.dumps({
        "pid": 1, "boot_id": "another-boot", "sysfs": str(fake_ksm),
        "originals": [["run", "1"]]}))
    message = repair(KsmSysfs(fake_ksm), state_dir)
    assert "earlier boot" in message
    assert (fake_ksm / "run").read_text().strip() == "0"
    assert not journals(state_dir)


def test_restore_order_lets_pages_to_scan_back_before_the_advisor(fake_ksm, state_dir):
    """advisor_mode (6.8) must be 'none' while pages_to_scan is written back."""
    (fake_ksm / "advisor_mode").write_text("none [scan-time]\n")
    writes = []
    sysfs = KsmSysfs(fake_ksm)
    import ksmbench.kernel.tunables as t

    real_write = t._write

    def spy(s, name, text):
        if name == "pages_to_scan":
            assert "[none]" in (fake_ksm / "advisor_mode").read_text() or \
                (fake_ksm / "advisor_mode").read_text().strip() == "none"
        writes.append((name, text))
        real_write(s, name, text)

    t._write = spy
    try:
        with TunableChanges(sysfs, state_dir) as ch:
            ch.set("advisor_mode", "none")
            ch.set("pages_to_scan", 1000)
    finally:
        t._write = real_write
    assert writes[-2:] == [("pages_to_scan", "100"), ("advisor_mode", "scan-time")]


def test_nested_stacks_killed_together_are_undone_innermost_first(fake_ksm, state_dir):
    """A fixture's stack holding tunables while a host session changes more."""
    before = read_all(fake_ksm)
    code = textwrap.dedent("""
        import sys, time
        from ksmbench.kernel.sysfs import KsmSysfs
        from ksmbench.kernel.tunables import TunableChanges
        sysfs = KsmSysfs(sys.argv[1])
        outer = TunableChanges(sysfs)
        outer.set("use_zero_pages", 1)
        outer.set("run", 1)
        inner = TunableChanges(sysfs)
        inner.set("use_zero_pages", 0)
        inner.set("run", 2)
        inner.set("sleep_millisecs", 60000)
        print("changed", flush=True)
        time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(fake_ksm)], stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "changed"
    proc.kill()
    proc.wait(timeout=20)
    assert len(journals(state_dir)) == 2
    message = repair(KsmSysfs(fake_ksm), state_dir)
    assert message.count("restored KSM tunables") == 2
    assert read_all(fake_ksm) == before
    assert not journals(state_dir)
