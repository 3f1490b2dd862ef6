"""The pytest plugin itself: registered by entry point, its options and header, tunables
restored after a failing test, clean skips without root (pytester runs inner sessions)."""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

import pytest

from conftest import RUN_LOCK_WAIT, host_ksm_usable, settled_tunables

pytest_plugins = ["pytester"]




def test_registered_as_a_pytest11_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("ksmbench") == "ksmbench.pytest_plugin"


def test_header_names_kernel_release_and_accelerator(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines([f"ksmbench: kernel host, release {os.uname().release}, "
                                 "accelerator none (host kernel)"])
    result = pytester.runpytest_subprocess("--ksm-kernel", "debian:6.1", "--ksm-accel", "tcg")
    result.stdout.fnmatch_lines(["ksmbench: kernel debian:6.1, release *, accelerator tcg (requested)"])


def test_options_are_documented(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--ksm-kernel=KERNEL*", "*--ksm-accel*", "*--ksm-wait=SECONDS*"])


def test_without_root_the_ksm_fixtures_skip_with_a_reason(pytester):
    pytester.makeconftest("import os\nos.geteuid = lambda: 1000  # as an ordinary user\n")
    pytester.makepyfile("""
        def test_tunables(ksm_tunables):
            ksm_tunables.set("run", 1)

        def test_run(ksm_run):
            ksm_run("zero-pages")
    """)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*needs root*--ksm-kernel debian:<version>*"])


def test_a_bad_scenario_fails_the_test_with_one_clear_line(pytester):
    pytester.makepyfile("""
        def test_bad(ksm_run):
            ksm_run('name = "bad"\\n[[step]]\\nop = "mmap"\\nregion = "a"\\npages = 0\\n')
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ScenarioError: <test>: step 0: field 'pages': must be at least 1*"])


def test_emulator_fixture_predicts_without_a_kernel(pytester):
    pytest.importorskip("ksmbench.emulator")
    pytester.makepyfile("""
        def test_predict(ksm_emulator):
            p = ksm_emulator.predict("dup-below-max", profile="linux-6.18")
            assert p.at(3, 2)["global.pages_shared"] == 1
            assert p.at(3, 2)["global.pages_sharing"] == 9
            assert p.kernel == "emulator:linux-6.18"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_tunables_are_restored_after_a_failing_test(pytester):
    from ksmbench.kernel.sysfs import KsmSysfs

    before = settled_tunables()
    pytester.makepyfile("""
        def test_changes_then_fails(ksm_tunables):
            ksm_tunables.set("pages_to_scan", 4321)
            ksm_tunables.set("use_zero_pages", 1)
            ksm_tunables.set("sleep_millisecs", 99)
            assert ksm_tunables.get("pages_to_scan") == "4321"
            raise RuntimeError("the test fails after changing tunables")
    """)
    result = pytester.runpytest_subprocess("--ksm-wait", str(RUN_LOCK_WAIT))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: the test fails after changing tunables*"])
    assert settled_tunables() == before


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_a_killed_test_session_is_repaired_by_the_next_one(pytester, tmp_path):
    """SIGKILL inside a test that changed tunables: the journal lets the next session restore."""
    import signal
    import subprocess

    from ksmbench.kernel.sysfs import KsmSysfs

    before = settled_tunables()
    marker = tmp_path / "changed"
    pytester.makepyfile(test_killed=f"""
        import os, signal, pathlib
        def test_killed(ksm_tunables):
            ksm_tunables.set("pages_to_scan", 4321)
            pathlib.Path({str(marker)!r}).write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             "--ksm-wait", str(RUN_LOCK_WAIT), str(pytester.path / "test_killed.py")],
                            cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=RUN_LOCK_WAIT + 120) == -signal.SIGKILL
    assert marker.exists()
    from ksmbench.kernel.lock import RunLock

    with RunLock(timeout=60):  # before another run on this machine repairs it
        assert KsmSysfs().tunable("pages_to_scan") == "4321"  # left behind by the kill
    pytester.makepyfile(test_next="""
        def test_next(ksm_tunables):
            assert ksm_tunables.get("pages_to_scan") != "4321"
    """)
    result = pytester.runpytest_subprocess("--ksm-wait", str(RUN_LOCK_WAIT), "test_next.py")
    result.assert_outcomes(passed=1)
    assert settled_tunables() == before


def test_at_counts_absolute_counters_from_the_baseline():
    """A counter an earlier run left behind (a leaked ksm_zero_pages stays
    until reboot) is not the scenario's: at() and final subtract the baseline,
    raw=True keeps what was read, per-process metrics are never rebased."""
    from ksmbench.observation import BASELINE, ObservationPoint
    from ksmbench.pytest_plugin import ScenarioResult

    run = ScenarioResult("s", "host", points=[
        ObservationPoint(-1, BASELINE, None, {"global.ksm_zero_pages": 56,
                                              "global.general_profit": 56 * 4096}),
        ObservationPoint(0, "scan", 1, {"global.ksm_zero_pages": 120,
                                        "global.general_profit": 120 * 4096,
                                        "proc.main.ksm_zero_pages": 64,
                                        "global.pages_skipped": None}),
    ])
    assert run.at(0, 1) == {"global.ksm_zero_pages": 64, "global.general_profit": 64 * 4096,
                            "proc.main.ksm_zero_pages": 64, "global.pages_skipped": None}
    assert run.at(0, 1, raw=True)["global.ksm_zero_pages"] == 120
    assert run["global.ksm_zero_pages"] == 64
