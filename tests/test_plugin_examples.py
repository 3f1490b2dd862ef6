"""Examples: KSM tests written with the ksmbench pytest plugin (ksmbench/pytest_plugin.py).

The fixtures come from the plugin (installed as a pytest11 entry point), not
from this repository's conftest.py.  Run them on this host (as root), or on
another kernel booted in QEMU:

    pytest tests/test_plugin_examples.py
    pytest tests/test_plugin_examples.py --ksm-kernel debian:6.12

On a kernel without the zero-page series (before 6.6) the first example shows
the old behaviour instead: KSM zero pages survive MADV_UNMERGEABLE.
"""

from __future__ import annotations

import pytest

from ksmbench.pytest_plugin import comparable

pytestmark = [pytest.mark.root]

ZERO_UNMERGE = """
name = "example-zero-unmerge"
description = "64 zero-filled pages become KSM zero pages, then MADV_UNMERGEABLE"
[ksm]
use_zero_pages = true
[[step]]
op = "mmap"
region = "a"
pages = 64
[[step]]
op = "fill"
region = "a"
pattern = "zero"
[[step]]
op = "madvise"
region = "a"
advice = "mergeable"
[[step]]
op = "scan"
count = 2
[[step]]
op = "madvise"
region = "a"
advice = "unmergeable"
"""


def test_ksm_zero_pages_are_counted_and_unshared(ksm_run):
    run = ksm_run(ZERO_UNMERGE).raise_for_error()
    merged = run.at(3, 2)          # after the second full scan of step 3
    assert merged["region.main.a.zero_pfn"] == 64
    assert merged["global.pages_shared"] == 0
    unmerged = run.at(4)           # after MADV_UNMERGEABLE
    if merged["global.ksm_zero_pages"] is None:
        # before 6.6 (e2942062e01d, 79271476b336): not counted, and not unshared
        assert unmerged["region.main.a.zero_pfn"] == 64
        return
    assert merged["global.ksm_zero_pages"] == 64
    assert merged["proc.main.ksm_zero_pages"] == 64
    assert unmerged["region.main.a.zero_pfn"] == 0
    assert unmerged["global.ksm_zero_pages"] == 0


def test_the_emulator_predicts_this_kernel(ksm_run, ksm_emulator):
    observed = ksm_run("dup-below-max").raise_for_error()
    profile = ksm_emulator.profile_for(observed.kernel_release)
    if profile is None:
        pytest.skip(f"no emulator profile for {observed.kernel_release}")
    predicted = ksm_emulator.predict("dup-below-max", profile=profile)
    assert predicted.at(3, 2)["global.pages_sharing"] == 9
    assert comparable(observed, predicted) == []


def test_tunables_changed_in_a_test_are_undone(ksm_tunables):
    before = ksm_tunables.get("pages_to_scan")
    ksm_tunables.set("pages_to_scan", 1234)
    ksm_tunables.set("use_zero_pages", True)
    assert ksm_tunables.get("pages_to_scan") == "1234"
    assert ksm_tunables.get("use_zero_pages") == "1"
    assert ksm_tunables.changed["pages_to_scan"] == before
    # the undo after this test is checked by tests/test_plugin.py (and by the
    # session-wide check in conftest.py that real tunables end as they began)


def test_tunables_and_scenarios_together(ksm_tunables, ksm_run, ksm_kernel):
    """Both fixtures hold the machine's run lock; within one test they share it."""
    if ksm_kernel != "host":
        pytest.skip("ksm_tunables acts on the host kernel")
    ksm_tunables.set("sleep_millisecs", 777)
    run = ksm_run("dup-below-max").raise_for_error()
    assert run.final["global.pages_sharing"] == 9
    # the scenario's own tunables were undone when it ended; ours are still in place
    assert ksm_tunables.get("sleep_millisecs") == "777"
