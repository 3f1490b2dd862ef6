"""Shared fixtures: fake /sys and /proc trees, real-KSM gating, and the promise
that the machine's KSM tunables are exactly as before once the test run ends.

Also the suite's bounds and its refusal to pass without a kernel:

* every test has a time limit (pytest-timeout, which names the test when it
  fires): the default in pyproject.toml, longer for ``root`` and ``vm`` tests
  (:data:`ROOT_TIMEOUT`, :data:`VM_TIMEOUT`) unless the test carries its own
  ``timeout`` mark;
* a test waits at most :data:`RUN_LOCK_WAIT` for another ksmbench run on this
  machine;
* on a machine that can run them (root, a writable /sys/kernel/mm/ksm/run and
  QEMU), a ``root`` or ``vm`` test that skips *fails*, naming the test and the
  reason it gave, so that a CI which silently ran no kernel is never green.
  ``KSMBENCH_ALLOW_SKIPS=1`` turns this off for a developer's partial run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

REAL_KSM = Path("/sys/kernel/mm/ksm")
#: how long a test waits for another ksmbench run (or test session) on this
#: machine to let go of the run lock, in seconds
RUN_LOCK_WAIT = 240
#: time limits (s) for tests that drive the host's KSM or boot kernels; a
#: test that needs longer says so with its own ``@pytest.mark.timeout``
ROOT_TIMEOUT = 600
VM_TIMEOUT = 600
#: set to 1 to let root/vm tests skip on a machine that could run them
ALLOW_SKIPS_ENV = "KSMBENCH_ALLOW_SKIPS"
KERNEL_MARKERS = ("root", "vm")

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


def sigint_disposition(disposition=signal.SIG_DFL):
    """A ``preexec_fn`` giving a child an explicit SIGINT disposition.

    A job started with ``&`` from a non-interactive shell (CI, nohup, a
    script) inherits SIGINT as ignored, and so does every child it starts,
    unless the disposition is set again: a test that sends SIGINT to a child
    must therefore say which one the child starts with.
    """
    def preexec() -> None:
        signal.signal(signal.SIGINT, disposition)

    return preexec


def merging_scenario(name: str, pages: int, *fills: str | tuple[str, int, int], scans: int,
                     then: tuple = (), use_zero_pages: bool = False, description: str = "") -> str:
    """TOML text of the small scenario tests use most, written by the one
    serialiser: region ``a`` of ``pages`` pages in ``main``, written by each
    fill (a pattern for the whole region, or ``(pattern, first, end)``),
    MADV_MERGEABLE, ``scans`` full scans, then the model steps ``then``
    (their index is renumbered)."""
    from ksmbench.scenario import model as m
    from ksmbench.scenario.patterns import parse_pattern
    from ksmbench.scenario.serialise import to_toml

    steps: list = [m.Mmap(0, m.MAIN, "a", pages)]
    for fill in fills:
        pattern, first, end = (fill, 0, pages) if isinstance(fill, str) else fill
        steps.append(m.Fill(0, m.MAIN, "a", first, end, parse_pattern(pattern)))
    steps += [m.Madvise(0, m.MAIN, "a", 0, pages, "mergeable"), m.Scan(0, m.MAIN, scans), *then]
    steps = [dataclasses.replace(step, index=i) for i, step in enumerate(steps)]
    return to_toml(m.Scenario(name, description, m.KsmSettings(use_zero_pages=use_zero_pages),
                              tuple(steps)))


def host_ksm_usable() -> bool:
    return os.geteuid() == 0 and os.access(REAL_KSM / "run", os.W_OK)


def settled_tunables(read=None) -> dict[str, str]:
    """The host's tunables while no ksmbench run is changing them.

    Read under the machine's run lock: another run (or another test session)
    on this machine may be in the middle of stepping ksmd.
    """
    read = read or _real_tunables
    if not host_ksm_usable():
        return read()
    from ksmbench.kernel.lock import RunLock
    from ksmbench.kernel.tunables import state_dir

    with RunLock(timeout=RUN_LOCK_WAIT, directory=state_dir()):
        return read()


def kernel_tests_runnable_here() -> dict[str, bool]:
    """What root and vm tests need, and whether this machine has it."""
    return {"root": os.geteuid() == 0,
            "a writable /sys/kernel/mm/ksm/run": os.access(REAL_KSM / "run", os.W_OK),
            "QEMU (qemu-system-x86_64)": shutil.which("qemu-system-x86_64") is not None}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout"):
            continue
        if item.get_closest_marker("vm"):
            item.add_marker(pytest.mark.timeout(VM_TIMEOUT))
        elif item.get_closest_marker("root"):
            item.add_marker(pytest.mark.timeout(ROOT_TIMEOUT))


class KernelSkipGuard:
    """Turns the skip of a root/vm test into a failure where it could have run,
    and prints what was skipped and why."""

    def __init__(self, config):
        self.config = config
        self.prerequisites = kernel_tests_runnable_here()
        self.capable = all(self.prerequisites.values())
        self.allowed = os.environ.get(ALLOW_SKIPS_ENV, "") not in ("", "0")
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.refused: list[str] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if not report.skipped or hasattr(report, "wasxfail"):
            return report
        reason = _skip_reason(report)
        kind = next((m for m in KERNEL_MARKERS if item.get_closest_marker(m)), "other")
        self.skipped[(kind, reason)] += 1
        if kind != "other" and self.capable and not self.allowed:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid}: a {kind} test skipped on a machine that can run it "
                               f"(root, writable KSM, QEMU): {reason}\n"
                               f"(set {ALLOW_SKIPS_ENV}=1 to allow this in a developer's run; "
                               f"CI must not)")
            self.refused.append(f"{item.nodeid}: {reason}")
        return report

    def pytest_terminal_summary(self, terminalreporter):
        if not self.skipped:
            return
        tr = terminalreporter
        tr.section("skip summary")
        have = ", ".join(f"{what} {'yes' if ok else 'NO'}" for what, ok in self.prerequisites.items())
        tr.write_line(f"this machine: {have}")
        for (kind, reason), n in sorted(self.skipped.items()):
            tr.write_line(f"{n:4d} {kind:5s} {reason}")
        if self.refused:
            tr.write_line(f"{len(self.refused)} root/vm test(s) skipped although this machine can run "
                          f"them: counted as failures", red=True, bold=True)
            for line in self.refused:
                tr.write_line(f"  {line}", red=True)
        elif self.capable and self.allowed and any(k != "other" for k, _ in self.skipped):
            tr.write_line(f"{ALLOW_SKIPS_ENV} is set: root/vm skips were allowed", yellow=True)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_configure(config):
    config.pluginmanager.register(KernelSkipGuard(config), "ksmbench-kernel-skip-guard")


@pytest.fixture(scope="session", autouse=True)
def tunables_untouched_by_the_test_run(request):
    """After the whole run, real KSM tunables must be exactly as before.

    Only sessions with root or vm tests touch the host's KSM, so only they
    wait for the run lock to read settled tunables: unit tests run beside a
    real run on the same machine without waiting for it.
    """
    if not any(item.get_closest_marker(marker) for item in request.session.items
               for marker in KERNEL_MARKERS):
        yield
        return
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
