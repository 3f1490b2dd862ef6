"""Kernel behaviour profiles: named sets of behaviour flags.

A *flag* is one behaviour that changed at a known kernel commit.  A
*profile* says, for every flag, whether the kernel has it.  Profiles are
named after kernel versions (``linux-6.6``, ``linux-6.12.57``): the flags are
derived from the version, including the stable backports we know of, and a
profile name may end with explicit overrides (``linux-6.12,+fork_counter_fix``
or ``linux-6.18,-checksum_first``), which is how :mod:`ksmbench.compare.identify`
asks "what if this kernel had / lacked that patch".

Each flag cites the upstream commit and the release that first carried it;
``stable`` lists the stable series that got a backport and the first point
release with it.  Point-release numbers marked "approx" were dated from the
stable review mails (Greg KH's "X.Y-stable review patch" posts), not read from
tags; ``ksmbench identify`` measures the flags directly when it matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from ..console import make_console
from ..errors import UsageError


@dataclass(frozen=True)
class Flag:
    name: str
    commit: str
    since: tuple[int, int]
    what: str
    #: stable series -> first point release carrying the backport
    stable: dict[tuple[int, int], int] = field(default_factory=dict)
    #: True when the stable point release is an estimate (see module doc)
    stable_approx: bool = False
    #: for a *bug* flag: the release whose fix ends it, and stable fixes
    fixed_in: tuple[int, int] | None = None
    fix_stable: dict[tuple[int, int], int] = field(default_factory=dict)

    def present_in(self, version: tuple[int, int, int]) -> bool:
        major, minor, patch = version
        if self.fixed_in is not None:
            if (major, minor) < self.since or (major, minor) >= self.fixed_in:
                return False
            first_fixed = self.fix_stable.get((major, minor))
            return first_fixed is None or patch < first_fixed
        if (major, minor) >= self.since:
            return True
        first = self.stable.get((major, minor))
        return first is not None and patch >= first

    def describe(self) -> str:
        return f"{self.name}: {self.what} ({self.where()})"

    def where(self) -> str:
        """Commit, release, stable backports (and fix, for a bug flag)."""
        text = f"{self.commit}, {self.since[0]}.{self.since[1]}"
        approx = "~" if self.stable_approx else ""
        if self.stable:
            text += "; stable " + ", ".join(f"{a}.{b}.{approx}{p}" for (a, b), p in
                                            sorted(self.stable.items()))
        if self.fixed_in:
            text += f"; fixed in {self.fixed_in[0]}.{self.fixed_in[1]}"
            if self.fix_stable:
                text += ", stable " + ", ".join(f"{a}.{b}.{approx}{p}" for (a, b), p in
                                                sorted(self.fix_stable.items()))
        return text


FLAGS: tuple[Flag, ...] = (
    Flag("ksm_stat", "cb4df4cae4f2", (6, 1),
         "/proc/<pid>/ksm_stat exists with ksm_rmap_items"),
    Flag("ksm_profit", "d21077fbc2fc", (6, 4),
         "sysfs general_profit; ksm_merging_pages and ksm_process_profit in ksm_stat"),
    Flag("prctl_memory_merge", "d7597f59d1d3", (6, 4),
         "PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE"),
    # break_ksm() cleanups (David Hildenbrand), merged for 6.2; not for stable
    # ("not easy to backport and it's not very critical"): Debian 6.1 lacks it
    Flag("uffd_wp_unshare", "6cce3314b928", (6, 2),
         "break_ksm() unshares with FAULT_FLAG_UNSHARE, which userfaultfd-wp does not intercept; "
         "before it, its fake write fault on a KSM page write-protected with userfaultfd-wp "
         "failed (VM_FAULT_SIGBUS) and MADV_UNMERGEABLE / run=2 left the page merged"),
    Flag("zero_page_tracking", "79271476b336+e2942062e01d+6080d19f0704+1a8e84305783", (6, 6),
         "KSM zero PTEs are marked dirty, unshared by MADV_UNMERGEABLE/prctl/run=2, counted in "
         "sysfs and ksm_stat ksm_zero_pages, and counted in both profits"),
    # 474098edac26 (6.1) made follow_page_pte() treat a PROT_NONE
    # PTE as absent unless FOLL_FORCE, so KSM's follow_page() calls in
    # break_ksm() and get_mergeable_page() stopped seeing PROT_NONE pages; the
    # fix reintroduced the flag as FOLL_HONOR_NUMA_FAULT, which follow_page()
    # never sets.  Debian 6.1.176 still has the 6.1 gup_can_follow_protnone(),
    # and its scan walks page tables itself (ksm_next_page_pmd_entry(), from
    # f5548c318d65), so there PROT_NONE pages are scanned but neither unshared
    # nor found as unstable-tree pages.
    Flag("protnone_follow", "d74943a2f3cd", (6, 5),
         "follow_page() finds pages in PROT_NONE VMAs again: MADV_UNMERGEABLE unshares them and "
         "an unstable-tree search can merge with them (before: break_ksm() skips them and a "
         "search that meets one gives up)"),
    Flag("pages_scanned", "b348b5fe2b5f", (6, 6), "sysfs pages_scanned"),
    Flag("pages_scanned_fix", "730cdc2c72c6", (6, 10),
         "pages_scanned counted per item; before it, a batch that completes a full scan adds "
         "nothing, so one-scan-per-batch stepping leaves it at 0, and a partial batch of N "
         "pages adds N + 1 (the loop counter wraps)",
         stable={(6, 6): 33, (6, 8): 12, (6, 9): 3}, stable_approx=True),
    Flag("smart_scan", "5e924ff54d08+e5a689912689", (6, 7),
         "smart_scan skips pages that keep failing to merge; sysfs pages_skipped"),
    # the scan-time advisor (Stefan Roesch; 66790e9a735b added its sysfs knobs
    # in the same release): scan_time_advisor() sets pages_to_scan after each
    # full scan; unchanged from 6.8 to 7.3 (emulator/advisor.py)
    Flag("advisor", "4e5fa4f5eff6", (6, 8),
         "advisor_mode=scan-time: pages_to_scan set by the advisor after each full scan"),
    Flag("merge_any_exec", "3c6f33b7273a", (6, 7),
         "MMF_VM_MERGE_ANY is in MMF_INIT_MASK: PR_SET_MEMORY_MERGE survives exec (and fork)"),
    Flag("ksm_execve", "3a9e567ca45f", (6, 10),
         "ksm_execve(): an exec'd mm with MMF_VM_MERGE_ANY is registered with ksmd at exec; "
         "before it the new mm had the flag but no mm slot, so nothing in it was scanned"),
    # "mm/ksm: optimize the chain()/chain_prune() interfaces" (Chengming Zhou),
    # the third patch of the series that brought checksum_first.  Found by the
    # THP differential campaign on Debian 6.1 (seed 720020: regions of 512
    # pages, max_page_sharing=2): a chain left with one full dup
    Flag("chain_best_dup", "a0b856b617c5", (6, 11),
         "stable_node_dup() picks the best dup even when none has room, and a chain whose "
         "only dup is that one collapses into it on every walk; before it only a dup with "
         "room is picked (a chain of full dups is walked through its first dup and nothing "
         "merges into it) and a chain collapses only on a pruning walk that found exactly "
         "one live dup, and it has room"),
    Flag("checksum_first", "ac90c56bbd73+d58a361b0350", (6, 11),
         "cmp_and_merge_page() checks the checksum before the stable tree: a page identical to "
         "an existing KSM page merges on its second visit, not its first"),
    Flag("ksm_stat_involvement", "3ab76c767bc7", (6, 14),
         "ksm_merge_any: / ksm_mergeable: lines in ksm_stat"),
    Flag("rss_exact", "82241a83cd15", (6, 16),
         "/proc/<pid>/status RssAnon is the exact per-cpu sum (else it lags by up to a "
         "per-cpu batch per CPU and is not predictable)",
         stable={(6, 12): 38, (6, 15): 7}, stable_approx=True),
    Flag("merge_any_kept", "590c03ca6a3f", (6, 18),
         "ksmd no longer clears MMF_VM_MERGE_ANY when it drops an mm without mergeable VMAs; "
         "a later mmap re-registers the mm",
         # identify on Debian 6.12.117 showed the behaviour: backported to 6.12.y.
         # Debian 6.17.13 does not have it (33 cells disagree with it on, none
         # with it off): the 6.17.y backport once listed here did not land by .13
         stable={(6, 12): 58}, stable_approx=True),
    # A bug, not a feature: present from `since` until its fix.  Measured on
    # Debian 6.12.117 (every anon page reads KPF_KSM) and on this host's
    # 6.18.44 (only KSM pages do).  The fix is "fs/proc: fix KPF_KSM reported
    # for all anonymous pages" (Jinjiang Tu, mm-hotfixes July 2026, Cc stable;
    # it does not apply to 6.12's PAGE_MAPPING_* names as is).
    Flag("kpf_ksm_all_anon", "dee3d0bef2b0", (6, 10),
         "bug: stable_page_flags() tests mapping & PAGE_MAPPING_KSM, which every anon folio "
         "passes, so /proc/kpageflags shows KPF_KSM on all anonymous pages (region.*.ksm "
         "counts every present anon page)",
         fixed_in=(7, 2), fix_stable={(6, 18): 36}, stable_approx=True),
    Flag("fork_counter_fix", "4d6fc29f3634", (6, 18),
         "fork zeroes the child's ksm_rmap_items/ksm_merging_pages and adds its inherited KSM "
         "zero pages to the global ksm_zero_pages (before: the child inherits the parent's "
         "counters and the global counter is not raised)",
         stable={(6, 6): 112, (6, 12): 54, (6, 17): 4}, stable_approx=True),
    # mm/huge_memory.c: __split_huge_page() remaps with RMP_USE_SHARED_ZEROPAGE for
    # an anonymous folio, and remove_migration_pte() maps each subpage that
    # memchr_inv() finds all zero to the zero page (try_to_map_unused_to_zeropage()).
    # Every split of an anonymous THP does it, KSM's in try_to_merge_one_page()
    # too (measured on this host's 6.18: docs/emulator.md, "THP regions")
    Flag("thp_split_zero_remap", "b1f202060afe", (6, 12),
         "splitting an anonymous THP (KSM does before it merges a subpage) maps every "
         "zero-filled subpage to the shared zero page with a clean PTE: the frame is freed, "
         "no KSM zero page is counted, and a merge of such a subpage fails"),
    # Found by diffing Debian's linux-source-7.2 (7.2.13) and linux-source-7.3
    # (7.3.4) mm/ksm.c; the upstream commit id was not found, so the flag cites
    # the release and the code.  struct ksm_rmap_item puts the new
    # linear_page_index (remembered for rmap_walk_ksm()) in a union with
    # oldchecksum/age/remaining_skips; remove_rmap_item_from_tree(),
    # remove_node_from_stable_tree() and break_cow() zero it when an item
    # leaves the stable tree, and should_skip_rmap_item() returns false for an
    # item that still has STABLE_FLAG.
    Flag("stable_item_reset", "7.3:ksm_rmap_item.linear_page_index", (7, 3),
         "an rmap item leaving the stable tree (its KSM page CoW-broken, unshared or freed) "
         "starts over: oldchecksum, age and remaining_skips read 0, so the page needs two "
         "visits with unchanged content to merge again and smart_scan ages it from 0; an item "
         "still on the stable tree is neither aged nor skipped"),
)
FLAG_NAMES: tuple[str, ...] = tuple(f.name for f in FLAGS)
FLAG_BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}

#: the named presets (any linux-X.Y[.Z] is accepted too)
PRESETS: tuple[str, ...] = ("linux-6.1", "linux-6.6", "linux-6.7", "linux-6.11", "linux-6.12",
                            "linux-6.18", "linux-7.3")

_NAME_RE = re.compile(r"linux-(\d+)\.(\d+)(?:\.(\d+))?\Z")

#: the oldest kernel a profile describes: /proc/<pid>/ksm_stat (cb4df4cae4f2)
#: arrived in 6.1, and no flag models what came before it
OLDEST = (6, 1)


@dataclass(frozen=True)
class Profile:
    name: str
    version: tuple[int, int, int]
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def __getattr__(self, item: str) -> bool:
        if item in FLAG_BY_NAME:
            return item in self.flags
        raise AttributeError(item)


def flags_for_version(version: tuple[int, int, int]) -> frozenset[str]:
    return frozenset(f.name for f in FLAGS if f.present_in(version))


def parse_release(release: str) -> tuple[int, int, int] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release or "")
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def _known() -> str:
    return (", ".join(PRESETS) + ", or linux-X.Y[.Z] for any version, optionally followed by "
            "',+flag' / ',-flag' overrides (flags: " + ", ".join(FLAG_NAMES) + ")")


@lru_cache(maxsize=256)
def get_profile(name: str) -> Profile:
    """Parse and validate a profile name; UsageError names the known ones."""
    parts = [p.strip() for p in str(name).split(",")]
    m = _NAME_RE.match(parts[0])
    if not m:
        raise UsageError(f"unknown emulator profile '{name}'", hint=f"known: {_known()}")
    version = (int(m[1]), int(m[2]), int(m[3] or 0))
    if version[:2] < OLDEST:
        raise UsageError(f"emulator profile '{name}': no profile describes kernels before "
                         f"{OLDEST[0]}.{OLDEST[1]}",
                         hint=f"use linux-{OLDEST[0]}.{OLDEST[1]} or later; known: {', '.join(PRESETS)}")
    flags = set(flags_for_version(version))
    for mod in parts[1:]:
        if len(mod) < 2 or mod[0] not in "+-" or mod[1:] not in FLAG_BY_NAME:
            raise UsageError(f"profile '{name}': '{mod}' is not +flag or -flag",
                             hint="flags: " + ", ".join(FLAG_NAMES))
        if mod[0] == "+":
            flags.add(mod[1:])
        else:
            flags.discard(mod[1:])
    return Profile(name, version, frozenset(flags))


def profile_for_release(release: str | None) -> str | None:
    """The profile that fits a kernel release string, e.g. '6.12.57+deb13-amd64'."""
    version = parse_release(release or "")
    if version is None or version[:2] < OLDEST:
        return None  # no profile describes it: observations are not compared
    major, minor, patch = version
    return f"linux-{major}.{minor}.{patch}" if patch else f"linux-{major}.{minor}"


def resolve_profile(name: str, release: str | None = None) -> Profile:
    """A ``--profile`` value as given to a command: ``auto`` is the profile of
    ``release`` (default: this machine's running kernel), as ``run`` picks it."""
    if name != "auto":
        return get_profile(name)
    if release is None:
        from ..kernel.features import kernel_release

        release = kernel_release()
    chosen = profile_for_release(release)
    if chosen is None:
        raise UsageError(f"--profile auto: no profile describes kernel {release}",
                         hint=f"give one, e.g. --profile linux-6.18 (known: {', '.join(PRESETS)})")
    return get_profile(chosen)


def describe_flags(profile: Profile) -> list[tuple[str, bool, str]]:
    return [(f.name, f.name in profile.flags, f.describe()) for f in FLAGS]


def main(argv: list[str] | None = None) -> int:
    """``python -m ksmbench.emulator [PROFILE...]``: the flags, and
    which of them each profile (default: the presets) has."""
    import sys

    from rich.table import Table

    names = list(argv if argv is not None else sys.argv[1:]) or list(PRESETS)
    profiles = [get_profile(n) for n in names]
    table = Table(title="emulator behaviour flags")
    table.add_column("flag")
    table.add_column("commit / version")
    for p in profiles:
        table.add_column(p.name, justify="center")
    for f in FLAGS:
        table.add_row(f.name, f.where(), *["yes" if f.name in p.flags else "-" for p in profiles])
    make_console().print(table)
    for f in FLAGS:
        print(f"{f.name}: {f.what}")
    return 0

