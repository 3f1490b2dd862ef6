"""Predict, then measure, what KSM saves for real processes; compare scan by scan.

``-- CMD``: under the run lock and the host session (tunables through the
undo stack, ksmd parked and stepped one full scan at a time, the sentinel,
the refusal when another process already uses KSM), N copies start with
merge-any, become ready, are snapshotted and predicted, and then ksmd is
stepped.  After every scan the same instant is read: KSM's global counters,
each copy's ksm_stat, psutil's RSS/PSS/USS of each copy (summed), and
/proc/meminfo.  After convergence the pages are read again: every page whose
content changed since the snapshot, or that came or went, is *churn*; the
prediction could not know it, and it is reported beside the error.

``--pid``: the processes are snapshotted and predicted only; nothing about
them or about KSM changes.

KSM's absolute global counters (ksm_zero_pages, general_profit, ...) are
counted from a baseline read once KSM is clean and before the copies start
(``counters_baseline`` in metadata.json; :func:`~ksmbench.observation.from_baseline`):
a kernel may keep counting KSM zero pages nobody maps (on 6.18.44, those left
in a MADV_DONTFORK or MADV_WIPEONFORK region across fork, until reboot), and
those are not the copies' saving.

Output (a run directory): ``metadata.json`` and ``savings.csv`` with the
columns ``scan, metric, predicted, measured``, written as measured.  Scan 0
is the snapshot (before any merging), ``final`` is convergence: the
prediction at its converged scan, the measurement at the last scan stepped
(which the stepping continues until the savings counters stood still for a
whole scan).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import KsmbenchError
from ..kernel.syscalls import PAGE_SIZE
from ..observation import from_baseline
from ..results import RunDir
from .predict import SAVINGS_COUNTERS, Predictor, Tunables
from .snapshot import ProcessImage, Snapshotter, is_zero

SAVINGS_COLUMNS = ("scan", "metric", "predicted", "measured")
GLOBALS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
           "general_profit")
PROC_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class SavingsTable:
    """savings.csv, written row by row."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "w", newline="")
        self._w = csv.writer(self._f)
        self._w.writerow(SAVINGS_COLUMNS)

    def add(self, scan: int | str, values: dict[str, tuple[Any, Any]]) -> None:
        self._w.writerows([str(scan), m, _cell(p), _cell(o)] for m, (p, o) in values.items())
        self._f.flush()

    def close(self) -> None:
        self._f.close()


@dataclass
class Reading:
    """One instant of the real system."""

    counters: dict[str, int | None]  # as read
    procs: dict[int, dict[str, int | None]]
    rss: int
    pss: int
    uss: int
    meminfo: dict[str, int]
    ksmd_cpu: float | None = None
    #: the absolute global counters before the copies started (sysfs names)
    baseline: dict[str, int | None] = field(default_factory=dict)

    @property
    def counted(self) -> dict[str, int | None]:
        """The global counters counted from the run's baseline: the copies' own."""
        return from_baseline(self.counters, self.baseline)


def read_system(session, pids: Sequence[int], ksmd, baseline: dict[str, int | None]) -> Reading:
    from ..bench.probes import process_memory, read_meminfo

    counters = session.sysfs.counters()
    procs, rss, pss, uss = {}, 0, 0, 0
    for pid in pids:
        procs[pid] = session.procfs.ksm_stat(pid)
        mem = process_memory(pid)
        rss, pss, uss = rss + mem.rss, pss + mem.pss, uss + mem.uss
    cpu = ksmd.sample().seconds if ksmd is not None else None
    return Reading(counters, procs, rss, pss, uss, read_meminfo(), cpu, baseline)


def row_values(pred, reading: Reading | None, base: Reading | None, pids: Sequence[int],
               template=None) -> dict[str, tuple[Any, Any]]:
    """metric -> (predicted, measured) for one scan; ``pred`` None: nothing merged yet
    (scan 0: every counter the kernel has is 0, the others None as in
    ``template``, a scan's prediction), ``reading`` None: not measured (--pid)."""
    out: dict[str, tuple[Any, Any]] = {}
    g = pred.globals if pred is not None else {}
    absent = {k for k, v in (template.globals if template is not None else {}).items() if v is None}
    for name in GLOBALS:
        p = g.get(name) if pred is not None else (None if name in absent else 0)
        out[f"global.{name}"] = (p, reading.counted.get(name) if reading else None)
    saved = None if pred is None else pred.saved_pages()
    msaved = None
    if reading:
        c = reading.counted
        msaved = (c.get("pages_sharing") or 0) + (c.get("ksm_zero_pages") or 0)
    out["saved_bytes"] = (0 if saved is None else saved * PAGE_SIZE,
                          None if msaved is None else msaved * PAGE_SIZE)
    for pid in pids:
        pp = pred.procs.get(pid, {}) if pred is not None else {}
        tp = template.procs.get(pid, {}) if template is not None else {}
        for f in PROC_FIELDS:
            pv = pp.get(f) if pred is not None else (None if f in tp and tp[f] is None else 0)
            out[f"proc.{pid}.{f}"] = (pv, reading.procs.get(pid, {}).get(f) if reading else None)
    # psutil sums: predicted from the snapshot's values and the predicted counters.
    # RSS loses only KSM zero pages (replace_page() dec_mm_counter); PSS loses
    # every saved page; USS loses every mapping of a KSM page (pages_shared +
    # pages_sharing: none is mapped once any more) and the KSM zero pages.
    if base is not None:
        zero = (g.get("ksm_zero_pages") or 0) if pred else 0
        if pred is not None and pred.scan >= 2:
            zero += pred.thp_split_zero_pages  # clean zero PTEs: out of RSS too
        shared = (g.get("pages_shared") or 0) if pred else 0
        sharing = (g.get("pages_sharing") or 0) if pred else 0
        out["rss"] = (base.rss - zero * PAGE_SIZE, reading.rss if reading else None)
        out["pss"] = (base.pss - (sharing + zero) * PAGE_SIZE, reading.pss if reading else None)
        out["uss"] = (base.uss - (shared + sharing + zero) * PAGE_SIZE, reading.uss if reading else None)
        anon0 = base.meminfo.get("AnonPages", 0) * 1024
        out["meminfo.AnonPages"] = (anon0 - (sharing + zero) * PAGE_SIZE,
                                    reading.meminfo.get("AnonPages", 0) * 1024 if reading else None)
        out["meminfo.MemAvailable"] = (None, reading.meminfo.get("MemAvailable", 0) * 1024
                                       if reading else None)
    if pred is not None:
        cpu = None
        if reading is not None and base is not None and reading.ksmd_cpu is not None:
            cpu = reading.ksmd_cpu
        out["ksmd_cpu_seconds"] = (pred.cpu_seconds, cpu)
    return out


@dataclass
class Churn:
    pages: int = 0          # snapshot pages whose content changed or that went away
    changed: int = 0
    gone: int = 0
    new: int = 0            # candidate pages that appeared after the snapshot
    per_process: dict[int, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"pages": self.pages, "changed": self.changed, "gone": self.gone, "new": self.new,
                "bytes": self.pages * PAGE_SIZE, "new_bytes": self.new * PAGE_SIZE,
                "per_process": {str(k): v for k, v in self.per_process.items()}}


def churn_between(before: Sequence[ProcessImage], after: Sequence[ProcessImage]) -> Churn:
    """Pages that changed between two snapshots of the same processes.  The
    second snapshot keeps zero-page PTEs as zero content (``with_zero_ptes``):
    a page KSM replaced by the zero page still holds zeros."""
    out = Churn()
    later = {im.pid: im for im in after}
    for im in before:
        a1, d1 = _flat(im)
        im2 = later.get(im.pid)
        a2, d2 = _flat(im2) if im2 is not None else (np.zeros(0, np.int64), np.zeros((0, 2), np.uint64))
        zero_pte = im2.zero_pte_addrs if im2 is not None else np.zeros(0, np.int64)
        found = np.zeros(a1.size, dtype=bool)
        same = np.zeros(a1.size, dtype=bool)
        if a2.size:
            idx = np.minimum(np.searchsorted(a2, a1), a2.size - 1)
            found = a2[idx] == a1
            same[found] = (d2[idx[found]] == d1[found]).all(axis=1)
        # a zero page now: KSM replaced it (use_zero_pages) if it held zeros
        on_zero = ~found & np.isin(a1, zero_pte)
        found |= on_zero
        same[on_zero] = is_zero(d1[on_zero])
        gone = int(np.count_nonzero(~found))
        changed = int(np.count_nonzero(found & ~same))
        # new: candidates now that were not in the snapshot
        fresh = ~np.isin(a2, a1)
        new = int(np.count_nonzero(fresh))
        out.per_process[im.pid] = {"changed": changed, "gone": gone, "new": new}
        out.changed += changed
        out.gone += gone
        out.new += new
    out.pages = out.changed + out.gone
    return out


def _flat(im: ProcessImage) -> tuple[np.ndarray, np.ndarray]:
    if not im.areas:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.uint64)
    a = np.concatenate([x.addrs for x in im.areas])
    d = np.concatenate([x.digests for x in im.areas])
    order = np.argsort(a, kind="stable")
    return a[order], d[order]


def error_summary(pred_final, reading: Reading, pids: Sequence[int]) -> dict[str, Any]:
    """Prediction error at convergence, relative to the measured saving."""
    c = reading.counted
    meas_saved = ((c.get("pages_sharing") or 0) + (c.get("ksm_zero_pages") or 0)) * PAGE_SIZE
    pred_saved = pred_final.saved_pages() * PAGE_SIZE

    def pct(p, m):
        if p is None or m is None or m == 0:
            return None
        return 100.0 * (p - m) / abs(m)

    out = {"measured_saved_bytes": meas_saved, "predicted_saved_bytes": pred_saved,
           "saved_error_pct": pct(pred_saved, meas_saved),
           "general_profit_error_pct": pct(pred_final.globals.get("general_profit"),
                                           c.get("general_profit")),
           "per_process_profit_error_pct": {}}
    for pid in pids:
        out["per_process_profit_error_pct"][str(pid)] = pct(
            pred_final.procs.get(pid, {}).get("ksm_process_profit"),
            reading.procs.get(pid, {}).get("ksm_process_profit"))
    for name in ("pages_shared", "pages_sharing", "ksm_zero_pages"):
        out[f"{name}_predicted"] = pred_final.globals.get(name)
        out[f"{name}_measured"] = c.get(name)
    return out


def measured_converged(readings: list[Reading]) -> int | None:
    """The first scan after which the savings counters stood still for a scan."""
    for s in range(1, len(readings) - 1):
        a, b = readings[s].counters, readings[s + 1].counters
        if s >= 2 and all(a.get(k) == b.get(k) for k in SAVINGS_COUNTERS):
            return s
    return None


def wall_at_tunables(readings: list[Reading], scans: int, tunables: Tunables) -> float | None:
    """What the measured scans would take at ``pages_to_scan``/``sleep_millisecs``:
    ksmd's measured CPU per scan plus one sleep per batch of the items it
    really scanned (sysfs pages_scanned, exact from 6.10, 730cdc2c72c6)."""
    total = 0.0
    for s in range(1, scans + 1):
        r0, r1 = readings[s - 1], readings[s]
        if r0.ksmd_cpu is None or r1.ksmd_cpu is None:
            return None
        p0, p1 = r0.counters.get("pages_scanned"), r1.counters.get("pages_scanned")
        if p0 is None or p1 is None:
            return None
        batches = max(1, math.ceil((p1 - p0) / max(1, tunables.pages_to_scan)))
        total += (r1.ksmd_cpu - r0.ksmd_cpu) + batches * tunables.sleep_millisecs / 1000.0
    return total
