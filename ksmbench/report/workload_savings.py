"""The report's section for ``ksmbench savings`` runs: what KSM saved for a real
program, scan by scan, predicted against measured, per process (KSM zero
pages included, as the 6.6 series counts them in ksm_process_profit)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .document import Section, Table
from .figures import Figure, _slug
from .load import RunData

MIB = 1 << 20


def _label(meta: dict[str, Any]) -> str:
    if meta.get("mode") == "pid":
        return f"pids {', '.join(map(str, meta.get('pids', [])))}"
    argv = meta.get("argv") or ["?"]
    name = argv[0].rsplit("/", 1)[-1]
    if name.startswith("python") and "-c" in argv:
        name += " -c"
    return f"{meta.get('copies')} x {name}"


def _scans(df: pd.DataFrame) -> pd.DataFrame:
    d = df[df["scan"] != "final"].copy()
    d["scan_n"] = pd.to_numeric(d["scan"], errors="coerce")
    for col in ("predicted", "measured"):
        d[col] = pd.to_numeric(d[col], errors="coerce")
    return d.dropna(subset=["scan_n"]).sort_values("scan_n")


def workload_savings_figures(data: RunData) -> list[Figure]:
    out = []
    for meta, df in data.workload_savings:
        d = _scans(df)
        if d.empty:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        views = [("saved_bytes", "KSM counters: pages_sharing + ksm_zero_pages"),
                 ("global.general_profit", "general_profit"),
                 ("pss", "sum of PSS (drop)"), ("rss", "sum of RSS (drop)")]
        base = d[d["scan_n"] == 0].set_index("metric")
        for i, (metric, name) in enumerate(views):
            m = d[d["metric"] == metric]
            if m.empty:
                continue
            if metric in ("pss", "rss"):
                b = base.loc[metric, "measured"] if metric in base.index else np.nan
                pred, meas = (b - m["predicted"]) / MIB, (b - m["measured"]) / MIB
            else:
                pred, meas = m["predicted"] / MIB, m["measured"] / MIB
            ax1.plot(m["scan_n"], meas, "-o", ms=3, color=f"C{i}", label=f"{name}, measured")
            ax1.plot(m["scan_n"], pred, "--", color=f"C{i}", label=f"{name}, predicted")
        ax1.set_xlabel("full scan (0: the snapshot, before merging)")
        ax1.xaxis.get_major_locator().set_params(integer=True)
        ax1.set_ylabel("MiB saved")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=6, loc="lower right")
        fin = df[df["scan"] == "final"].copy()
        fin["predicted"] = pd.to_numeric(fin["predicted"], errors="coerce")
        fin["measured"] = pd.to_numeric(fin["measured"], errors="coerce")
        prof = fin[fin["metric"].str.endswith(".ksm_process_profit")]
        zero = fin[fin["metric"].str.endswith(".ksm_zero_pages") & fin["metric"].str.startswith("proc.")]
        pids = [m.split(".")[1] for m in prof["metric"]]
        x = np.arange(len(pids))
        ax2.bar(x - 0.2, prof["measured"] / MIB, width=0.4, label="ksm_process_profit, measured")
        ax2.bar(x + 0.2, prof["predicted"] / MIB, width=0.4, label="predicted", alpha=0.7)
        zmap = {m.split(".")[1]: v for m, v in zip(zero["metric"], zero["measured"])}
        ax2.plot(x, [zmap.get(p, np.nan) * 4096 / MIB for p in pids], "kx",
                 label="of which KSM zero pages (measured)")
        ax2.set_xticks(x)
        ax2.set_xticklabels([f"pid {p}" for p in pids], fontsize=7)
        ax2.set_ylabel("MiB at convergence")
        ax2.grid(alpha=0.3, axis="y")
        ax2.legend(fontsize=6)
        fig.suptitle(_label(meta), fontsize=9)
        fig.tight_layout()
        name = f"workload-savings-{_slug(_label(meta))}-{meta.get('run_id', '')[-4:]}"
        out.append(Figure(name, f"What KSM saved for {_label(meta)}", fig,
                          "Left: the saving after each full scan, measured (solid) and predicted "
                          "from the snapshot before merging (dashed). Right: each process's "
                          "ksm_process_profit at convergence, which since 6.6 (1a8e84305783) "
                          "includes its KSM zero pages."))
    return out


def workload_savings_section(data: RunData, figs: dict[str, Figure]):
    if not data.workload_savings:
        return None
    rows = []
    for meta, _df in data.workload_savings:
        e = meta.get("error_at_convergence") or {}
        p = meta.get("prediction") or {}
        ch = meta.get("churn") or {}

        def mib(v):
            return "" if v is None else f"{v / MIB:.2f}"

        def pct(v):
            return "" if v is None else f"{v:+.2f} %"

        rows.append([_label(meta), meta.get("kernel_release", ""),
                     mib((p.get("candidate_pages") or 0) * 4096),
                     mib((p.get("final") or {}).get("saved_bytes")),
                     mib(e.get("measured_saved_bytes")), pct(e.get("saved_error_pct")),
                     pct(e.get("general_profit_error_pct")),
                     f"{mib(ch.get('bytes'))} / {mib(ch.get('new_bytes'))}" if ch else "",
                     f"{p.get('converged_scan')} / {meta.get('measured_converged_scan', '')}",
                     "" if meta.get("ksmd_cpu_seconds_to_converge") is None
                     else f"{meta['ksmd_cpu_seconds_to_converge']:.2f} s"])
    paras = ["Each row is one `ksmbench savings` run: the processes' pages were read and hashed "
             "before any merging, the emulator predicted every counter scan by scan, and then "
             "ksmd was stepped one full scan at a time. 'Saved' is pages_sharing + ksm_zero_pages "
             "(ksm.rst since 6.6). Churn is what changed in the processes between the snapshot "
             "and the end (changed or gone / new pages): the prediction cannot know it."]
    header = ["workload", "kernel", "candidate MiB", "predicted saved MiB", "measured saved MiB",
              "error", "general_profit error", "churn MiB", "converged scan (pred / meas)",
              "ksmd CPU to converge"]
    names = [f.name for f in figs.values() if f.name.startswith("workload-savings-")]
    return Section("What KSM saves for a real program", paras, [Table(header, rows)],
                   [figs[n] for n in names])
