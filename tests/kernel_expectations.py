"""What a real kernel must show for the built-in suite, by behaviour flag.

Each check reads one kernel's observations (an ``observations.csv`` as a
DataFrame) and takes the kernel's behaviour flags from its *fitted* profile
(``ksmbench.compare.identify.analyse`` on those observations), never from the host's
version: the same checks hold on 6.1, 6.12 or 6.18.  The numbers are the
kernel's documented behaviour and the per-scan table measured by hand
(ksmd stepped scan by scan), written down independently of the emulator.

``tests/test_host_kernel.py`` applies them to a live run on this host;
``tests/test_verdicts.py`` applies them to the recorded reference run of
Debian 6.1, Debian 6.12 and this host.
"""

from __future__ import annotations

import pandas as pd

from ksmbench.observation import ABSOLUTE_METRICS, BASELINE_STEP

PAGE = 4096
RMAP_ITEM = 64  # sizeof(struct ksm_rmap_item) on x86-64, as general_profit counts it


def load(csv_path, kernel: str | None = None) -> pd.DataFrame:
    df = pd.read_csv(csv_path, dtype={"observed": "Int64", "scan": "Int64"})
    return df if kernel is None else df[df.kernel == kernel]


def fitted_flags(df: pd.DataFrame, release: str) -> frozenset[str]:
    """The behaviour flags of the profile that fits these observations best."""
    from ksmbench.emulator.profiles import get_profile
    from ksmbench.compare.identify import analyse
    from ksmbench.observation import ObservationPoint
    from ksmbench.scenario import builtin_suite

    observed: dict[str, list[ObservationPoint]] = {}
    for (scenario, step, op, scan), rows in df.groupby(["scenario", "step", "op", "scan"],
                                                       dropna=False, sort=False):
        values = {m: (None if pd.isna(v) else int(v)) for m, v in zip(rows.metric, rows.observed)}
        observed.setdefault(scenario, []).append(
            ObservationPoint(int(step), op, None if pd.isna(scan) else int(scan), values))
    for points in observed.values():
        points.sort(key=lambda p: (p.step, p.scan or 0))
    suite = [s for s in builtin_suite() if s.name in observed]
    result = analyse(observed, suite, release)
    assert result.fitted_score.bad == 0, result.fitted_score.examples
    return get_profile(result.fitted).flags


def not_applicable(scenarios, flags) -> set[str]:
    """The scenarios a kernel with these behaviour flags reports n/a: prctl
    before 6.4 (PR_SET_MEMORY_MERGE), the scan-time advisor before 6.8."""
    na = set() if "prctl_memory_merge" in flags else needs_prctl(scenarios)
    if "advisor" not in flags:
        na |= {s.name for s in scenarios if s.ksm.advisor}
    return na


def needs_prctl(scenarios) -> set[str]:
    """The scenarios a kernel without PR_SET_MEMORY_MERGE (before 6.4) reports n/a."""
    from ksmbench.scenario import model as m

    return {s.name for s in scenarios if any(isinstance(step, m.Prctl) for step in s.steps)}


def needs_swap(scenarios) -> set[str]:
    """The scenarios a machine without swap in use reports n/a (``swap = true``);
    a guest ksmbench boots has its own zram device for them."""
    from ksmbench.kernel.swap import active_swaps

    return set() if active_swaps() else {s.name for s in scenarios if s.swap}


class Cells:
    """Observed values by (scenario, metric, step, scan).  Absolute global
    counters are read relative to the scenario's measured baseline, as the
    runner judges them: what an earlier run left in a counter (a leaked
    ksm_zero_pages stays until reboot) is not this scenario's doing."""

    def __init__(self, df: pd.DataFrame):
        self.df = df

    def __call__(self, scenario, metric, step, scan=None):
        value = self._one(scenario, metric, step, scan)
        if value is None or metric not in ABSOLUTE_METRICS or step == BASELINE_STEP:
            return value
        base = self._one(scenario, metric, BASELINE_STEP, None)
        return value - (base or 0)

    def _one(self, scenario, metric, step, scan):
        df = self.df
        rows = df[(df.scenario == scenario) & (df.metric == metric) & (df.step == step)]
        rows = rows[rows.scan.isna()] if scan is None else rows[rows.scan == scan]
        assert len(rows) == 1, (scenario, metric, step, scan, len(rows))
        value = rows.observed.iloc[0]
        return None if pd.isna(value) else int(value)

    def rows(self, scenario, metric, step):
        df = self.df
        return df[(df.scenario == scenario) & (df.step == step) & (df.metric == metric)]


# -- mixed-region: the per-scan table ------------------------------------------------------------

# after scan: shared, sharing, unshared, volatile, ksm_zero_pages, general_profit, chains, dups,
#             ksm_stat rmap_items, zero, merging, process_profit  (measured on 6.18, smart_scan on)
MEASURED = {
    1: (0, 0, 0, 3000, 0, -192000, 0, 0, 3000, 0, 0, -192000),
    2: (4, 996, 1000, 1000, 1000, 7983616, 1, 4, 3000, 1000, 1000, 8000000),
    3: (4, 996, 1000, 0, 1000, 8047616, 1, 4, 2000, 1000, 1000, 8064000),
    4: (4, 996, 1000, 0, 1000, 8047616, 1, 4, 2000, 1000, 1000, 8064000),
    5: (4, 996, 0, 1000, 1000, 8047616, 1, 4, 2000, 1000, 1000, 8064000),
}
COLUMNS = ("global.pages_shared", "global.pages_sharing", "global.pages_unshared",
           "global.pages_volatile", "global.ksm_zero_pages", "global.general_profit",
           "global.stable_node_chains", "global.stable_node_dups", "proc.main.ksm_rmap_items",
           "proc.main.ksm_zero_pages", "proc.main.ksm_merging_pages", "proc.main.ksm_process_profit")
ZERO_COUNTERS = ("global.ksm_zero_pages", "proc.main.ksm_zero_pages")
PROFITS = ("global.general_profit", "proc.main.ksm_process_profit")


def expected_mixed_region(scan: int, flags: frozenset[str]) -> dict[str, int | None]:
    expected: dict[str, int | None] = dict(zip(COLUMNS, MEASURED[scan]))
    tracking = "zero_page_tracking" in flags  # 6.6: the counters exist, profits count them
    if not tracking:
        for name in ZERO_COUNTERS:
            expected[name] = None
    if "ksm_profit" not in flags:  # before d21077fbc2fc (6.4)
        for name in PROFITS + ("proc.main.ksm_merging_pages",):
            expected[name] = None
    elif not tracking:  # 6.4-6.5: the 1000 KSM zero pages are not in the profit
        for name in PROFITS:
            expected[name] -= 1000 * PAGE
    if scan == 5 and "smart_scan" not in flags:
        # without smart_scan (5e924ff54d08, 6.7) the unique pages are visited
        # again and stay in the unstable tree: scan 5 is scan 4
        expected.update(zip(COLUMNS[:4], MEASURED[4][:4]))
    return expected


def check_mixed_region_table(cell: Cells, flags: frozenset[str]) -> None:
    scan_step = 5  # mixed-region: mmap, 3 fills, madvise, scan
    for scan in sorted(MEASURED):
        got = {metric: cell("mixed-region", metric, scan_step, scan) for metric in COLUMNS}
        assert got == expected_mixed_region(scan, flags), scan
        skipped = cell("mixed-region", "global.pages_skipped", scan_step, scan)
        if "smart_scan" in flags:
            assert skipped == (1000 if scan == 5 else 0)  # it skips the unique pages on scan 5
        else:
            assert skipped is None
        assert cell("mixed-region", "global.full_scans", scan_step, scan) == scan


# -- the zero-page series (6.6) and what came before it ------------------------------------------

def check_zero_pages_counted(cell: Cells, flags: frozenset[str]) -> None:
    s, step = "zero-pages", 3
    assert cell(s, "region.main.a.zero_pfn", step, 2) == 512  # use_zero_pages merges on every kernel
    assert cell(s, "global.pages_shared", step, 2) == 0
    assert cell(s, "proc.main.ksm_rmap_items", step, 3) == 0  # the zero page is not scanned again
    if "zero_page_tracking" in flags:
        assert cell(s, "global.ksm_zero_pages", step, 1) == 0
        assert cell(s, "global.ksm_zero_pages", step, 2) == 512
        assert cell(s, "proc.main.ksm_zero_pages", step, 2) == 512
        # profit counts zero pages (1a8e84305783); rmap items go one scan later
        assert cell(s, "global.general_profit", step, 2) == 512 * PAGE - 512 * RMAP_ITEM
        assert cell(s, "global.general_profit", step, 3) == 512 * PAGE
    else:
        assert cell(s, "global.ksm_zero_pages", step, 2) is None
        assert cell(s, "proc.main.ksm_zero_pages", step, 2) is None
    if "rss_exact" in flags:
        assert cell(s, "proc.main.rss_anon_scenario_pages", step, 1) == 512
        # replace_page(): MM_ANONPAGES-- for every page mapped to the zero page
        assert cell(s, "proc.main.rss_anon_scenario_pages", step, 2) == 0


def check_unmergeable_unshares_zero_pages(cell: Cells, flags: frozenset[str]) -> None:
    s = "zero-unmerge-half"
    assert cell(s, "region.main.a.present", 5) == 512
    if "zero_page_tracking" not in flags:
        # before 79271476b336, MADV_UNMERGEABLE leaves KSM zero pages mapped;
        # only the write faults of step 5 replace the second half
        assert cell(s, "region.main.a.zero_pfn", 4) == 512
        assert cell(s, "region.main.a.zero_pfn", 5) == 256
        assert cell(s, "global.ksm_zero_pages", 4) is None
        return
    assert cell(s, "global.ksm_zero_pages", 3, 2) == 512
    # MADV_UNMERGEABLE of the first half: unshared at once (79271476b336)
    assert cell(s, "global.ksm_zero_pages", 4) == 256
    assert cell(s, "proc.main.ksm_zero_pages", 4) == 256
    assert cell(s, "region.main.a.zero_pfn", 4) == 256
    if "rss_exact" in flags:
        assert cell(s, "proc.main.rss_anon_scenario_pages", 4) == 256
    # write faults on the second half: wp_page_copy() decrements at once
    assert cell(s, "global.ksm_zero_pages", 5) == 0
    assert cell(s, "region.main.a.zero_pfn", 5) == 0


def check_write_faults_on_zero_pages(cell: Cells, flags: frozenset[str]) -> None:
    s = "cow-zero-pages"
    assert cell(s, "region.main.a.zero_pfn", 3, 2) == 256
    assert cell(s, "region.main.a.zero_pfn", 5) == 128  # 2 x 64 pages written
    if "zero_page_tracking" in flags:
        assert cell(s, "global.ksm_zero_pages", 3, 2) == 256
        assert cell(s, "global.ksm_zero_pages", 4) == 192  # 64 pages written with a tag
        assert cell(s, "global.ksm_zero_pages", 5) == 128  # 64 more written with zeros


def check_dontneed_and_munmap(cell: Cells, flags: frozenset[str]) -> None:
    assert cell("zero-dontneed", "region.main.a.present", 4) == 156
    # read faults map the zero page again, but clean: not KSM-placed
    assert cell("zero-dontneed", "region.main.a.zero_pfn", 6) == 256
    assert cell.rows("zero-munmap", "region.main.a.present", 7).empty  # the region is gone
    if "zero_page_tracking" in flags:
        assert cell("zero-dontneed", "global.ksm_zero_pages", 3, 2) == 256
        assert cell("zero-dontneed", "global.ksm_zero_pages", 4) == 156
        assert cell("zero-dontneed", "global.ksm_zero_pages", 6) == 156  # not counted
        assert cell("zero-munmap", "global.ksm_zero_pages", 6, 2) == 320
        assert cell("zero-munmap", "global.ksm_zero_pages", 7) == 64


def check_unmerge_all(cell: Cells, flags: frozenset[str]) -> None:
    s = "unmerge-all"
    assert cell(s, "global.pages_sharing", 4, 2) == 199
    for metric in ("global.pages_shared", "global.pages_sharing", "proc.main.ksm_rmap_items"):
        assert cell(s, metric, 5) == 0, metric
    # run=2 unshares KSM zero pages only since 79271476b336 (6.6)
    tracking = "zero_page_tracking" in flags
    assert cell(s, "region.main.a.zero_pfn", 5) == (0 if tracking else 200)
    assert cell(s, "region.main.a.distinct_frames", 5) == (400 if tracking else 200)
    # the kpageflags bug (dee3d0bef2b0 until its fix) shows every anon page as KSM
    assert cell(s, "region.main.a.ksm", 5) == (cell(s, "region.main.a.distinct_frames", 5)
                                               if "kpf_ksm_all_anon" in flags else 0)
    assert cell(s, "region.main.a.zero_pfn", 6, 2) == 200  # merges again
    if tracking:
        assert cell(s, "global.ksm_zero_pages", 4, 2) == 200
        assert cell(s, "global.ksm_zero_pages", 5) == 0
        assert cell(s, "global.ksm_zero_pages", 6, 2) == 200


def check_read_fault_zero_pages(cell: Cells, flags: frozenset[str]) -> None:
    s = "read-fault-zero"
    assert cell(s, "region.main.a.zero_pfn", 1) == 256
    assert cell(s, "proc.main.ksm_rmap_items", 4, 2) == 0  # the zero page is never scanned
    assert cell(s, "region.main.a.zero_pfn", 5) == 256  # not unshared by MADV_UNMERGEABLE
    if "zero_page_tracking" in flags:
        assert cell(s, "global.ksm_zero_pages", 4, 2) == 0


def check_chains_above_max_page_sharing(cell: Cells, flags: frozenset[str]) -> None:
    s = "dup-above-max"
    # 50 pages, M=16: 4 KSM pages; 33 pages: 2 KSM pages + 1 unshared (ksm_tests formula)
    assert cell(s, "global.pages_shared", 6, 2) == 4 + 2
    assert cell(s, "global.pages_sharing", 6, 2) == (50 - 4) + (33 - 1 - 2)
    assert cell(s, "global.pages_unshared", 6, 2) == 1
    assert cell(s, "global.stable_node_chains", 6, 2) == 2
    assert cell(s, "global.stable_node_dups", 6, 2) == 6


CHECKS = (check_mixed_region_table, check_zero_pages_counted, check_unmergeable_unshares_zero_pages,
          check_write_faults_on_zero_pages, check_dontneed_and_munmap, check_unmerge_all,
          check_read_fault_zero_pages, check_chains_above_max_page_sharing)


def assert_every_cell_matches(df: pd.DataFrame, profile: str) -> int:
    """Every row of one kernel's observations.csv was judged against the
    emulator and matches: both values equal, or both absent, or one side
    absent for a metric on the unmodelled list.  Returns the cells compared."""
    from ksmbench.emulator import unmodelled_for
    from ksmbench.emulator.profiles import get_profile
    from ksmbench.metrics import unmodelled
    from ksmbench.scenario import builtin_suite

    excused = {s.name: unmodelled_for(s, profile) for s in builtin_suite()}
    flags = get_profile(profile).flags

    def by_flags(metric: str) -> bool:  # a scenario outside the suite
        return unmodelled(metric, flags=flags) is not None
    predicted = pd.to_numeric(df.predicted, errors="coerce").astype("Int64")
    match = df["match"].astype(str).str.lower()
    bad = df[match == "false"]
    assert bad.empty, f"{len(bad)} cells mismatch:\n{bad.head(12).to_string()}"
    # baseline rows (step -1) are the measured start predictions are rebased
    # on: observed by design, never predicted
    one_sided = df[(df.observed.isna() != predicted.isna()) & (df.op != "baseline")]
    unexcused = [(r.scenario, r.step, r.scan, r.metric) for r in one_sided.itertuples()
                 if not excused.get(r.scenario, by_flags)(r.metric)]
    assert unexcused == [], f"{len(unexcused)} one-sided cells, e.g. {unexcused[:8]}"
    both = df[df.observed.notna() & predicted.notna()]
    assert (match[both.index] == "true").all()
    return len(both)
