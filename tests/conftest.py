"""Shared fixtures: fake /sys and /proc trees, real-KSM gating, and the promise
that the machine's KSM tunables are exactly as before once the test run ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_KSM = Path("/sys/kernel/mm/ksm")
TUNABLE_FILES = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
                 "smart_scan", "merge_across_nodes", "stable_node_chains_prune_millisecs",
                 "advisor_mode")


def _real_tunables() -> dict[str, str]:
    out = {}
    for name in TUNABLE_FILES:
        try:
            out[name] = (REAL_KSM / name).read_text().strip()
        except OSError:
            pass
    return out


def host_ksm_usable() -> bool:
    return os.geteuid() == 0 and os.access(REAL_KSM / "run", os.W_OK)


def settled_tunables() -> dict[str, str]:
    """The host's tunables while no ksmbench run is changing them.

    Read under the machine's run lock: another run (or another test session)
    on this machine may be in the middle of stepping ksmd.
    """
    if not host_ksm_usable():
        return _real_tunables()
    from ksmbench.kernel.lock import RunLock
    from ksmbench.kernel.tunables import state_dir

    with RunLock(timeout=3600, directory=state_dir()):
        return _real_tunables()


@pytest.fixture(scope="session", autouse=True)
def tunables_untouched_by_the_test_run():
    """After the whole run, real KSM tunables must be exactly as before."""
    before = settled_tunables()
    yield
    after = settled_tunables()
    assert after == before, f"KSM tunables changed by the test run: {before} -> {after}"


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A private journal/lock directory, so tests never meet a real run's files."""
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("KSMBENCH_STATE_DIR", str(d))
    return d


DEFAULT_FAKE_KSM = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "use_zero_pages": "0",
    "max_page_sharing": "256", "merge_across_nodes": "1", "smart_scan": "1",
    "stable_node_chains_prune_millisecs": "2000", "advisor_mode": "[none] scan-time",
    "pages_shared": "0", "pages_sharing": "0", "pages_unshared": "0", "pages_volatile": "0",
    "full_scans": "0", "stable_node_chains": "0", "stable_node_dups": "0",
    "general_profit": "0", "pages_scanned": "0", "ksm_zero_pages": "0", "pages_skipped": "0",
}


@pytest.fixture
def fake_ksm(tmp_path):
    """A fake /sys/kernel/mm/ksm directory (a 6.18-like kernel) to be edited by tests."""
    root = tmp_path / "sys_ksm"
    root.mkdir()
    for name, value in DEFAULT_FAKE_KSM.items():
        (root / name).write_text(value + "\n")
    return root


@pytest.fixture
def fake_proc(tmp_path):
    """A fake /proc tree; tests add /proc/<pid>/... files as they need."""
    root = tmp_path / "proc"
    root.mkdir()
    return root
