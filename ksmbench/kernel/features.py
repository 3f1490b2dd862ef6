"""What the running kernel provides, detected from its interfaces (as drgn does).

Each feature names the kernel version and commit that introduced it, so that a
missing counter can be explained rather than reported as 0.  Behavioural
differences that no file reveals (e.g. the 6.11 checksum-first merge order)
are found by :mod:`ksmbench.compare.identify` running probe scenarios.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import SyscallError
from .procfs import ProcFS
from .sysfs import KsmSysfs


@dataclass(frozen=True)
class Feature:
    name: str
    since: str
    commit: str
    what: str


#: interface features, each detectable by the presence of a file or field
FEATURES: tuple[Feature, ...] = (
    Feature("ksm", "2.6.32", "f8af4da3b4c1", "/sys/kernel/mm/ksm exists (CONFIG_KSM=y)"),
    Feature("use_zero_pages", "4.11", "e86c59b1b12d", "sysfs use_zero_pages"),
    Feature("max_page_sharing", "4.13", "2c653d0ee2ae", "stable_node chains (sysfs max_page_sharing)"),
    Feature("ksm_stat", "6.1", "cb4df4cae4f2", "/proc/<pid>/ksm_stat"),
    Feature("general_profit", "6.4", "d21077fbc2fc", "sysfs general_profit, ksm_process_profit"),
    Feature("prctl_memory_merge", "6.4", "d7597f59d1d3", "PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE"),
    Feature("ksm_zero_pages", "6.6", "e2942062e01d", "sysfs ksm_zero_pages (zero-page series)"),
    Feature("ksm_stat_zero_pages", "6.6", "6080d19f0704", "ksm_zero_pages in /proc/<pid>/ksm_stat"),
    Feature("pages_scanned", "6.6", "b348b5fe2b5f", "sysfs pages_scanned"),
    Feature("smart_scan", "6.7", "5e924ff54d08", "sysfs smart_scan and pages_skipped"),
    Feature("advisor", "6.8", "4e5fa4f5eff6", "sysfs advisor_mode"),
    Feature("ksm_stat_involvement", "6.14", "3ab76c767bc7", "ksm_merge_any:/ksm_mergeable: in ksm_stat"),
)


def kernel_release() -> str:
    return os.uname().release


def parse_version(release: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return int(m[1]), int(m[2]), int(m[3] or 0)


def detect(sysfs: KsmSysfs | None = None, procfs: ProcFS | None = None) -> dict[str, bool]:
    """Which interface features this kernel has (no root needed)."""
    sysfs = sysfs or KsmSysfs()
    procfs = procfs or ProcFS()
    stat_text = None
    try:
        stat_text = (procfs.root / "self" / "ksm_stat").read_text()
    except OSError:
        pass
    found = {
        "ksm": sysfs.available(),
        "use_zero_pages": sysfs.has("use_zero_pages"),
        "max_page_sharing": sysfs.has("max_page_sharing"),
        "ksm_stat": stat_text is not None,
        "general_profit": sysfs.has("general_profit"),
        "prctl_memory_merge": _has_prctl_memory_merge(),
        "ksm_zero_pages": sysfs.has("ksm_zero_pages"),
        "ksm_stat_zero_pages": bool(stat_text and "ksm_zero_pages" in stat_text),
        "pages_scanned": sysfs.has("pages_scanned"),
        "smart_scan": sysfs.has("smart_scan"),
        "advisor": sysfs.has("advisor_mode"),
        "ksm_stat_involvement": bool(stat_text and "ksm_mergeable:" in stat_text),
    }
    return found


#: where the kernel lists its NUMA nodes (drivers/base/node.c; CONFIG_NUMA only)
NODE_SYSFS = "/sys/devices/system/node"


def memory_nodes(root: str = NODE_SYSFS) -> frozenset[int] | None:
    """The NUMA nodes that have memory (``has_memory``, N_MEMORY): the nodes
    mbind(MPOL_BIND) can place pages on.  None on a kernel without
    CONFIG_NUMA (no such directory: no mbind either)."""
    try:
        with open(os.path.join(root, "has_memory")) as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SyscallError(f"read {root}/has_memory", exc.errno or 0) from None
    nodes: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        nodes.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(nodes)


def _has_prctl_memory_merge() -> bool:
    from .syscalls import prctl_get_memory_merge

    try:
        prctl_get_memory_merge()
        return True
    except SyscallError:
        return False
