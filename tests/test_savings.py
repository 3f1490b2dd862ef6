"""``ksmbench savings``: page hashing, process snapshots, the prediction (no
root), and one real workload end to end on this host (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ksmbench.errors import UsageError
from ksmbench.kernel.syscalls import PAGE_SIZE, Region
from ksmbench.savings.measure import churn_between
from ksmbench.savings.predict import Predictor, Tunables
from ksmbench.savings.snapshot import (Area, ProcessImage, Snapshotter, hash_pages, is_zero,
                                       parse_smaps_vmas)
from ksmbench.savings.workload import Ready

from conftest import host_ksm_usable

PROFILE = "linux-6.18"


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def image(pid: int, pages: list[bytes], *, thp: list[bool] | None = None,
          pfn_base: int = 0) -> ProcessImage:
    data = b"".join(pages)
    n = len(pages)
    addrs = (0x7F0000000000 + np.arange(n, dtype=np.int64) * PAGE_SIZE)
    pfns = (np.arange(n, dtype=np.int64) + pfn_base) if pfn_base else np.zeros(n, dtype=np.int64)
    area = Area(int(addrs[0]), int(addrs[-1]) + PAGE_SIZE, "", addrs, pfns, hash_pages(data),
                np.array(thp if thp is not None else [False] * n, dtype=bool))
    return ProcessImage(pid, f"p{pid}", "merge-any", [area])


def dup_merge(n: int, mps: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) for n identical pages (mm/ksm.c; what
    ksm_tests' assert_ksm_pages_count() expects)."""
    if n < 2:
        return 0, 0
    if n % mps in (0, 1):
        return n // mps, (n // mps) * (mps - 1)
    return n // mps + 1, n - (n // mps + 1)


# -- hashing and snapshots -------------------------------------------------------------

def test_hash_pages_recognises_zero_pages_and_tells_contents_apart():
    pages = [bytes(PAGE_SIZE), page(1), page(1), page(2), bytes(PAGE_SIZE)]
    d = hash_pages(b"".join(pages))
    assert d.shape == (5, 2)
    assert is_zero(d).tolist() == [True, False, False, False, True]
    assert (d[1] == d[2]).all() and not (d[1] == d[3]).all()


def test_parse_smaps_vmas_keeps_flags_and_paths():
    text = textwrap.dedent("""\
        55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
        Size:                132 kB
        VmFlags: rd wr mr mw me ac sd
        7f1e2c000000-7f1e2c200000 rw-s 00000000 00:01 1234                       /dev/shm/x
        Size:               2048 kB
        VmFlags: rd wr sh mr mw me ms sd
        7f1e2d000000-7f1e2d001000 r--p 00001000 08:01 42                         /usr/lib/libc.so.6
        VmFlags: rd mr mw me sd mg
        """)
    vmas = parse_smaps_vmas(text)
    assert [v.path for v in vmas] == ["[heap]", "/dev/shm/x", "/usr/lib/libc.so.6"]
    assert [v.compatible for v in vmas] == [True, False, True]
    assert [v.mergeable for v in vmas] == [False, False, True]


def test_snapshot_of_this_process_finds_a_region_and_its_zero_pages():
    """A private region written in this process: every page is a candidate,
    its contents hash as written (no root needed: /proc/self/mem)."""
    region = Region(64)
    try:
        region.madvise("nohugepage")
        region.write_pages(0, np.frombuffer(page(7) * 32 + bytes(32 * PAGE_SIZE),
                                            dtype=np.uint8).reshape(64, PAGE_SIZE))
        with Snapshotter() as snap:
            im = snap.snapshot(os.getpid(), "merge-any")
        areas = [a for a in im.areas if a.start <= region.addr < a.end]
        assert areas, "the region's VMA is not among the candidates"
        a = areas[0]
        inside = (a.addrs >= region.addr) & (a.addrs < region.addr + 64 * PAGE_SIZE)
        assert int(np.count_nonzero(inside)) == 64
        d = a.digests[inside]
        assert is_zero(d).tolist() == [False] * 32 + [True] * 32
        assert (d[:32] == hash_pages(page(7))[0]).all()
    finally:
        region.munmap()


def test_snapshot_of_a_missing_pid_says_so():
    from ksmbench.savings.snapshot import ProcessGone

    with Snapshotter() as snap:
        with pytest.raises(ProcessGone, match="does not exist"):
            snap.snapshot(2 ** 22 + 12345)


# -- the prediction ------------------------------------------------------------------------

@pytest.mark.parametrize("copies,dups,mps", [(3, 100, 256), (4, 200, 256), (3, 300, 8)])
def test_prediction_of_identical_processes_matches_the_kernel_formula(copies, dups, mps):
    """Each process: `dups` pages equal across processes (distinct within one),
    one repeated page 40 times, 30 zero pages, 20 unique pages."""
    procs = []
    for p in range(copies):
        pages = [i.to_bytes(4, "little") + bytes(PAGE_SIZE - 4) for i in range(1, dups + 1)]
        pages += [page(0xAB)] * 40 + [bytes(PAGE_SIZE)] * 30
        pages += [(10_000 * (p + 1) + i).to_bytes(4, "little") + b"\x01" * (PAGE_SIZE - 4)
                  for i in range(20)]
        procs.append(image(100 + p, pages))
    pred = Predictor(procs, Tunables(use_zero_pages=True, max_page_sharing=mps), PROFILE).run()
    f = pred.final
    s_rep, h_rep = dup_merge(40 * copies, mps)
    s_dup, h_dup = dup_merge(copies, mps)
    assert f.globals["pages_shared"] == dups * s_dup + s_rep
    assert f.globals["pages_sharing"] == dups * h_dup + h_rep
    assert f.globals["ksm_zero_pages"] == 30 * copies
    # rmap items at convergence: every page but the KSM zero pages
    items = copies * (dups + 40 + 20)
    saved = f.globals["pages_sharing"] + 30 * copies
    assert f.globals["general_profit"] == saved * PAGE_SIZE - items * 64
    assert pred.converged_scan == 3  # merged in scan 2; zero pages' items freed in scan 3
    assert pred.at(1).globals["pages_sharing"] == 0  # scan 1 only records checksums
    for p in procs:
        proc = f.procs[p.pid]
        assert proc["ksm_zero_pages"] == 30


def test_use_zero_pages_off_merges_zero_pages_as_duplicates():
    procs = [image(1, [bytes(PAGE_SIZE)] * 10), image(2, [bytes(PAGE_SIZE)] * 10)]
    f = Predictor(procs, Tunables(use_zero_pages=False), PROFILE).run().final
    assert (f.globals["pages_shared"], f.globals["pages_sharing"]) == dup_merge(20, 256)
    assert f.globals["ksm_zero_pages"] == 0


def test_frames_shared_by_fork_are_one_frame():
    """Two processes mapping the same frames (fork): nothing to merge between
    them, the shared pages count once."""
    pages = [i.to_bytes(4, "little") + bytes(PAGE_SIZE - 4) for i in range(1, 51)]
    a = image(1, pages, pfn_base=1000)
    b = image(2, pages, pfn_base=1000)
    pred = Predictor([a, b], Tunables(), PROFILE).run()
    assert pred.shared_frames == 50
    assert pred.final.globals["pages_sharing"] == 0


def test_thp_split_maps_zero_subpages_to_the_zero_page_uncounted():
    """A 512-page THP, half zeros, half a page also present in another
    process: merging splits it, and (6.12+, b1f202060afe) the zero subpages
    become clean zero PTEs, which no KSM counter shows."""
    thp_pages = [bytes(PAGE_SIZE)] * 256 + [page(5)] * 256
    a = image(1, thp_pages, thp=[True] * 512, pfn_base=512 * 10)
    b = image(2, [page(5)], pfn_base=512 * 20)
    pred = Predictor([a, b], Tunables(use_zero_pages=True), PROFILE).run()
    f = pred.final
    assert pred.thp_split_zero_pages == 256
    assert f.globals["ksm_zero_pages"] == 0
    assert (f.globals["pages_shared"], f.globals["pages_sharing"]) == dup_merge(257, 256)
    old = Predictor([a, b], Tunables(use_zero_pages=True), "linux-6.11").run()
    assert old.thp_split_zero_pages == 0
    assert old.final.globals["ksm_zero_pages"] == 256


def test_time_to_converge_counts_batches_and_sleeps():
    procs = [image(1, [page(3)] * 1000)]
    slow = Predictor(procs, Tunables(pages_to_scan=100, sleep_millisecs=20), PROFILE).run()
    fast = Predictor(procs, Tunables(pages_to_scan=100, sleep_millisecs=0), PROFILE).run()
    # 1000 pages visited per scan -> 10 batches of 100, each followed by 20 ms
    assert slow.at(1).seconds - fast.at(1).seconds == pytest.approx(0.2)
    assert slow.seconds_to_converge() > fast.seconds_to_converge()


def test_churn_counts_changed_gone_and_new_pages():
    before = image(1, [page(1), page(2), page(3), bytes(PAGE_SIZE)])
    after = image(1, [page(1), page(9), page(3)])
    after.zero_pte_addrs = np.array([before.areas[0].addrs[3]])  # KSM placed the zero page
    churn = churn_between([before], [after])
    assert (churn.changed, churn.gone, churn.new) == (1, 0, 0)
    gone = image(1, [page(1)])
    churn = churn_between([before], [gone])
    assert churn.gone == 3 and churn.pages == 3


def test_measured_counters_count_from_the_baseline_before_the_copies():
    """A kernel that leaked 72 KSM zero pages before the run (6.18.44: zero
    pages in a MADV_DONTFORK region across fork, kept until reboot) reads them
    at every scan; the measured side counts from the baseline read before the
    copies started, so a prediction that is right is judged right."""
    from ksmbench.savings.measure import Reading, error_summary, row_values
    from ksmbench.savings.predict import ScanPrediction

    leaked, pid = 72, 4242
    baseline = {"pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0, "pages_volatile": 0,
                "ksm_zero_pages": leaked, "general_profit": leaked * PAGE_SIZE,
                "stable_node_chains": 0, "stable_node_dups": 0}
    stat = {"ksm_rmap_items": 100, "ksm_zero_pages": 50, "ksm_merging_pages": 20,
            "ksm_process_profit": 70 * PAGE_SIZE - 100 * 64}
    pred = ScanPrediction(3, {**baseline, "pages_shared": 10, "pages_sharing": 20,
                              "ksm_zero_pages": 50, "general_profit": 70 * PAGE_SIZE - 100 * 64},
                          {pid: stat}, visits=0, merges=0, seconds=0.0, cpu_seconds=0.0)
    read = {**baseline, "pages_shared": 10, "pages_sharing": 20, "ksm_zero_pages": leaked + 50,
            "general_profit": (leaked + 70) * PAGE_SIZE - 100 * 64, "pages_scanned": 900}
    reading = Reading(read, {pid: stat}, 0, 0, 0, {}, None, baseline)
    err = error_summary(pred, reading, [pid])
    assert err["ksm_zero_pages_measured"] == err["ksm_zero_pages_predicted"] == 50
    assert err["measured_saved_bytes"] == err["predicted_saved_bytes"] == 70 * PAGE_SIZE
    assert err["saved_error_pct"] == 0 and err["general_profit_error_pct"] == 0
    row = row_values(pred, reading, None, [pid])
    assert row["global.ksm_zero_pages"] == (50, 50)
    assert row["global.general_profit"] == (70 * PAGE_SIZE - 100 * 64,) * 2
    assert row["saved_bytes"] == (70 * PAGE_SIZE,) * 2
    assert row[f"proc.{pid}.ksm_zero_pages"] == (50, 50)  # per process: never rebased
    assert reading.counted["pages_scanned"] == 900  # cumulative: not a level, not moved


def test_ready_parsing():
    assert Ready.parse("2.5", 10).kind == "seconds"
    assert Ready.parse("file:/tmp/x", 10).value == "/tmp/x"
    assert Ready.parse("line:Ready to accept", 10).value == "Ready to accept"
    with pytest.raises(UsageError):
        Ready.parse("soon", 10)


def test_command_line_needs_a_command_or_pids():
    from ksmbench.cli import main

    out = subprocess.run([sys.executable, "-m", "ksmbench.cli", "savings"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "give either -- CMD" in out.stderr
    assert main  # the subcommand is registered


# -- end to end on this host -------------------------------------------------------------------

WORKLOAD = textwrap.dedent("""\
    import sys, time
    import numpy as np
    shared = np.random.default_rng(42).integers(0, 2**63, (64 << 20) // 8, dtype=np.int64)
    zeros = np.zeros((8 << 20) // 8, dtype=np.int64)
    zeros[:] = 0   # written: real zero-filled pages, not the zero page
    own = np.random.default_rng(int(sys.argv[1])).integers(0, 2**63, (4 << 20) // 8, dtype=np.int64)
    print("ready", flush=True)
    time.sleep(600)
    """)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_three_interpreters_with_a_shared_array_end_to_end(tmp_path):
    """3 Python interpreters, each with the same 64 MiB array, 8 MiB of zeros
    and 4 MiB of its own: predicted before merging, measured by stepping.

    Tolerance: the workload is idle after 'ready', so the snapshot is what
    ksmd merges; only the interpreters' own stray writes (allocator, GC)
    between the snapshot and the merge can differ, and those are measured as
    churn.  The saving may differ by the churned pages plus 0.1 % of it."""
    script = tmp_path / "hold.py"
    script.write_text(WORKLOAD)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ksmbench.cli", "savings", "--copies", "3", "--ready", "line:ready",
           "--use-zero-pages", "1", "--wait", "1800", "--out", str(out), "--",
           sys.executable, str(script), "{i}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr
    (run,) = out.iterdir()
    meta = json.loads((run / "metadata.json").read_text())
    err = meta["error_at_convergence"]
    churn = meta["churn"]["pages"] + meta["churn"]["new"]
    allowed = churn * PAGE_SIZE + 0.001 * err["measured_saved_bytes"]
    assert abs(err["predicted_saved_bytes"] - err["measured_saved_bytes"]) <= allowed, err
    # the shared array: 16,384 pages in 3 processes -> 2 x 16,384 sharing at least
    assert err["pages_sharing_measured"] >= 2 * 16384
    # every copy gone, tunables restored (the session fixture checks the values)
    for pid in meta["pids"]:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    rows = (run / "savings.csv").read_text().splitlines()
    assert rows[0] == "scan,metric,predicted,measured"
    finals = {r.split(",")[1]: r.split(",")[2:] for r in rows if r.startswith("final,")}
    for metric in ("global.pages_sharing", "global.ksm_zero_pages", "global.general_profit",
                   "rss", "pss", "uss", *(f"proc.{p}.ksm_process_profit" for p in meta["pids"])):
        assert metric in finals and all(finals[metric]), metric


def test_kernels_without_exec_inheritance_are_refused_in_one_line():
    from ksmbench.errors import KsmUnavailable
    from ksmbench.kernel.features import detect
    from ksmbench.savings.workload import check_exec_inheritance

    if not detect()["prctl_memory_merge"]:
        with pytest.raises(KsmUnavailable, match="no PR_SET_MEMORY_MERGE"):
            check_exec_inheritance("6.18.0")
        return
    for release in ("6.6.30", "6.9.12"):
        with pytest.raises(KsmUnavailable, match="does not keep PR_SET_MEMORY_MERGE across exec"):
            check_exec_inheritance(release)
    check_exec_inheritance("6.10.0")


def test_a_command_that_cannot_start_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ksmbench.cli", "savings", "--out", str(tmp_path),
                          "--", "/nonexistent/program"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    if os.geteuid() == 0:
        assert out.stderr.count("\n") == 1 and "cannot start '/nonexistent/program'" in out.stderr
    else:
        assert "needs root" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root to check the refusal")
def test_not_root_is_one_line():
    def drop():
        os.setgid(65534)
        os.setuid(65534)

    try:
        out = subprocess.run([sys.executable, "-m", "ksmbench.cli", "savings", "--pid", "1"],
                             capture_output=True, text=True, timeout=60, preexec_fn=drop, cwd="/",
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    except PermissionError:
        pytest.skip("this interpreter is not executable by nobody")
    if "ksmbench: error" not in out.stderr:
        pytest.skip(f"this checkout is not usable by nobody ({out.stderr.strip()[-120:]})")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "needs root" in out.stderr, out.stderr


def test_report_has_a_savings_section(tmp_path):
    """The reference runs in results/reference/workloads render as a section."""
    from ksmbench.report.cli import generate

    runs = sorted(Path(__file__).parents[1].glob("results/reference/workloads/*/2*"))
    if not runs:
        pytest.skip("no reference savings runs in this checkout")
    paths = generate(runs[:2], tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "## What KSM saves for a real program" in md
    assert any(p.name.startswith("workload-savings-") for p in paths["figures"].iterdir())


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_sigterm_while_waiting_for_readiness_leaves_no_copy(tmp_path):
    """SIGTERM during the readiness wait: one line, exit 2, every copy gone,
    the run directory says it was interrupted (tunables: the session fixture)."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ksmbench.cli", "savings", "--copies", "2",
                             "--ready", "file:/nonexistent/never", "--ready-timeout", "600",
                             "--wait", "1800", "--out", str(out), "--", "sleep", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    meta_path = None
    while time.monotonic() < deadline and meta_path is None:
        runs = list(out.glob("*/metadata.json")) if out.exists() else []
        stdout_files = list(out.glob("*/copy1.stdout")) if out.exists() else []
        if runs and stdout_files:
            meta_path = runs[0]
        time.sleep(0.2)
    assert meta_path is not None, "the copies never started"
    time.sleep(1.0)
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", "^sleep 1000$"], capture_output=True,
                                           text=True).stdout.split()]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and "stopped; KSM tunables restored" in err, err
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", f"copy {pid} outlived the run"
    assert "interrupted" in json.loads(meta_path.read_text())


def test_a_process_that_exits_during_the_snapshot_is_named(tmp_path, monkeypatch):
    """smaps was read, then the process went (its pagemap is gone): one line."""
    from ksmbench.kernel.procfs import ProcFS
    from ksmbench.savings.snapshot import ProcessGone

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # no frame numbers: no kpageflags needed
    proc = tmp_path / "4242"
    proc.mkdir()
    (proc / "smaps").write_text("7f0000000000-7f0000001000 rw-p 00000000 00:00 0\n"
                                "VmFlags: rd wr mr mw me ac\n")
    (proc / "comm").write_text("gone\n")
    with Snapshotter(ProcFS(tmp_path)) as snap:
        with pytest.raises(ProcessGone, match="process 4242 exited during the snapshot"):
            snap.snapshot(4242)


def test_pages_merged_already_are_predicted_from_scratch():
    """The same frames seen as KSM pages (a process KSM merged already) count
    as separate copies: the prediction starts from nothing merged."""
    pages = [i.to_bytes(4, "little") + bytes(PAGE_SIZE - 4) for i in range(1, 51)]
    a = image(1, pages, pfn_base=1000)
    b = image(2, pages, pfn_base=1000)
    for im in (a, b):
        im.areas[0].ksm = np.ones(50, dtype=bool)
    pred = Predictor([a, b], Tunables(), PROFILE).run()
    assert pred.shared_frames == 0
    assert (pred.final.globals["pages_shared"], pred.final.globals["pages_sharing"]) == (50, 50)
