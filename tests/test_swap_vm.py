"""Swap on this host, which has no swap: the built-in swap scenarios read n/a
and the machine keeps no swap.  In guests, where ksmbench gives them a zram
device, they run with the rest of the suite (tests/test_vm_boot.py, which
also checks that they really swapped).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import host_ksm_usable
from ksmbench.kernel.swap import active_swaps

def swap_scenarios():
    from ksmbench.scenario import builtin_suite

    return [s for s in builtin_suite() if s.swap]


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_on_a_host_without_swap_they_are_not_applicable(tmp_path):
    if active_swaps():
        pytest.skip("this machine has swap in use")
    names = [s.name for s in swap_scenarios()]
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "run", "--kernel", "host",
                           "--wait", "900", "--out", str(tmp_path), *names],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    meta = json.loads((next(Path(tmp_path).iterdir()) / "metadata.json").read_text())
    assert meta["verdicts"] == {name: "n/a" for name in names}
    assert proc.stdout.count("needs a swap device") == len(names)
    assert active_swaps() == []  # ksmbench added none
