"""The peer suite's pure parts: KTAP and legacy output, the selftest build recipe,
the catalogue of selftest/scenario pairs, checks and verdicts (no root, no kernel)."""

from __future__ import annotations

import pytest

from ksmbench.sources.kernel_tools import (SelftestBuild, functional_test_names, makefile_recipe,
                                   selftest_compile_argv)
from ksmbench.observation import ObservationPoint
from ksmbench.scenario import builtin_names
from ksmbench.selftests import catalogue
from ksmbench.selftests.checks import Check, judge, verdict
from ksmbench.selftests.compare import (AGREE, DISAGREE, NOT_COMPARABLE, agreement,
                                        ksmbench_verdict, selftest_verdict)
from ksmbench.selftests.execute import Execution
from ksmbench.selftests.ktap import parse_ktap, parse_legacy, parse_output, split_lines

# What 6.12's ksm_functional_tests printed on the 6.18 host: test_prctl_fork_exec's
# child failed execv() (its argv array lacks the NULL terminator: EFAULT) and
# returned into main(), running the remaining tests a second time.
FUNCTIONAL_6_12_ON_6_18 = """\
TAP version 13
1..9
# [RUN] test_unmerge
ok 1 Pages were unmerged
# [RUN] test_unmerge_zero_pages
ok 2 KSM zero pages were unmerged
# [RUN] test_unmerge_discarded
ok 3 Pages were unmerged
# [RUN] test_unmerge_uffd_wp
ok 4 Pages were unmerged
# [RUN] test_prot_none
ok 5 Pages were unmerged
# [RUN] test_prctl
ok 6 Setting/clearing PR_SET_MEMORY_MERGE works
# [RUN] test_prctl_fork
ok 7 PR_SET_MEMORY_MERGE value is inherited
# [RUN] test_prctl_fork_exec
# [RUN] test_prctl_unmerge
ok 8 Pages were unmerged
# Planned tests != run tests (9 != 8)
# Totals: pass:8 fail:0 xfail:0 xpass:0 skip:0 error:0
ok 8 PR_SET_MEMORY_MERGE value is inherited
# [RUN] test_prctl_unmerge
ok 9 Pages were unmerged
# Totals: pass:9 fail:0 xfail:0 xpass:0 skip:0 error:0
"""

# mmap_and_merge_range() reports "Merging memory failed" without a newline, so
# the next test's [RUN] marker is glued to the result line.
GLUED = """\
TAP version 13
1..3
# [RUN] test_unmerge
# No pages got merged
not ok 1 Merging memory failed# [RUN] test_unmerge_zero_pages
ok 2 # SKIP open("/proc/self/ksm_stat") failed
# [RUN] test_unmerge_discarded
"""


def test_results_take_the_name_of_their_run_marker():
    parsed = parse_ktap(FUNCTIONAL_6_12_ON_6_18)
    by_name = {r.name: r for r in parsed.results}
    assert parsed.format == "ktap" and parsed.plan == 9
    assert by_name["test_unmerge_zero_pages"].verdict == "pass"
    assert by_name["test_unmerge_zero_pages"].message == "KSM zero pages were unmerged"
    assert parsed.unfinished == ["test_prctl_fork_exec"]
    assert parsed.repeated == [8]
    assert parsed.totals["pass"] == 9


def test_a_marker_glued_to_a_result_line_is_split_off():
    assert split_lines("not ok 1 Merging memory failed# [RUN] test_b") == [
        "not ok 1 Merging memory failed", "# [RUN] test_b"]
    parsed = parse_ktap(GLUED)
    first, second = parsed.results
    assert (first.name, first.verdict, first.message) == ("test_unmerge", "fail",
                                                         "Merging memory failed")
    assert first.diagnostics == ["No pages got merged"]
    assert (second.name, second.verdict) == ("test_unmerge_zero_pages", "skip")
    assert second.message == 'open("/proc/self/ksm_stat") failed'
    # killed while test_unmerge_discarded ran: no result line
    assert parsed.unfinished == ["test_unmerge_discarded"]


def test_ksm_tests_ktap_single_result():
    parsed = parse_output("TAP version 13\n1..1\n# Scan time limit exceeded\n"
                          "not ok 1 KSM unmerging\n# Totals: pass:0 fail:1\n", 1)
    (result,) = parsed.results
    assert (result.name, result.verdict) == ("KSM unmerging", "fail")
    assert parse_output("TAP version 13\n1..0 # SKIP Config KSM not enabled\n", 4).skipped == \
        "Config KSM not enabled"


@pytest.mark.parametrize("text,code,want", [
    ("OK\n", 0, "pass"),
    ("Scan time limit exceeded\nNot OK\n", 1, "fail"),
    ("", 1, "fail"),                               # crashed before printing anything
    ("NUMA support not enabled\n", 4, "skip"),     # KSFT_SKIP
])
def test_legacy_ksm_tests_output(text, code, want):
    parsed = parse_output(text, code)
    assert parsed.format == "legacy"
    assert parsed.results[0].verdict == want


def test_legacy_without_a_verdict_is_not_a_pass():
    assert parse_legacy("", None).results == []   # killed at the time limit: no verdict
    assert parse_output("garbage\n", None).format == "none"


# -- building -------------------------------------------------------------------------

MAKEFILE_6_1 = """\
TEST_GEN_FILES += ksm_tests
$(OUTPUT)/khugepaged: vm_util.c
$(OUTPUT)/madv_populate: vm_util.c
$(OUTPUT)/ksm_tests: LDLIBS += -lnuma
"""
MAKEFILE_6_12 = """\
TEST_GEN_FILES += ksm_tests
TEST_GEN_FILES += ksm_functional_tests
$(TEST_GEN_PROGS): vm_util.c thp_settings.c
$(TEST_GEN_FILES): vm_util.c thp_settings.c
$(OUTPUT)/uffd-stress: uffd-common.c
$(OUTPUT)/ksm_tests: LDLIBS += -lnuma
$(OUTPUT)/migration: LDLIBS += -lnuma
"""


def test_makefile_recipe_per_program_and_shared_helpers():
    assert makefile_recipe(MAKEFILE_6_1, "ksm_tests") == ([], ["-lnuma"])
    assert makefile_recipe(MAKEFILE_6_12, "ksm_tests") == (["vm_util.c", "thp_settings.c"],
                                                           ["-lnuma"])
    assert makefile_recipe(MAKEFILE_6_12, "ksm_functional_tests") == (
        ["vm_util.c", "thp_settings.c"], [])


def test_compile_argv_follows_the_makefile(tmp_path):
    tree = tmp_path / "linux-source-6.12"
    mm = tree / "tools" / "testing" / "selftests" / "mm"
    mm.mkdir(parents=True)
    (mm / "Makefile").write_text(MAKEFILE_6_12)
    for name in ("ksm_tests.c", "vm_util.c"):  # no thp_settings.c in this tree
        (mm / name).write_text("")
    argv = selftest_compile_argv(tree, mm, "ksm_tests", tmp_path / "out", "gcc")
    assert argv[:3] == ["gcc", "-Wall", "-O2"]
    assert ["-isystem", str(tree / "tools" / "include" / "uapi")] == argv[argv.index("-isystem"):
                                                                      argv.index("-isystem") + 2]
    assert "ksm_tests.c" in argv and "vm_util.c" in argv and "thp_settings.c" not in argv
    assert argv.index("-lnuma") > argv.index("ksm_tests.c")
    assert "-U_FORTIFY_SOURCE" in argv and "-no-pie" in argv


def test_functional_test_names_come_from_main():
    source = """
static void test_unused(void) {}
int main(int argc, char **argv)
{
	test_unmerge();
	test_unmerge_zero_pages();
#ifdef __NR_userfaultfd
	test_unmerge_uffd_wp();
#endif
	err = ksft_get_fail_cnt();
}
"""
    assert functional_test_names(source) == ("test_unmerge", "test_unmerge_zero_pages",
                                             "test_unmerge_uffd_wp")


# -- catalogue, checks, verdicts ------------------------------------------------------------

def test_catalogue_is_consistent():
    catalogue.check_catalogue()  # every scenario exists, every check names one of its points
    for peer in catalogue.PEERS:
        for check in peer.checks:
            assert check.why, (peer.selftest, check)
        if peer.scenario is None:
            assert peer.note.startswith("no counterpart")


def test_every_peer_scenario_loads():
    for name in builtin_names("peers"):
        scenario = catalogue.scenario(name)
        assert scenario.name == name and scenario.steps


def _point(step, scan, **values):
    return ObservationPoint(step, "scan" if scan else "madvise", scan,
                            {k.replace("__", "."): v for k, v in values.items()})


def test_checks_judge_values_metrics_and_absence():
    points = {(3, 2): _point(3, 2, global__pages_shared=1, region__main__a__present=8,
                             region__main__a__distinct_frames=8, proc__main__ksm_zero_pages=None)}
    eq = judge(Check(3, 2, "global.pages_shared", "==", 1, "x"), points)
    same = judge(Check(3, 2, "region.main.a.distinct_frames", "==", "=region.main.a.present", "x"),
                 points)
    wrong = judge(Check(3, 2, "global.pages_shared", "==", 2, "x"), points)
    absent = judge(Check(3, 2, "proc.main.ksm_zero_pages", "==", 8, "x"), points)
    missing = judge(Check(5, None, "global.pages_shared", "==", 0, "x"), points)
    assert [r.outcome for r in (eq, same, wrong, absent, missing)] == [
        "pass", "pass", "fail", "absent", "missing"]
    assert "= 1, wanted == 2" in wrong.describe()
    assert verdict([eq, same]) == "pass"
    assert verdict([eq, wrong, absent]) == "fail"        # a failure beats absence
    assert verdict([eq, absent]) == "n/a"                # a required counter is missing
    optional = judge(Check(3, 2, "proc.main.ksm_zero_pages", "==", 8, "x", optional=True), points)
    assert verdict([eq, optional]) == "pass"
    assert verdict([eq], error="boom") == "error"


def test_agreement_table():
    assert agreement("pass", "pass") == AGREE
    assert agreement("fail", "fail") == AGREE
    assert agreement("skip", "unsupported") == AGREE
    assert agreement("pass", "fail") == DISAGREE
    assert agreement("fail", "pass") == DISAGREE
    for pair in (("absent", "pass"), ("pass", "n/a"), ("timeout", "pass"), ("none", "pass"),
                 ("error", "fail"), ("pass", "none")):
        assert agreement(*pair) == NOT_COMPARABLE


def _build(functional=("test_unmerge",), missing=None):
    from pathlib import Path

    return SelftestBuild("6.18", "linux-source-6.12", "6.12.117-1", Path("/nowhere"),
                         {"ksm_tests": Path("/nowhere/ksm_tests"),
                          "ksm_functional_tests": Path("/nowhere/ksm_functional_tests")},
                         missing or {}, tuple(functional))


def _peer(test):
    return next(p for p in catalogue.PEERS if p.test == test)


def test_selftest_verdicts_absent_timeout_and_not_run():
    peer = _peer("test_unmerge_zero_pages")
    assert selftest_verdict(peer, _build(), {}, None).verdict == "absent"
    build = _build(("test_unmerge", "test_unmerge_zero_pages", "test_unmerge_discarded"))
    killed = Execution("ksm_functional_tests", [], "log", returncode=-9, timed_out=True,
                       error="killed", output=GLUED)
    runs = {"ksm_functional_tests": killed}
    assert selftest_verdict(_peer("test_unmerge"), build, runs, None).verdict == "fail"
    assert selftest_verdict(peer, build, runs, None).verdict == "skip"
    assert selftest_verdict(_peer("test_unmerge_discarded"), build, runs, None).verdict == "timeout"
    no_source = _build(missing={"ksm_functional_tests": "linux-source-6.1 has no it"})
    assert selftest_verdict(peer, no_source, {}, None).verdict == "absent"
    assert selftest_verdict(_peer("test_unmerge"), build, {}, "VM did not boot").detail == \
        "VM did not boot"


def test_the_broken_fork_exec_child_is_explained():
    build = _build(("test_prctl_fork_exec", "test_prctl_unmerge"))
    run = Execution("ksm_functional_tests", [], "log", returncode=0,
                    output=FUNCTIONAL_6_12_ON_6_18)
    v = selftest_verdict(_peer("test_prctl_fork_exec"), build, {"ksm_functional_tests": run}, None)
    assert v.verdict == "error" and "reported twice" in v.detail


def test_ksmbench_verdicts_from_points():
    peer = _peer("test_unmerge")  # peer-unmerge: 512 pages merge, then MADV_UNMERGEABLE
    merged = _point(3, 2, region__main__a__ksm=512, region__main__a__distinct_frames=2)
    good = [merged, _point(4, None, region__main__a__ksm=0, region__main__a__present=512,
                           region__main__a__distinct_frames=512)]
    bad = [merged, _point(4, None, region__main__a__ksm=512, region__main__a__present=512,
                          region__main__a__distinct_frames=2)]
    assert ksmbench_verdict(peer, good, None)[0] == "pass"
    v, results, detail = ksmbench_verdict(peer, bad, None)
    assert v == "fail" and "region.main.a.ksm = 512" in detail
    assert "region.main.a.distinct_frames = 2, wanted == region.main.a.present = 512" in detail
    prctl = _peer("test_prctl")
    v, _, detail = ksmbench_verdict(prctl, [], "process 'main': prctl(PR_SET_MEMORY_MERGE, 1) "
                                               "failed: EINVAL (Invalid argument)")
    assert v == "unsupported" and "EINVAL" in detail
    assert ksmbench_verdict(peer, None, "the guest panicked")[0] == "error"


def test_checks_count_absolute_counters_from_the_scenario_baseline():
    """A ksm_zero_pages an earlier run leaked (it stays until reboot) does not
    fail a check that expects the scenario's own count."""
    from ksmbench.observation import BASELINE, ObservationPoint
    from ksmbench.selftests.checks import Check, index_points, judge

    points = [ObservationPoint(-1, BASELINE, None, {"global.ksm_zero_pages": 103}),
              ObservationPoint(9, "exit", None, {"global.ksm_zero_pages": 231,
                                                 "proc.main.ksm_zero_pages": 128})]
    indexed = index_points(points)
    assert judge(Check(9, None, "global.ksm_zero_pages", "==", 128, "kept"), indexed).outcome == "pass"
    assert judge(Check(9, None, "proc.main.ksm_zero_pages", "==", 128, "own"), indexed).outcome == "pass"
