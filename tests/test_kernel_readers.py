"""Readers and KSM control against fake sysfs/procfs trees (no root needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ksmbench.errors import KsmUnavailable, PermissionNeeded
from ksmbench.kernel.procfs import (KPF_KSM, KPF_ZERO_PAGE, FrameReader, ProcFS,
                                    parse_ksm_stat)
from ksmbench.kernel.sysfs import KsmSysfs
from ksmbench.kernel.syscalls import PAGE_SIZE
from ksmbench.metrics import GLOBAL_COUNTERS

KSM_STAT_6_1 = "ksm_rmap_items 12\n"
KSM_STAT_6_6 = ("ksm_rmap_items 3000\nksm_zero_pages 1000\nksm_merging_pages 1000\n"
                "ksm_process_profit 8000000\n")
KSM_STAT_6_18 = KSM_STAT_6_6 + "ksm_merge_any: no\nksm_mergeable: yes\n"


def test_counters_are_signed_and_absent_is_none(fake_ksm):
    (fake_ksm / "general_profit").write_text("-192000\n")
    (fake_ksm / "ksm_zero_pages").write_text(str(2**64 - 128) + "\n")  # %lu of -128
    (fake_ksm / "pages_skipped").unlink()  # a 6.6 kernel
    sysfs = KsmSysfs(fake_ksm)
    c = sysfs.counters()
    assert set(c) == set(GLOBAL_COUNTERS)
    assert c["general_profit"] == -192000
    assert c["ksm_zero_pages"] == -128
    assert c["pages_skipped"] is None
    assert c["pages_shared"] == 0


def test_tunables_parse_choices(fake_ksm):
    sysfs = KsmSysfs(fake_ksm)
    t = sysfs.tunables()
    assert t["advisor_mode"] == "none"
    assert t["run"] == "0" and t["max_page_sharing"] == "256"
    (fake_ksm / "advisor_mode").write_text("none [scan-time]\n")
    assert sysfs.tunable("advisor_mode") == "scan-time"


def test_missing_ksm_is_reported(tmp_path):
    sysfs = KsmSysfs(tmp_path / "nope")
    assert not sysfs.available()
    with pytest.raises(KsmUnavailable, match="no KSM"):
        sysfs.require()
    assert sysfs.read_int("pages_shared") is None


@pytest.mark.parametrize("text,expected", [
    (KSM_STAT_6_1, {"ksm_rmap_items": 12, "ksm_zero_pages": None, "ksm_merging_pages": None,
                    "ksm_process_profit": None, "ksm_merge_any": None, "ksm_mergeable": None}),
    (KSM_STAT_6_6, {"ksm_rmap_items": 3000, "ksm_zero_pages": 1000, "ksm_merging_pages": 1000,
                    "ksm_process_profit": 8000000, "ksm_merge_any": None, "ksm_mergeable": None}),
    (KSM_STAT_6_18, {"ksm_rmap_items": 3000, "ksm_zero_pages": 1000, "ksm_merging_pages": 1000,
                     "ksm_process_profit": 8000000, "ksm_merge_any": 0, "ksm_mergeable": 1}),
    ("ksm_rmap_items 1\nksm_zero_pages 18446744073709551615\nksm_process_profit -64\n",
     {"ksm_rmap_items": 1, "ksm_zero_pages": -1, "ksm_merging_pages": None,
      "ksm_process_profit": -64, "ksm_merge_any": None, "ksm_mergeable": None}),
])
def test_ksm_stat_every_field_of_every_version(text, expected):
    assert parse_ksm_stat(text) == expected


def _write_proc(fake_proc, pid, **files):
    d = fake_proc / str(pid)
    d.mkdir(exist_ok=True)
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(d / name, mode) as f:
            f.write(content)
    return d


def test_procfs_readers(fake_proc):
    _write_proc(fake_proc, 42, ksm_stat=KSM_STAT_6_18, ksm_merging_pages="1000\n",
                status="Name:\tx\nRssAnon:\t    8000 kB\nRssFile:\t 12 kB\n",
                smaps_rollup="Rss: 9000 kB\nAnonymous:    7996 kB\n", comm="agent\n",
                stat="42 (a b) S 1 42 42 0")
    p = ProcFS(fake_proc)
    assert p.ksm_stat(42)["ksm_mergeable"] == 1
    assert p.ksm_merging_pages(42) == 1000
    assert p.rss_anon_pages(42) == 8000 * 1024 // PAGE_SIZE
    assert p.anonymous_pages(42) == 7996 * 1024 // PAGE_SIZE
    assert p.task_state(42) == "S"
    assert p.comm(42) == "agent"
    # a process without ksm_stat (before 6.1): every field None
    _write_proc(fake_proc, 43, status="RssAnon:\t 4 kB\n")
    assert set(p.ksm_stat(43).values()) == {None}
    assert p.ksm_merging_pages(43) is None


def test_find_kthread(fake_proc):
    _write_proc(fake_proc, 37, comm="ksmd\n", stat="37 (ksmd) S 2 0 0 0")
    _write_proc(fake_proc, 99, comm="ksmd\n", stat="99 (ksmd) S 1 0 0 0")  # not a kthread
    assert ProcFS(fake_proc).find_kthread("ksmd") == 37


def _pm(pfn):
    return (1 << 63) | pfn


def test_region_metrics_from_fake_pagemap_and_kpageflags(fake_proc):
    zero = 7
    # 10 pages from virtual page 100: 3 not present, 2 zero page, pfn 50 mapped 3 times (KSM),
    # pfns 60 and 5000 once each (not KSM)
    entries = [0, _pm(zero), _pm(50), _pm(50), 0, _pm(60), _pm(50), _pm(zero), 0, _pm(5000)]
    pagemap = bytearray(8 * 110)
    for i, e in enumerate(entries):
        pagemap[(100 + i) * 8:(101 + i) * 8] = e.to_bytes(8, "little")
    kpf = bytearray(8 * 5001)
    kpf[zero * 8:zero * 8 + 8] = (1 << KPF_ZERO_PAGE).to_bytes(8, "little")
    kpf[50 * 8:51 * 8] = (1 << KPF_KSM).to_bytes(8, "little")
    _write_proc(fake_proc, 5, pagemap=bytes(pagemap))
    (fake_proc / "kpageflags").write_bytes(bytes(kpf))
    with FrameReader(ProcFS(fake_proc), 5) as fr:
        frames = fr.frames(100 * PAGE_SIZE, 10)
        assert frames.tolist() == [-1, 7, 50, 50, -1, 60, 50, 7, -1, 5000]
        m = fr.region_metrics(100 * PAGE_SIZE, 10, [zero])
        assert (m.present, m.zero_pfn, m.ksm, m.distinct_frames) == (7, 2, 3, 3)
        flags = fr.kpageflags(np.array([5000, 50, 50, 7], dtype=np.uint64))
        assert flags.tolist() == [0, 1 << KPF_KSM, 1 << KPF_KSM, 1 << KPF_ZERO_PAGE]


def test_pagemap_without_cap_sys_admin_is_reported(fake_proc):
    pagemap = bytearray(8 * 4)
    pagemap[8:16] = (1 << 63).to_bytes(8, "little")  # present, pfn hidden (zeroed)
    _write_proc(fake_proc, 6, pagemap=bytes(pagemap))
    (fake_proc / "kpageflags").write_bytes(b"\0" * 64)
    with FrameReader(ProcFS(fake_proc), 6) as fr:
        with pytest.raises(PermissionNeeded, match="CAP_SYS_ADMIN"):
            fr.frames(0, 4)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="frame numbers need CAP_SYS_ADMIN")
def test_zero_pfn_is_discovered_on_this_kernel():
    with FrameReader() as fr:
        pfn = fr.discover_zero_pfn()
        flags = int(fr.kpageflags(np.array([pfn], dtype=np.uint64))[0])
    assert pfn > 0 and flags & (1 << KPF_ZERO_PAGE)
