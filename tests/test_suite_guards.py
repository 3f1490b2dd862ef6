"""The suite's own guards (tests/conftest.py): every test is bounded, and a
root/vm test that skips where it could have run fails the run by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ALLOW_SKIPS_ENV

pytest_plugins = ["pytester"]

#: no test may be allowed more than this (seconds)
LONGEST = 900

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
#: the guard as on a machine with root, writable KSM and QEMU, without
#: touching this machine's KSM (no lock, no tunables)
CAPABLE = CONFTEST + """

def kernel_tests_runnable_here():
    return {"root": True, "a writable /sys/kernel/mm/ksm/run": True, "QEMU": True}


def settled_tunables():
    return {}
"""
INNER_TESTS = """
import pytest

@pytest.mark.root
def test_needs_the_kernel():
    pytest.skip("no kernel today")

@pytest.mark.vm
@pytest.mark.skipif(True, reason="no QEMU today")
def test_needs_a_guest():
    pass

def test_unit():
    pytest.skip("an ordinary skip")

def test_passes():
    pass
"""


def test_every_test_is_bounded(request):
    """Each test of this session has a time limit, none of them near an hour."""
    default = float(request.config.getini("timeout"))
    assert 0 < default <= LONGEST
    unbounded, too_long = [], []
    for item in request.session.items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0] if marker and marker.args else
                      marker.kwargs.get("timeout", default) if marker else default)
        if limit <= 0:
            unbounded.append(item.nodeid)
        elif limit > LONGEST:
            too_long.append(f"{item.nodeid}: {limit:.0f} s")
    assert not unbounded and not too_long, (unbounded, too_long)


def test_a_root_or_vm_skip_fails_where_it_could_run(pytester, monkeypatch):
    monkeypatch.delenv(ALLOW_SKIPS_ENV, raising=False)
    pytester.makeconftest(CAPABLE)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*test_needs_the_kernel*a root test skipped on a machine that can run it*no kernel today*",
        "*skip summary*",
        "*2 root/vm test(s) skipped although this machine can run them*",
    ])
    result.stdout.fnmatch_lines(["*test_needs_a_guest*a vm test skipped*no QEMU today*"])
    result.assert_outcomes(passed=1, failed=1, skipped=1, errors=1)  # skipif: at setup


def test_the_developer_opt_out_allows_the_skips(pytester, monkeypatch):
    monkeypatch.setenv(ALLOW_SKIPS_ENV, "1")
    pytester.makeconftest(CAPABLE)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    assert result.ret == 0
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*skip summary*", "*root*no kernel today*",
                                 f"*{ALLOW_SKIPS_ENV} is set*"])


def test_a_machine_without_a_kernel_may_skip(pytester, monkeypatch):
    monkeypatch.delenv(ALLOW_SKIPS_ENV, raising=False)
    pytester.makeconftest(CAPABLE.replace('"QEMU": True', '"QEMU": False'))
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    assert result.ret == 0
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*this machine: root yes*QEMU NO*"])


def test_a_test_that_overruns_fails_by_name(pytester):
    pytester.makeconftest(CAPABLE)
    pytester.makepyfile(test_slow="""
        import time
        import pytest

        @pytest.mark.timeout(1)
        def test_hangs():
            time.sleep(30)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*Timeout*", "*FAILED*test_slow.py::test_hangs*"])
