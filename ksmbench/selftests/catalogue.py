"""Which kernel selftest checks which behaviour, and how ksmbench judges the same one.

Every :class:`Peer` pairs one selftest (a ``ksm_tests`` invocation as
run_vmtests.sh makes it, or one ``test_*`` function of ksm_functional_tests)
with the ksmbench scenario that exercises the same behaviour, and the explicit
checks that give ksmbench's verdict from a real run of that scenario.  The
checks mirror the selftest's own assertions, translated into ksmbench metrics
(the selftests' "no PFN is mapped twice" becomes ``distinct_frames ==
present``: distinct_frames does not count the zero page, and the selftests'
``range_maps_duplicates()`` does see two zero-page mappings as a duplicate);
where ksmbench asks for more than the selftest does, the check says so.

Scenarios are built-in ones (``ksmbench scenarios``) where one fits, else
``peer-*`` scenarios (the built-in set ``peers``: ksmbench/scenario/peers/),
each a copy of the selftest's steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scenario import builtin, builtin_names
from ..scenario.model import Scenario
from .checks import Check

KSM_TESTS = "ksm_tests"
FUNCTIONAL = "ksm_functional_tests"


@dataclass(frozen=True)
class Peer:
    program: str               #: ksm_tests | ksm_functional_tests
    args: tuple[str, ...]      #: the program's arguments (as run_vmtests.sh passes them)
    test: str | None           #: the test_* function (ksm_functional_tests), else None
    behaviour: str             #: what is being checked, in one line
    scenario: str | None       #: the ksmbench scenario, or None: no counterpart
    checks: tuple[Check, ...] = ()
    note: str = ""             #: how ksmbench's checks differ, or why there is no counterpart

    @property
    def command_id(self) -> str:
        return " ".join((self.program, *self.args))

    @property
    def selftest(self) -> str:
        """How the selftest is named in tables: the command, or the test function."""
        if not self.program:
            return "(no selftest)"
        return self.test or self.command_id


def scenario(name: str) -> Scenario:
    """A peer scenario (``ksmbench/scenario/peers/``) or a built-in one, by name."""
    if name in builtin_names("peers"):
        return builtin(name, "peers")
    return builtin(name)


def _same_frames(step: int, scan: int | None, region: str, why: str) -> Check:
    return Check(step, scan, f"region.{region}.distinct_frames", "==", f"=region.{region}.present",
                 why)


def _child_ksm(flag_step: int, scan_step: int, flag_when: str, merged: str) -> tuple[Check, ...]:
    """test_child_ksm(): the child reads PR_GET_MEMORY_MERGE == 1, and 2 MiB it
    maps and fills (region b, 512 pages) merge after 2 scans without madvise."""
    return (Check(flag_step, None, "proc.child.ksm_merge_any", "==", 1,
                  f"PR_GET_MEMORY_MERGE is 1 {flag_when}", optional=True),
            Check(scan_step, 2, "region.child.b.distinct_frames", "==", 2,
                  f"{merged} (test_child_ksm()): 512 pages in 2 KSM pages"))


_NO_DUPLICATES = ("no frame is mapped twice (range_maps_duplicates() is false; "
                  "a zero-page mapping counts as shared)")
_NO_KPF_KSM = "ksmbench only: /proc/kpageflags shows no KSM page left in the range"

PEERS: tuple[Peer, ...] = (
    # -- ksm_tests, as run_vmtests.sh runs it ------------------------------------------
    Peer(KSM_TESTS, ("-M", "-p", "10"), None,
         "10 identical pages merge into one KSM page after 2 full scans",
         "dup-below-max", (
             Check(3, 2, "global.pages_shared", "==", 1,
                   "assert_ksm_pages_count(10) with max_page_sharing 256"),
             Check(3, 2, "global.pages_sharing", "==", 9, "assert_ksm_pages_count(10)"),
         )),
    Peer(KSM_TESTS, ("-U",), None,
         "a write to each of 2 merged pages unshares them; 1 full scan later 0 shared, 0 sharing",
         "peer-cow-unmerge", (
             Check(3, 2, "global.pages_shared", "==", 1,
                   "ksmbench only: the 2 pages did merge first (ksm_tests -U does not check)"),
             Check(3, 2, "global.pages_sharing", "==", 1, "ksmbench only: merged first"),
             Check(5, 1, "global.pages_shared", "==", 0, "assert_ksm_pages_count(0)"),
             Check(5, 1, "global.pages_sharing", "==", 0, "assert_ksm_pages_count(0)"),
         )),
    Peer(KSM_TESTS, ("-Z", "-p", "10", "-z", "0"), None,
         "with use_zero_pages=0 zero-filled pages merge like any duplicates",
         "zero-pages-as-duplicates", (
             Check(3, 2, "global.pages_shared", "==", 2,
                   "assert_ksm_pages_count(512): 512 pages at max_page_sharing 256 = 2 KSM pages"),
             Check(3, 2, "global.pages_sharing", "==", 510, "assert_ksm_pages_count(512)"),
         ),
         note="ksmbench uses 512 pages (two full max_page_sharing chains' worth) where "
              "ksm_tests uses 10: the same formula, also exercising stable_node chains"),
    Peer(KSM_TESTS, ("-Z", "-p", "10", "-z", "1"), None,
         "with use_zero_pages=1 zero-filled pages are not merged with each other",
         "zero-pages", (
             Check(3, 2, "global.pages_shared", "==", 0, "assert_ksm_pages_count(0)"),
             Check(3, 2, "global.pages_sharing", "==", 0, "assert_ksm_pages_count(0)"),
             Check(3, 2, "region.main.a.zero_pfn", "==", 512,
                   "ksmbench only: the pages really were replaced by the zero page"),
         ),
         note="ksm_tests -Z -z 1 only asserts 0 shared / 0 sharing, which a kernel that "
              "merges nothing at all also satisfies; ksmbench also requires every page to "
              "map the zero page"),
    # -- ksm_functional_tests -----------------------------------------------------------
    Peer(FUNCTIONAL, (), "test_unmerge",
         "MADV_UNMERGEABLE unshares merged pages at once",
         "peer-unmerge", (
             Check(3, 2, "region.main.a.distinct_frames", "==", 2,
                   "merged first: 512 pages in 2 KSM pages (the selftest fails on "
                   "ksm_merging_pages == 0)"),
             _same_frames(4, None, "main.a", _NO_DUPLICATES),
             Check(4, None, "region.main.a.ksm", "==", 0, _NO_KPF_KSM),
         )),
    Peer(FUNCTIONAL, (), "test_unmerge_zero_pages",
         "KSM-placed zero pages are counted per process, and unshared by MADV_UNMERGEABLE "
         "and by write faults (6.6, 79271476b336 and 6080d19f0704)",
         "zero-unmerge-half", (
             Check(3, 2, "proc.main.ksm_zero_pages", "==", 512,
                   "'ksm_zero_pages' updated after merging"),
             Check(3, 2, "region.main.a.zero_pfn", "==", 512,
                   "ksmbench only: the 512 pages map the zero page"),
             Check(4, None, "proc.main.ksm_zero_pages", "==", 256,
                   "'ksm_zero_pages' updated after unmerging (half the range)"),
             Check(4, None, "region.main.a.zero_pfn", "==", 256,
                   "ksmbench only: MADV_UNMERGEABLE really unshared the first half"),
             Check(5, None, "proc.main.ksm_zero_pages", "==", 0,
                   "'ksm_zero_pages' updated after write fault"),
             _same_frames(5, None, "main.a", "KSM zero pages were unmerged: " + _NO_DUPLICATES),
         )),
    Peer(FUNCTIONAL, (), "test_unmerge_discarded",
         "MADV_UNMERGEABLE over a range with discarded (pte_none) pages",
         "peer-unmerge-discarded", (
             Check(3, 2, "region.main.a.distinct_frames", "==", 2,
                   "merged first: 512 pages in 2 KSM pages"),
             Check(5, None, "region.main.a.present", "==", 256,
                   "ksmbench only: MADV_DONTNEED discarded the first half"),
             _same_frames(5, None, "main.a", _NO_DUPLICATES),
             Check(5, None, "region.main.a.ksm", "==", 0, _NO_KPF_KSM),
         )),
    Peer(FUNCTIONAL, (), "test_unmerge_uffd_wp",
         "MADV_UNMERGEABLE unshares KSM pages write-protected with userfaultfd-wp, without "
         "blocking (6.2, 6cce3314b928: an unshare fault instead of a fake write fault)",
         "uffd-wp-unmerge", (
             Check(3, 2, "region.main.a.distinct_frames", "==", 2,
                   "merged first: 512 pages in 2 KSM pages (mmap_and_merge_range())"),
             _same_frames(6, None, "main.a", "Pages were unmerged: " + _NO_DUPLICATES),
             Check(6, None, "region.main.a.ksm", "==", 0, _NO_KPF_KSM),
         ),
         note="the selftest skips where userfaultfd or its write-protect mode is missing; "
              "ksmbench then reports the scenario n/a"),
    Peer(FUNCTIONAL, (), "test_prot_none",
         "PROT_NONE pages merge, and are unshared by a write through /proc/self/mem and by "
         "MADV_UNMERGEABLE (needs 6.5, d74943a2f3cd: before it KSM's follow_page() does not "
         "see PROT_NONE pages)",
         "prot-none-unmerge", (
             Check(4, 2, "region.main.a.distinct_frames", "==", 2,
                   "merged first: 512 PROT_NONE pages in 2 KSM pages (mmap_and_merge_range() "
                   "fails on ksm_merging_pages == 0)"),
             Check(5, None, "region.main.a.present", "==", 512,
                   "ksmbench only: the /proc/self/mem writes (the selftest's 'ptrace write') "
                   "left every page mapped"),
             _same_frames(6, None, "main.a", _NO_DUPLICATES),
         ),
         note="the selftest writes an int (its offset) into each page of the first half; "
              "write_byte writes one byte from a 256-entry cycle, which breaks the sharing "
              "the same way (range_maps_duplicates() looks at frames, not contents)"),
    Peer(FUNCTIONAL, (), "test_prctl",
         "PR_SET_MEMORY_MERGE=1 / =0 take effect (6.4, d7597f59d1d3)",
         "prctl-merge", (
             Check(3, None, "proc.main.ksm_merge_any", "==", 1,
                   "PR_GET_MEMORY_MERGE would return 1 (ksm_stat shows it since ~6.14)",
                   optional=True),
             Check(4, 3, "region.main.a.distinct_frames", "==", 1,
                   "ksmbench only: =1 is effective: without madvise the 64 duplicate pages "
                   "share one frame (the 64 zero-filled ones map the zero page)"),
             Check(5, None, "proc.main.ksm_merge_any", "==", 0,
                   "PR_SET_MEMORY_MERGE=0 effective", optional=True),
         ),
         note="the selftest reads the flag back with PR_GET_MEMORY_MERGE; ksmbench sees it in "
              "ksm_stat only on kernels with ksm_merge_any (about 6.14), and otherwise judges "
              "by its effect (the pages merge)"),
    Peer(FUNCTIONAL, (), "test_prctl_fork",
         "PR_SET_MEMORY_MERGE=1 is inherited across fork; the child's memory merges",
         "peer-prctl-fork", _child_ksm(1, 4, "in the child", "merge in the child works")),
    Peer(FUNCTIONAL, (), "test_prctl_fork_exec",
         "PR_SET_MEMORY_MERGE=1 survives fork and exec (6.7, 3c6f33b7273a), and the exec'd "
         "process is scanned (6.10, 3a9e567ca45f)",
         "prctl-fork-exec",
         _child_ksm(2, 5, "after exec (test_child_ksm())", "merge in the exec'd child works"),
         note="the selftest re-executes itself; ksmbench's agent re-executes its own "
              "interpreter, keeping its control socket across exec"),
    Peer(FUNCTIONAL, (), "test_prctl_unmerge",
         "PR_SET_MEMORY_MERGE=0 unmerges the process's pages, KSM zero pages included (6.6)",
         "prctl-merge", (
             Check(4, 3, "region.main.a.distinct_frames", "==", 1,
                   "merged first through prctl: the 64 duplicates share one frame"),
             _same_frames(5, None, "main.a", _NO_DUPLICATES),
             Check(5, None, "region.main.a.ksm", "==", 0, _NO_KPF_KSM),
         ),
         note="prctl-merge also holds 64 zero-filled pages merged with use_zero_pages=1: "
              "unsharing those on PR_SET_MEMORY_MERGE=0 needs 6.6; the selftest maps no "
              "zero pages"),
    Peer(FUNCTIONAL, (), "test_fork_ksm_merging_page_count",
         "a forked child does not inherit its parent's ksm_merging_pages "
         "(6.18, 4d6fc29f3634; stable 6.6.y, 6.12.y)",
         "fork-after-merge", (
             Check(4, 3, "proc.main.ksm_merging_pages", "==", 128,
                   "merged first: 128 pages share one KSM page"),
             Check(5, None, "proc.child.ksm_merging_pages", "==", 0,
                   "ksm_merging_pages is not inherited after fork"),
         )),
    Peer("", (), None,
         "the global ksm_zero_pages stays right when a forked child that inherited KSM zero "
         "pages exits (the other half of 4d6fc29f3634)",
         "fork-after-merge", (
             Check(4, 3, "global.ksm_zero_pages", "==", 128, "128 KSM zero pages in the parent"),
             Check(9, None, "global.ksm_zero_pages", "==", 128,
                   "after the child exits the parent's 128 are still counted (without the fix "
                   "the child's exit subtracts 128 never added for it)"),
         ),
         note="no selftest: test_fork_global_ksm_zero_pages_count was posted with the fix "
              "but is not in the selftests of the sources used"),
)


def scenarios_needed(peers=PEERS) -> list[str]:
    return list(dict.fromkeys(p.scenario for p in peers if p.scenario))


def commands_needed(peers=PEERS) -> list[Peer]:
    """One Peer per distinct selftest command (program + args), in run order."""
    seen: dict[str, Peer] = {}
    for p in peers:
        if p.program and p.command_id not in seen:
            seen[p.command_id] = p
    return list(seen.values())


def check_catalogue() -> None:
    """Every named scenario exists and every check's step is one of its steps."""
    names = set(builtin_names()) | set(builtin_names("peers"))
    for p in PEERS:
        if p.scenario is None:
            continue
        if p.scenario not in names:
            raise ValueError(f"{p.selftest}: no scenario {p.scenario!r}")
        s = scenario(p.scenario)
        for c in p.checks:
            if not 0 <= c.step < len(s.steps):
                raise ValueError(f"{p.selftest}: step {c.step} not in {p.scenario}")
            step = s.steps[c.step]
            if (c.scan is None) != (step.op != "scan") or (c.scan and c.scan > step.count):
                raise ValueError(f"{p.selftest}: {c.where()} is not a point of {p.scenario}")
