"""The report's figures (matplotlib, Agg backend: no display needed).

Each function takes the loaded :class:`~ksmbench.report.load.RunData` and
returns :class:`Figure` objects (empty list when the data for it is absent).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .load import RunData, verdicts  # noqa: E402

MIB = 1 << 20
#: counters drawn per scenario: the ones the zero-page series is about
COUNTERS = ("global.pages_shared", "global.pages_sharing", "global.pages_unshared",
            "global.pages_volatile", "global.ksm_zero_pages")
VERDICT_COLOURS = {"match": "#4caf50", "mismatch": "#e53935", "observed": "#90caf9",
                   "not run": "#eeeeee", "interrupted": "#ffb300", "error": "#b71c1c"}


@dataclass
class Figure:
    name: str          # file stem, [a-z0-9-]
    title: str
    figure: object     # matplotlib Figure
    caption: str


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


# -- scenarios ---------------------------------------------------------------------

def point_order(df: pd.DataFrame) -> pd.DataFrame:
    """Observation points of one (scenario, kernel) in run order, labelled."""
    pts = df[["step", "scan", "op"]].drop_duplicates()
    pts = pts.assign(scan_key=pts["scan"].fillna(0).astype(int)).sort_values(["step", "scan_key"])
    pts["label"] = [f"{s}" if pd.isna(sc) else f"{s}.{int(sc)}"
                    for s, sc in zip(pts["step"], pts["scan"])]
    return pts.reset_index(drop=True)


def counters_per_scan(data: RunData, scenarios: list[str] | None = None) -> list[Figure]:
    """One figure per scenario: global counters at every point, observed
    (solid) and emulator-predicted (dashed) overlaid, one panel per kernel."""
    obs = data.observations
    if obs is None or obs.empty:
        return []
    out = []
    names = scenarios or list(dict.fromkeys(obs["scenario"]))
    for scenario in names:
        s = obs[(obs["scenario"] == scenario) & obs["metric"].isin(COUNTERS)]
        if s.empty:
            continue
        kernels = list(dict.fromkeys(s["kernel"]))
        fig, axes = plt.subplots(1, len(kernels), figsize=(max(4.5 * len(kernels), 7.0), 3.9),
                                 squeeze=False, sharey=True)
        for ax, kernel in zip(axes[0], kernels):
            k = s[s["kernel"] == kernel]
            if "run_id" in k and k["run_id"].nunique() > 1:
                # the same scenario on the same kernel in several runs: the
                # newest (run ids start with their start time) is drawn
                k = k[k["run_id"] == max(k["run_id"].astype(str))]
            pts = point_order(k)
            x = np.arange(len(pts))
            for i, metric in enumerate(COUNTERS):
                m = k[k["metric"] == metric]
                if m.empty:
                    continue
                m = pts.merge(m, on=["step", "op", "scan"], how="left")
                colour = f"C{i}"
                short = metric.split(".", 1)[1]
                if m["observed"].notna().any():
                    ax.plot(x, m["observed"], "-o", color=colour, ms=3, lw=1.4, label=short)
                if m["predicted"].notna().any():
                    ax.plot(x, m["predicted"], "--", color=colour, lw=1.0, marker="x", ms=5,
                            label=f"{short} (emu)")
            ax.set_title(kernel, fontsize=9)
            ax.set_xticks(x)
            ax.set_xticklabels(pts["label"], fontsize=6, rotation=90)
            ax.set_xlabel("step.scan", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("pages", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        fig.legend(handles, labels, loc="lower center", ncol=5 if len(kernels) > 1 else 3,
                   fontsize=6.5, frameon=False)
        fig.suptitle(f"{scenario}: KSM counters per step and scan", fontsize=10)
        fig.tight_layout(rect=(0, 0.16 if len(kernels) > 1 else 0.24, 1, 0.95))
        out.append(Figure(f"counters-{_slug(scenario)}", f"Counters per scan: {scenario}", fig,
                          "Solid: observed on the kernel; dashed with crosses: the emulator's "
                          "prediction for the profile that fits the kernel. X axis: step index, "
                          "and step.scan within a scan step."))
    return out


def match_matrix(data: RunData) -> list[Figure]:
    v = verdicts(data)
    if v is None or v.empty:
        return []
    scenarios = list(dict.fromkeys(v["scenario"]))
    kernels = list(dict.fromkeys(v["kernel"]))
    order = list(VERDICT_COLOURS)
    grid = np.full((len(scenarios), len(kernels)), order.index("not run"))
    text = [["not run"] * len(kernels) for _ in scenarios]
    for row in v.itertuples():
        i, j = scenarios.index(row.scenario), kernels.index(row.kernel)
        grid[i, j] = order.index(row.verdict)
        detail = row.verdict
        if row.compared:
            detail += f"\n{row.compared - row.mismatches}/{row.compared} cells"
        text[i][j] = detail
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(2.0 + 1.9 * len(kernels), 0.9 + 0.36 * len(scenarios)))
    ax.imshow(grid, cmap=ListedColormap([VERDICT_COLOURS[o] for o in order]),
              vmin=0, vmax=len(order) - 1, aspect="auto")
    ax.set_xticks(range(len(kernels)))
    ax.set_xticklabels(kernels, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(scenarios)))
    ax.set_yticklabels(scenarios, fontsize=7)
    for i in range(len(scenarios)):
        for j in range(len(kernels)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6)
    ax.set_title("scenarios x kernels", fontsize=10, pad=22)
    fig.tight_layout()
    return [Figure("match-matrix", "Scenarios x kernels", fig,
                   "match: every compared cell equals the emulator's prediction and every expect "
                   "holds; mismatch: at least one does not; observed: nothing to compare with.")]


# -- benchmarks ----------------------------------------------------------------------

def _medians(bench: pd.DataFrame, benchmark: str, metric: str) -> pd.DataFrame:
    b = bench[(bench["benchmark"] == benchmark) & (bench["metric"] == metric)]
    if b.empty:
        return b
    g = b.groupby(["kernel", "case", "use_zero_pages", "size_mib"], dropna=False)["value"]
    return g.agg(["median", "min", "max", "count"]).reset_index()


def _case_label(case: str, uzp) -> str:
    if case == "zero":
        return f"zero pages, use_zero_pages={int(uzp)}"
    if case == "dup":
        return "duplicate pages"
    return case


def merge_throughput(data: RunData) -> list[Figure]:
    if data.bench is None:
        return []
    med = _medians(data.bench, "merge", "mib_per_s")
    if med.empty:
        return []
    kernels = list(dict.fromkeys(med["kernel"]))
    cases = list(dict.fromkeys(zip(med["case"], med["use_zero_pages"])))
    # one panel per kernel, each with its own scale: a TCG guest merges ~10x
    # slower than the host, and on a shared axis its curves are a flat line
    fig, axes = plt.subplots(1, len(kernels), figsize=(max(4.6 * len(kernels), 7.0), 4.4),
                             squeeze=False)
    cc = data.bench[(data.bench["benchmark"] == "crosscheck") & (data.bench["metric"] == "mib_per_s")]
    look = {"ksm_tests": ("*", "k", "ksm_tests -P (ksmd on its CPU)"),
            "ksmbench": ("P", "grey", "ksmbench the ksm_tests way (ksmd on its CPU)"),
            "ksm_tests-other-cpu": ("*", "tab:red", "ksm_tests -P (ksmd on another CPU)"),
            "ksmbench-other-cpu": ("P", "tab:pink", "ksmbench the ksm_tests way (ksmd on another CPU)"),
            "ksmbench-idle-owner": ("D", "tab:purple", "ksmbench, idle owner, ksmd free")}
    legend: dict[str, object] = {}
    for ax, kernel in zip(axes[0], kernels):
        for ci, (case, uzp) in enumerate(cases):
            m = med[(med["kernel"] == kernel) & (med["case"] == case) & (med["use_zero_pages"] == uzp)]
            if m.empty:
                continue
            m = m.sort_values("size_mib")
            h = ax.errorbar(m["size_mib"], m["median"],
                            yerr=[m["median"] - m["min"], m["max"] - m["median"]],
                            fmt="-", marker="o", ms=4, capsize=3, color=f"C{ci}")
            legend.setdefault(_case_label(case, uzp), h)
        for case, g in cc[cc["kernel"] == kernel].groupby("case", sort=False):
            marker, colour, name = look.get(case, ("o", "grey", case))
            (h,) = ax.plot([g["size_mib"].iloc[0]], [g["value"].median()], marker, ms=10,
                           ls="none", color=colour, alpha=0.85)
            legend.setdefault(name, h)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("region size (MiB)")
        ax.set_title(kernel, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("merge throughput (MiB/s)")
    fig.legend(list(legend.values()), list(legend.keys()), fontsize=7, loc="lower center",
               ncol=3, frameon=False)
    fig.suptitle("Merge throughput: MADV_MERGEABLE until 2 full scans (free-running ksmd)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return [Figure("merge-throughput", "Merge throughput vs size", fig,
                   "Median of the repeats; bars span min..max. The interval is the one ksm_tests -P "
                   "times: from MADV_MERGEABLE until full_scans has grown by 2, ksmd free-running "
                   "with sleep_millisecs=0, the region's owner asleep. Separate markers: the "
                   "cross-check size, where the same merge is also timed the way ksm_tests -P "
                   "times it (the owner spinning on full_scans) and by ksm_tests -P itself.")]


def costs(data: RunData) -> list[Figure]:
    """Unmerge, CoW-break and ksmd per-scan costs, one panel each."""
    if data.bench is None:
        return []
    panels = [
        ("unmerge", "mib_per_s", "unmerge throughput (MiB/s)"),
        ("cow", "us_per_page", "CoW break (us per page)"),
        ("scan_cost", "cpu_per_merged_page_us", "ksmd CPU per merged page (us)"),
    ]
    present = [p for p in panels if not _medians(data.bench, p[0], p[1]).empty]
    if not present:
        return []
    # rows: kernels (each at the largest size it measured: guests use smaller
    # regions, and TCG is ~10x slower, so every kernel gets its own scale)
    kernels = list(dict.fromkeys(data.bench["kernel"].dropna()))
    fig, axes = plt.subplots(len(kernels), len(present),
                             figsize=(4.6 * len(present), 3.3 * len(kernels)), squeeze=False)
    for row, kernel in zip(axes, kernels):
        for ax, (benchmark, metric, title) in zip(row, present):
            med = _medians(data.bench[data.bench["kernel"] == kernel], benchmark, metric)
            if med.empty:
                ax.set_visible(False)
                continue
            med = med[med["size_mib"] == med["size_mib"].max()]
            labels = [f"{c} use_zero_pages={int(u)}"
                      for c, u in zip(med["case"], med["use_zero_pages"])]
            y = np.arange(len(med))
            ax.barh(y, med["median"], xerr=[med["median"] - med["min"], med["max"] - med["median"]],
                    color=[f"C{i % 10}" for i in range(len(med))], capsize=3)
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=6)
            ax.set_title(f"{kernel}: {title}, {int(med['size_mib'].max())} MiB", fontsize=8)
            ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    out = [Figure("costs", "Unmerge, CoW and ksmd costs", fig,
                   "Each kernel at the largest size it measured. Unmerge: MADV_UNMERGEABLE "
                   "(case/madvise) and writing run=2 (case/run2); CoW: one byte written per merged "
                   "page (a KSM page, or with use_zero_pages=1 a KSM zero page); ksmd CPU: "
                   "ksmd's CPU clock over the two scans that merge, per merged page.")]
    out.extend(scan_cpu(data))
    return out


def scan_cpu(data: RunData) -> list[Figure]:
    """ksmd CPU time of stepped full scans 1 (checksums), 2 (merging), 3 (steady)."""
    b = data.bench
    rows = b[(b["benchmark"] == "scan_cost") & b["metric"].isin(
        ["scan1_cpu_seconds", "scan2_cpu_seconds", "scan3_cpu_seconds"])]
    if rows.empty:
        return []
    rows = rows[rows["size_mib"] == rows["size_mib"].max()]
    med = rows.groupby(["kernel", "case", "use_zero_pages", "metric"])["value"].median().unstack()
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.45 * len(med)))
    y = np.arange(len(med))
    h = 0.27
    for i, scan in enumerate(("scan1_cpu_seconds", "scan2_cpu_seconds", "scan3_cpu_seconds")):
        if scan in med:
            ax.barh(y + (i - 1) * h, med[scan] * 1e3, height=h, color=f"C{i}",
                    label=("scan 1 (checksums)", "scan 2 (merging)", "scan 3 (steady)")[i])
    ax.set_yticks(y)
    ax.set_yticklabels([f"{k}: {c} use_zero_pages={int(u)}" for k, c, u in med.index], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ksmd CPU time per full scan (ms, median)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [Figure("ksmd-cpu-per-scan", "ksmd CPU time per full scan", fig,
                   f"Stepped scans (one full scan per kick) of a {int(rows['size_mib'].max())} MiB "
                   "region; CPU time is ksmd's CPU clock, read in ns (utime+stime from "
                   "/proc/<ksmd>/stat is recorded too, at 10 ms resolution). Scan 1 only "
                   "checksums, scan 2 merges, scan 3 finds nothing left to do.")]


POINT_ORDER = {"before0": 0, "before": 1, "scan": 2, "after_run2": 3}


def savings_over_time(data: RunData) -> list[Figure]:
    sv = data.savings
    if sv is None or sv.empty:
        return []
    views = [("counters.saved_bytes", "KSM counters (sharing + zero pages)"),
             ("processes.pss_bytes", "sum of PSS (drop)"),
             ("processes.rss_bytes", "sum of RSS (drop)"),
             ("system.anon_bytes", "AnonPages (drop)"),
             ("system.free_and_pcp_bytes", "MemFree + per-CPU lists (gain)"),
             ("system.available_bytes", "MemAvailable (gain)")]
    sv = sv[sv["point"] != "before0"]
    groups = list(dict.fromkeys(zip(sv["kernel"], sv["use_zero_pages"])))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.3 * len(groups) + 2.2, 3.8), squeeze=False,
                             sharey=True)
    for ax, (kernel, uzp) in zip(axes[0], groups):
        g = sv[(sv["kernel"] == kernel) & (sv["use_zero_pages"] == uzp)].copy()
        g["scan_key"] = g["scan"].fillna(0).astype(int)
        # per repeat: change from that repeat's own "before" point
        base = g[g["point"] == "before"].set_index(["repeat", "metric"])["value"]
        g["base"] = [base.get((r, m), np.nan) for r, m in zip(g["repeat"], g["metric"])]
        g["order"] = g["point"].map(POINT_ORDER)
        pts = g[["order", "point", "scan_key"]].drop_duplicates().sort_values(["order", "scan_key"])
        labels = [("before" if p == "before" else "after run=2" if p == "after_run2" else f"scan {k}")
                  for p, k in zip(pts["point"], pts["scan_key"])]
        x = np.arange(len(pts))
        for i, (metric, name) in enumerate(views):
            m = g[g["metric"] == metric]
            if m.empty:
                continue
            if metric == "counters.saved_bytes":
                delta = m["value"]
            elif metric in ("system.available_bytes", "system.free_and_pcp_bytes"):
                delta = m["value"] - m["base"]
            else:
                delta = m["base"] - m["value"]
            med = (m.assign(delta=delta / MIB).groupby(["point", "scan_key"])["delta"].median())
            y = [med.get((p, k), np.nan) for p, k in zip(pts["point"], pts["scan_key"])]
            ax.plot(x, y, "-o", ms=3, color=f"C{i}", label=name)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=45)
        ax.set_title(f"{kernel}, use_zero_pages={int(uzp)}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MiB saved (median over repeats)")
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.76, 1))
    return [Figure("savings-over-time", "Memory saved over time, three views", fig,
                   "The savings workload scan by scan: KSM's own counters, the processes' PSS and "
                   "RSS (psutil), and the system's AnonPages, MemFree + per-CPU free lists and "
                   "MemAvailable, each as the change since just before merging (median over "
                   "the repeats). The last point is after run=2: what unmerging took back.")]


def zero_page_savings(data: RunData) -> list[Figure]:
    """Saved MiB per view, use_zero_pages 0 vs 1, per kernel (savings workload)."""
    rows = []
    for kernel, result in data.bench_results.items():
        for uzp, rec in (result.savings or {}).items():
            for v in rec.views:
                if v.saved_bytes is None:
                    continue  # a counter the kernel lacks
                rows.append({"kernel": kernel, "uzp": uzp, "view": v.view,
                             "saved": v.saved_bytes / MIB})
    if not rows:
        return []
    df = pd.DataFrame(rows)
    kernels = list(dict.fromkeys(df["kernel"]))
    views = list(dict.fromkeys(df["view"]))
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.2 * len(kernels), 4.4), squeeze=False,
                             sharey=True)
    width = 0.38
    for ax, kernel in zip(axes[0], kernels):
        y = np.arange(len(views))
        for k, uzp in enumerate((0, 1)):
            d = df[(df["kernel"] == kernel) & (df["uzp"] == uzp)].set_index("view")
            vals = [d["saved"].get(v, np.nan) for v in views]
            ax.barh(y + (k - 0.5) * width, vals, height=width, color=f"C{k}",
                    label=f"use_zero_pages={uzp}")
        ax.set_yticks(y)
        ax.set_yticklabels([v.replace(": ", ":\n", 1) for v in views], fontsize=6)
        ax.set_title(kernel, fontsize=9)
        ax.set_xlabel("MiB saved")
        ax.grid(alpha=0.3, axis="x")
        ax.invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return [Figure("zero-page-savings", "Zero-page savings: use_zero_pages 0 vs 1", fig,
                   "The same workload merged with use_zero_pages=0 (zero pages merge into one KSM "
                   "page per 256) and 1 (each zero page is replaced by the shared zero page). "
                   "With 1, the zero pages leave RSS; before 6.6 no counter shows them.")]


def all_figures(data: RunData, progress=lambda name: None, extra=()) -> list[Figure]:
    """Every figure the data allows; ``extra`` are figure functions of report
    sections built on this module (e.g. :mod:`.workload_savings`)."""
    out: list[Figure] = []
    for fn in (match_matrix, merge_throughput, costs, savings_over_time, zero_page_savings,
               *extra, counters_per_scan):
        progress(fn.__name__)
        out.extend(fn(data))
    return out
