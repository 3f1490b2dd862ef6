"""Benchmark helpers without a kernel: statistics, /proc parsers, the results
store, the savings arithmetic and the ksm_tests output parser."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from ksmbench.bench import probes, stats
from ksmbench.bench.crosscheck import parse_ksm_tests_output
from ksmbench.bench.outcome import CrosscheckNotDone, CrosscheckResult, SavingsResult
from ksmbench.sources.kernel_tools import closest_series
from ksmbench.bench.savings import Snapshot, Workload, _dup_merge, combine, reconcile, series_rows
from ksmbench.bench.store import BenchStore, read_bench
from ksmbench.bench.timings import plan

MIB = 1 << 20


# -- statistics ---------------------------------------------------------------------

def test_summary_of_known_samples():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 100.0], "s")
    assert s.n == 5
    assert s.median == 3.0
    assert s.mean == pytest.approx(22.0)
    assert s.mad == 1.0  # |x - 3| = 2,1,0,1,97 -> median 1
    assert (s.minimum, s.maximum) == (1.0, 100.0)
    assert s.unstable  # the outlier


def test_stable_samples_have_no_warning():
    s = stats.summarize([0.100, 0.101, 0.099, 0.1005, 0.0995], "s")
    assert s.warnings == ()
    assert not s.unstable
    assert s.rel_stdev < 0.01


def test_stdev_threshold_is_ten_percent_of_the_mean():
    # stdev/mean just under and just over 10 %
    under = [0.9, 1.1, 0.9, 1.1]   # mean 1, stdev 0.1155 -> 11.5 %
    assert any("standard deviation" in w for w in stats.stability_warnings(under, "s"))
    ok = [0.95, 1.05, 0.95, 1.05]  # 5.8 %
    assert not any("standard deviation" in w for w in stats.stability_warnings(ok, "s"))


def test_outlier_warning_names_the_maximum():
    warnings = stats.stability_warnings([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0], "s")
    assert any(w.startswith("the maximum") and "greater than the mean" in w for w in warnings)


def test_short_time_samples_are_flagged_only_for_times():
    assert any("shortest raw value" in w for w in stats.stability_warnings([0.0005] * 3, "s"))
    assert stats.stability_warnings([0.0005] * 3, "ratio") == []


def test_single_sample_and_nan_handling():
    s = stats.summarize([float("nan"), 2.0, None], "MiB/s")
    assert s.n == 1 and s.median == 2.0 and s.stdev == 0.0
    with pytest.raises(ValueError):
        stats.summarize([None, float("nan")])


def test_relative_difference_is_symmetric():
    assert stats.relative_difference(100, 105) == stats.relative_difference(105, 100)
    assert stats.relative_difference(100, 105) == pytest.approx(5 / 102.5)
    assert stats.relative_difference(0, 0) == 0.0


def test_format_value_scales_seconds():
    assert stats.format_value(2.5, "s") == "2.500 s"
    assert stats.format_value(0.0125, "s") == "12.50 ms"
    assert stats.format_value(0.0000125, "s") == "12.5 us"
    assert stats.format_value(512.25, "MiB/s") == "512.2 MiB/s"


# -- /proc parsers ------------------------------------------------------------------

def test_parse_stat_cpu_handles_spaces_in_comm():
    # fields 14/15 (utime, stime) = 250 and 50 ticks
    line = "37 (ksm d) S 2 0 0 0 -1 2097216 0 0 0 0 250 50 0 0 25 5 1 0 12 0 0"
    assert probes.parse_stat_cpu(line) == pytest.approx(300 / probes.CLOCK_TICKS)


def test_parse_schedstat_and_cpu_difference():
    from ksmbench.kernel.procfs import parse_schedstat

    assert parse_schedstat("156084837 3950745 648\n") == 156084837
    a = probes.CpuTime(1.0, 2_000_000_000)
    b = probes.CpuTime(1.5, 2_250_000_000)
    d = b - a
    assert d.stat_seconds == pytest.approx(0.5) and d.runtime_ns == 250_000_000
    assert d.seconds == pytest.approx(0.25)  # schedstat preferred over ticks
    assert (probes.CpuTime(1.5, None) - a).seconds == pytest.approx(0.5)


def test_thread_cpu_reads_a_fake_proc(fake_proc):
    (fake_proc / "37").mkdir()
    (fake_proc / "37" / "stat").write_text("37 (ksmd) S 2 0 0 0 -1 0 0 0 0 0 100 100 0 0\n")
    from ksmbench.kernel.procfs import ProcFS

    cpu = probes.ThreadCpu(37, ProcFS(fake_proc)).sample()
    assert cpu.runtime_ns is None  # no schedstat file: ticks only
    assert cpu.stat_seconds == pytest.approx(200 / probes.CLOCK_TICKS)


def test_parse_meminfo_and_pcp():
    info = probes.parse_meminfo("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n"
                                "HugePages_Total:       0\n")
    assert info == {"MemTotal": 24000000, "MemAvailable": 1000, "HugePages_Total": 0}
    zoneinfo = ("Node 0, zone   Normal\n  pagesets\n    cpu: 0\n              count:    13\n"
                "              high:     5011\n    cpu: 1\n              count:    29\n"
                "  node_unreclaimable:  0\n")
    assert probes.parse_pcp_pages(zoneinfo) == 42


def test_parse_ksm_tests_output_plain_and_ktap():
    plain = "Total size:    100 MiB\nTotal time:    0.270195733 s\nAverage speed:  370.103 MiB/s\nOK\n"
    assert parse_ksm_tests_output(plain) == (pytest.approx(0.270195733), pytest.approx(370.103))
    ktap = ("TAP version 13\n1..1\n# Total size:    100 MiB\n# Total time:    0.3 s\n"
            "# Average speed:  333.333 MiB/s\nok 1 KSM merge time\n")
    assert parse_ksm_tests_output(ktap) == (pytest.approx(0.3), pytest.approx(333.333))
    assert parse_ksm_tests_output("not ok 1 KSM merge time\n") == (None, None)


def test_closest_series():
    assert closest_series("6.18.44-fc-v657") == "6.18"
    assert closest_series("6.1.0-41-amd64") == "6.1"


# -- plan and expected counters --------------------------------------------------------

def test_plan_puts_repeats_outermost():
    p = plan((8, 16), 2, cases=(("dup", 0), ("zero", 1)))
    assert [x[0] for x in p] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert p[:4] == [(0, "dup", 0, 8), (0, "dup", 0, 16), (0, "zero", 1, 8), (0, "zero", 1, 16)]


@pytest.mark.parametrize("n, mps, expected", [
    (10, 256, (1, 9)),         # the example in docs/emulator.md
    (256, 256, (1, 255)),
    (257, 256, (1, 255)),      # N mod M == 1: one page left unshared
    (300, 256, (2, 298)),
    (1, 256, (0, 0)),
])
def test_dup_merge_matches_ksm_tests_formula(n, mps, expected):
    assert _dup_merge(n, mps) == expected


def test_workload_expected_counters():
    w = Workload(processes=4, mib_per_process=16)  # 4096 pages: 1024 zero, 2048 common, 1024 unique
    e1 = w.expected(use_zero_pages=1)
    assert e1 == {"pages_shared": 2048, "pages_sharing": 3 * 2048, "ksm_zero_pages": 4096,
                  "pages_unshared": 4096, "saved_pages": 3 * 2048 + 4096}
    e0 = w.expected(use_zero_pages=0)
    assert e0["ksm_zero_pages"] == 0
    assert e0["pages_shared"] == 2048 + 16  # 4096 zero pages / 256 per KSM page
    assert e0["pages_sharing"] == 3 * 2048 + 4096 - 16
    assert [x[2] for x in w.layout()] == ["zero", "cycle:common:2048", "unique"]


# -- reconciliation --------------------------------------------------------------------

def _snap(**kw) -> Snapshot:
    base = dict(seconds=0.0, counters={}, rmap_items=0, rss=0, uss=0, pss=0, anon_kb=0,
                available_kb=0, sunreclaim_kb=0, free_kb=0, pcp_pages=0, zero_pfn=0,
                ksm_frames_mapped=0, ksm_frames=0)
    base.update(kw)
    return Snapshot(**base)


def test_reconcile_expected_changes_follow_the_page_tables():
    page = 4096
    before = _snap(rss=1000 * page, uss=1000 * page, pss=1000 * page, anon_kb=4000, free_kb=100,
                   available_kb=100)
    # 300 mappings of 100 KSM pages (200 saved) + 50 KSM zero pages
    after = _snap(counters={"pages_shared": 100, "pages_sharing": 200, "ksm_zero_pages": 50,
                            "general_profit": 250 * page - 400 * 64},
                  rmap_items=400, rss=950 * page, uss=650 * page, pss=750 * page,
                  anon_kb=4000 - 250 * 4, free_kb=100 + 250 * 4 - 25, available_kb=100,
                  zero_pfn=50, ksm_frames_mapped=300, ksm_frames=100)
    unmerged = _snap(anon_kb=4000, pss=1000 * page)
    rec = reconcile(before, before, after, unmerged, 0.01, {}, 1)
    by = {v["view"]: v for v in rec["views"]}
    counters = by["KSM counters: (pages_sharing + ksm_zero_pages) x 4 KiB"]
    assert counters["saved_bytes"] == counters["expected_bytes"] == 250 * page
    assert by["KSM general_profit"]["residual_bytes"] == 0
    assert by["processes: sum of RSS"]["expected_bytes"] == 50 * page      # zero pages only
    assert by["processes: sum of RSS"]["residual_bytes"] == 0
    assert by["processes: sum of USS"]["expected_bytes"] == 350 * page     # every merged mapping
    assert by["processes: sum of USS"]["residual_bytes"] == 0
    assert by["processes: sum of PSS"]["residual_bytes"] == 0
    assert by["system: /proc/meminfo AnonPages"]["residual_bytes"] == 0
    # MemAvailable did not move (pages on per-CPU lists); MemFree+pcp saw them, minus slab
    assert by["system: /proc/meminfo MemAvailable"]["saved_bytes"] == 0
    assert rec["unmerge"]["predicted_bytes_by_counters"] == 250 * page
    assert rec["unmerge"]["measured_anon_bytes"] == 250 * page


def test_reconcile_counts_the_counters_from_a_non_zero_baseline():
    """A kernel that leaked 72 KSM zero pages before the run (6.18.44: zero
    pages in a MADV_DONTFORK region across fork, kept until reboot) shows them
    in ksm_zero_pages and general_profit at every snapshot; the savings count
    from the baseline read before the workload, which the result records."""
    page, leaked = 4096, 72
    baseline = {"pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0, "pages_volatile": 0,
                "ksm_zero_pages": leaked, "general_profit": leaked * page,
                "stable_node_chains": 0, "stable_node_dups": 0}
    before = _snap(counters=dict(baseline), baseline=baseline)
    # 30 mappings of 10 KSM pages (20 saved) + 50 KSM zero pages, 100 rmap items
    after = _snap(counters={**baseline, "pages_shared": 10, "pages_sharing": 20,
                            "ksm_zero_pages": leaked + 50,
                            "general_profit": (leaked + 70) * page - 100 * 64},
                  baseline=baseline, rmap_items=100, zero_pfn=50, ksm_frames_mapped=30,
                  ksm_frames=10)
    unmerged = _snap(counters=dict(baseline), baseline=baseline)
    rec = reconcile(before, before, after, unmerged, 0.01, {}, 1)
    by = {v["view"]: v for v in rec["views"]}
    counters = by["KSM counters: (pages_sharing + ksm_zero_pages) x 4 KiB"]
    assert counters["saved_bytes"] == 70 * page and counters["residual_bytes"] == 0
    assert by["KSM general_profit"]["saved_bytes"] == 70 * page - 100 * 64
    assert by["KSM general_profit"]["residual_bytes"] == 0
    assert rec["unmerge"]["predicted_bytes_by_counters"] == 70 * page
    assert rec["counters"]["ksm_zero_pages"] == 50
    assert rec["counters_baseline"]["ksm_zero_pages"] == leaked
    assert rec["after"]["counters"]["general_profit"] == 70 * page - 100 * 64
    rows = {(point, metric): value for _k, _u, _r, point, _s, _t, metric, value
            in series_rows("host", 1, 0, [("before", None, before), ("scan", 1, after)])}
    assert rows[("before", "counters.ksm_zero_pages")] == 0
    assert rows[("scan", "counters.ksm_zero_pages")] == 50
    assert rows[("scan", "counters.saved_bytes")] == 70 * page
    assert after.counters["ksm_zero_pages"] == leaked + 50  # kept as read


def test_baseline_note_names_what_was_not_zero():
    from ksmbench.observation import baseline_note

    assert baseline_note({"ksm_zero_pages": 0, "general_profit": 0, "pages_shared": None}) is None
    assert baseline_note(None) is None
    note = baseline_note({"pages_sharing": 0, "ksm_zero_pages": 72, "general_profit": 72 * 4096})
    assert note.startswith("ksm_zero_pages read 72, general_profit read 294912 before the run")
    assert "\n" not in note and "until reboot" in note


def test_reconcile_without_ksm_zero_pages_counter_says_so():
    after = _snap(counters={"pages_sharing": 10, "ksm_zero_pages": None}, zero_pfn=5,
                  ksm_frames_mapped=11, ksm_frames=1)
    rec = reconcile(_snap(), _snap(), after, _snap(), 0.0, {}, 1)
    counters = rec["views"][0]
    assert counters["saved_bytes"] == 10 * 4096  # what the counters show
    assert counters["expected_bytes"] == 15 * 4096  # what really is saved
    assert "no ksm_zero_pages counter" in counters["explanation"]


def test_combine_takes_medians_and_keeps_every_repeat():
    w = Workload(2, 4)
    recs = []
    for shift in (0, 3, 1):
        after = _snap(counters={"pages_sharing": 10, "ksm_zero_pages": 0}, ksm_frames_mapped=20,
                      ksm_frames=10, anon_kb=-(10 * 4) - shift * 4)
        recs.append(reconcile(_snap(), _snap(), after, _snap(), 0.1 * (shift + 1), {}, 0))
    c = combine(recs, w)
    anon = next(v for v in c.views if "AnonPages" in v.view)
    assert anon.residual_bytes == 1 * 4096
    assert (anon.residual_min_bytes, anon.residual_max_bytes) == (0, 3 * 4096)
    assert c.unmerge.run2_seconds == pytest.approx(0.2)
    assert len(c.repeats) == 3 and c.repeats_done == 3
    # bench.json holds it as a dict, and reads back the same
    assert SavingsResult.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# -- the results store ------------------------------------------------------------------

def test_store_writes_rows_as_they_come_and_summaries_with_samples(tmp_path):
    store = BenchStore(tmp_path, "run1")
    store.add_sample("host", "merge", "dup", 16, 0, 0, {"mib_per_s": (500.0, "MiB/s"),
                                                        "seconds": (0.032, "s")})
    # written and flushed before close
    rows = list(csv.DictReader(open(tmp_path / "run1" / "bench.csv")))
    assert {r["metric"] for r in rows} == {"mib_per_s", "seconds"}
    store.add_sample("host", "merge", "dup", 16, 0, 1, {"mib_per_s": (520.0, "MiB/s")})
    store.set_crosscheck("host", CrosscheckNotDone("no ksm_tests", 16, error_kind="KernelNotFound"))
    store.close()
    doc = json.loads((tmp_path / "run1" / "bench.json").read_text())
    summ = [s for s in doc["kernels"]["host"]["summaries"] if s["metric"] == "mib_per_s"][0]
    assert summ["samples"] == [500.0, 520.0]
    assert summ["summary"]["median"] == 510.0
    assert doc["kernels"]["host"]["crosscheck"] == {"error": "no ksm_tests", "size_mib": 16,
                                                    "error_kind": "KernelNotFound"}
    meta = json.loads((tmp_path / "run1" / "metadata.json").read_text())
    assert meta["kind"] == "bench" and meta["ended_at"]
    assert not (tmp_path / "run1" / "observations.csv").exists()
    df = read_bench(tmp_path / "run1")
    assert len(df) == 3


def _crosscheck_result() -> CrosscheckResult:
    from ksmbench.bench.config import FreeRunTunables

    ours, theirs = stats.summarize([333.0, 340.0], "MiB/s"), stats.summarize([330.0, 331.0], "MiB/s")
    return CrosscheckResult(size_mib=32, tunables=FreeRunTunables(pages_to_scan=500),
                            ours_mib_per_s=ours, ksm_tests_mib_per_s=theirs,
                            ratio=ours.median / theirs.median, relative_difference=0.02,
                            tolerance=0.05, agrees=True, argv=("ksm_tests", "-P"),
                            mib_per_s={"ksmbench": ours, "ksm_tests": theirs},
                            paired_ratios=(1.01, 1.03), paired_ratio_median=1.02)


def test_merge_guest_folds_a_guest_run_in(tmp_path):
    guest = BenchStore(tmp_path / "shared", "guest")
    guest.rundir.kernel_entry("debian:6.12").update(kernel_release="6.12.57+deb13-amd64")
    guest.add_sample("debian:6.12", "cow", "zero", 8, 1, 0, {"us_per_page": (3.5, "us")})
    guest.add_savings_rows([("debian:6.12", 1, 0, "scan", 1, 0.5, "counters.saved_bytes", 4096)])
    savings = {1: combine([reconcile(_snap(), _snap(), _snap(), _snap(), 0.1, {}, 1)], Workload(2, 4))}
    guest.set_savings("debian:6.12", savings)
    cc = _crosscheck_result()
    guest.set_crosscheck("debian:6.12", cc)
    guest.close()
    host = BenchStore(tmp_path / "out", "run")
    meta = host.merge_guest(tmp_path / "shared" / "guest", "debian:6.12")
    host.close()
    assert meta["kernels"][0]["kernel_release"] == "6.12.57+deb13-amd64"
    doc = json.loads((tmp_path / "out" / "run" / "bench.json").read_text())
    assert doc["kernels"]["debian:6.12"]["savings"]["1"]["repeats_done"] == 1
    assert host.results()["debian:6.12"].savings == savings
    assert host.crosscheck("debian:6.12") == cc  # typed, through the guest's bench.json
    assert doc["kernels"]["debian:6.12"]["summaries"][0]["samples"] == [3.5]
    savings = list(csv.reader(open(tmp_path / "out" / "run" / "savings.csv")))
    assert savings[1][:4] == ["debian:6.12", "1", "0", "scan"]


def test_cli_rejects_bad_options():
    from ksmbench.bench.config import parse_parts, parse_sizes
    from ksmbench.errors import UsageError

    assert parse_sizes("8, 16") == (8, 16)
    for bad in ("", "0", "x"):
        with pytest.raises(UsageError):
            parse_sizes(bad)
    assert parse_parts("timings,savings") == ("timings", "savings")
    with pytest.raises(UsageError):
        parse_parts("timings,speed")


def test_kpageflags_maps_every_frame_without_argsort(fake_proc):
    """FrameReader.kpageflags returns each frame's own flags for unsorted,
    repeated frame numbers (it must not rely on argsort: numpy's SIMD int64
    argsort gives wrong orders under QEMU 7.2 TCG)."""
    import numpy as np

    from ksmbench.kernel.procfs import FrameReader, ProcFS

    flags = np.arange(5000, dtype=np.uint64) * 3 + 1  # flags of frame f: 3f + 1
    (fake_proc / "kpageflags").write_bytes(flags.tobytes())
    (fake_proc / "self").mkdir()
    (fake_proc / "self" / "pagemap").write_bytes(b"")
    reader = FrameReader(ProcFS(fake_proc), "self")
    try:
        pfns = np.random.default_rng(3).integers(0, 5000, 3000)
        assert (reader.kpageflags(pfns) == pfns.astype(np.uint64) * 3 + 1).all()
    finally:
        reader.close()


def test_parse_tlb_shootdowns():
    text = ("           CPU0       CPU1\n  0:         44          0   IO-APIC   2-edge      timer\n"
            "CAL:    1777932    1886560   Function call interrupts\n"
            "TLB:     905285     875932   TLB shootdowns\n")
    assert probes.parse_tlb_shootdowns(text) == 905285 + 875932
    assert probes.parse_tlb_shootdowns("CAL: 1 2 Function call interrupts\n") is None


def test_a_measurement_disturbed_by_another_ksm_user_is_repeated():
    from rich.console import Console

    from ksmbench.bench.runner import ATTEMPTS, exclusively
    from ksmbench.errors import Busy

    class FakeSession:
        def __init__(self, intruders):
            self.intruders = list(intruders)
            self.waits = 0

        def wait_exclusive(self, timeout, what):
            self.waits += 1

        def still_exclusive(self):
            return self.intruders.pop(0) if self.intruders else None

    calls = []
    session = FakeSession(["pid 7 (qemu-system-x86) uses KSM"])
    result = exclusively(session, "merge", lambda: calls.append(1) or len(calls), wait=0,
                         console=Console(file=open("/dev/null", "w")))
    assert result == 2 and len(calls) == 2 and session.waits == 2  # first result discarded
    always = FakeSession(["x"] * ATTEMPTS)
    with pytest.raises(Busy):
        exclusively(always, "merge", lambda: None, wait=0, console=Console(file=open("/dev/null", "w")))


def test_ksmd_affinity_is_restored_and_a_killed_run_is_repaired(state_dir):
    """ksmd_on() narrows a thread's CPUs and gives them back; a marker left
    by a killed run is repaired.  This process stands in for ksmd."""
    import os

    from ksmbench.bench.affinity import KSMD_AFFINITY_MARKER, ksmd_on, repair_ksmd_affinity
    from ksmbench.kernel.tunables import boot_id

    me = os.getpid()
    everything = os.sched_getaffinity(me)
    one = {min(everything)}
    with ksmd_on(one, me):
        assert os.sched_getaffinity(me) == one
        assert (state_dir / KSMD_AFFINITY_MARKER).exists()
    assert os.sched_getaffinity(me) == everything
    assert not (state_dir / KSMD_AFFINITY_MARKER).exists()
    # a run killed while ksmd was narrowed: its marker names a dead pid
    os.sched_setaffinity(me, one)
    dead = subprocess_dead_pid()
    (state_dir / KSMD_AFFINITY_MARKER).write_text(json.dumps(
        {"pid": dead, "boot_id": boot_id(), "ksmd": me, "cpus": sorted(everything)}))
    message = repair_ksmd_affinity()
    assert message and "back CPUs" in message
    assert os.sched_getaffinity(me) == everything
    assert not (state_dir / KSMD_AFFINITY_MARKER).exists()


def subprocess_dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _AllKsmFlags:
    """kpageflags of a kernel with the KPF_KSM-on-every-anon-page bug
    (dee3d0bef2b0; Debian 6.12.117), or of a correct one (``only``)."""

    def __init__(self, only=None):
        self.only = only

    def kpageflags(self, pfns):
        from ksmbench.kernel.procfs import KPF_KSM

        pfns = np.asarray(pfns)
        ksm = np.ones(pfns.size, dtype=bool) if self.only is None else np.isin(pfns, self.only)
        return np.where(ksm, np.uint64(1 << KPF_KSM), np.uint64(0))


def test_classify_frames_ignores_kpageflags_that_flag_every_anon_page():
    zero = 7
    # two zero-page mappings, one KSM page mapped 3 times, two unmerged pages, one absent
    frames = np.array([zero, zero, 100, 100, 100, 200, 300, -1], dtype=np.int64)
    assert probes.classify_frames(_AllKsmFlags(), frames, zero) == (2, 3, 1)
    assert probes.classify_frames(_AllKsmFlags(only=[100]), frames, zero) == (2, 3, 1)
    # a frame mapped twice that is not KSM (no flag) is not counted
    assert probes.classify_frames(_AllKsmFlags(only=[]), frames, zero) == (2, 0, 0)
    assert probes.classify_frames(_AllKsmFlags(), np.array([-1, zero]), zero) == (1, 0, 0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_killed_crosscheck_gives_ksmd_its_cpus_back(state_dir):
    """The marker a SIGKILLed benchmark leaves names ksmd and its original
    CPUs; the next benchmark restores them (a sleeping child stands in for ksmd)."""
    import json
    import subprocess
    import sys

    from ksmbench.bench.affinity import KSMD_AFFINITY_MARKER, repair_ksmd_affinity
    from ksmbench.kernel.tunables import boot_id

    cpus = sorted(os.sched_getaffinity(0))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ksmd = subprocess.Popen(["sleep", "60"])
    try:
        os.sched_setaffinity(ksmd.pid, {cpus[-1]})  # what the killed run left
        (state_dir / KSMD_AFFINITY_MARKER).write_text(json.dumps(
            {"pid": dead.pid, "boot_id": boot_id(), "ksmd": ksmd.pid, "cpus": cpus}))
        message = repair_ksmd_affinity()
        assert message and f"pid {ksmd.pid}" in message
        assert sorted(os.sched_getaffinity(ksmd.pid)) == cpus
        assert not (state_dir / KSMD_AFFINITY_MARKER).exists()
        # a marker whose owner is alive is left alone
        (state_dir / KSMD_AFFINITY_MARKER).write_text(json.dumps(
            {"pid": ksmd.pid, "boot_id": boot_id(), "ksmd": ksmd.pid, "cpus": cpus}))
        assert repair_ksmd_affinity() is None
        assert (state_dir / KSMD_AFFINITY_MARKER).exists()
    finally:
        ksmd.kill()
        ksmd.wait()


def test_live_cpu_clock_reads_ksmd_at_least_as_far_as_schedstat():
    """The process CPU clock includes the slice ksmd is running now; schedstat
    only what was accounted.  Read second, the clock can never be behind."""
    from ksmbench.kernel.procfs import ProcFS

    pid = ProcFS().find_kthread("ksmd")
    if pid is None:
        pytest.skip("this kernel has no ksmd")
    before = ProcFS().sched_runtime(pid)
    live = probes.live_runtime_ns(pid)
    assert live is not None and live >= before
    assert probes.live_runtime_ns(2**22 + 12345) is None  # no such process
