"""The report's content, built once and rendered twice: a self-contained HTML
file (figures embedded as PNG data URIs, no external resource, opens offline)
and a markdown summary (figures as relative links to figures/*.png)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from ..bench.outcome import HEADLINES, CrosscheckNotDone, CrosscheckResult
from ..bench.stats import format_value
from .figures import Figure
from .load import RunData, incomplete, verdicts

MIB = 1 << 20


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    #: shown before everything else in the section, marked as warnings
    warnings: list[str] = field(default_factory=list)


def build_sections(data: RunData, figures: list[Figure], extra=()) -> list[Section]:
    """The report's sections; ``extra`` are section functions (data, figures by
    name) -> Section | None of modules built on this one, placed after savings."""
    by_name = {f.name: f for f in figures}
    sections = [_runs_section(data)]
    validate = _validate_section(data)
    if validate:
        sections.append(validate)
    matrix = _matrix_section(data, by_name)
    if matrix:
        sections.append(matrix)
    bench = _bench_section(data, by_name)
    if bench:
        sections.append(bench)
    savings = _savings_section(data, by_name)
    if savings:
        sections.append(savings)
    for section_of in extra:
        section = section_of(data, by_name)
        if section:
            sections.append(section)
    per_scan = [f for f in figures if f.name.startswith("counters-")]
    if per_scan:
        sections.append(Section("Counters per scan: kernel vs emulator",
                                ["One figure per scenario. Where the dashed emulator line hides "
                                 "under the solid observed line, prediction and kernel agree."],
                                figures=per_scan))
    return sections


def _runs_section(data: RunData) -> Section:
    rows = []
    for label in data.kernels:
        info = data.kernel_info(label)
        rows.append([label, str(info.get("kernel_release", "")), str(info.get("backend", "")),
                     str(info.get("accelerator", info.get("accel", "")) or ""),
                     str(info.get("emulator_profile", "") or ""),
                     "interrupted" if info.get("interrupted") else str(info.get("error", "") or "")])
    paras = [f"Run directories: {', '.join(str(m.get('run_id', m.get('_path'))) for m in data.runs)}."]
    tvms = [r[0] for r in rows if r[3] == "tcg"]
    if tvms:
        paras.append(f"{', '.join(tvms)} ran under QEMU TCG (software emulation, nested KVM does not "
                     "work on this machine): their times compare kernels with each other, not with "
                     "the host.")
    return Section("Runs and kernels", paras,
                   [Table(["kernel", "release", "backend", "accelerator", "profile", "error"], rows)],
                   warnings=incomplete(data))


def _validate_section(data: RunData) -> Section | None:
    """``ksmbench validate``: each variant's verdict, and which scenarios and
    metrics it changed (from validate-cells.csv)."""
    v = data.validate
    if v is None or v.empty:
        return None
    rows = [[r.variant, r.patch, r.verdict, r.cells_compared, r.cells_changed, r.unexplained,
             r.flags_blamed or "-", r.first_cell] for r in v.itertuples()]
    tables = [Table(["variant", "patch", "verdict", "cells compared", "changed", "unexplained",
                     "flags blamed", "first cell"], rows)]
    cells = data.validate_cells
    if cells is not None and not cells.empty:
        changed = []
        for (variant, scenario), group in cells.groupby(["variant", "scenario"], sort=False):
            kinds = group["kind"].value_counts().to_dict()
            changed.append([variant, scenario, ", ".join(dict.fromkeys(group["metric"])),
                            ", ".join(f"{n} {k}" for k, n in kinds.items())])
        tables.append(Table(["variant", "scenario", "metrics changed", "cells"], changed))
    counts = v["verdict"].value_counts().to_dict()
    return Section("Patch validation: variants against the base",
                   ["Each variant (a patched kernel) against the base (the same source without "
                    "the patch), cell by cell. Verdicts: "
                    + ", ".join(f"{n} {k}" for k, n in counts.items()) + "."], tables)


def _matrix_section(data: RunData, figs: dict[str, Figure]) -> Section | None:
    v = verdicts(data)
    if v is None or v.empty:
        return None
    kernels = list(dict.fromkeys(v["kernel"]))
    rows = []
    for scenario in dict.fromkeys(v["scenario"]):
        row = [scenario]
        for k in kernels:
            hit = v[(v["scenario"] == scenario) & (v["kernel"] == k)]
            if hit.empty:
                row.append("not run")
            else:
                r = hit.iloc[0]
                cells = f" ({r.compared - r.mismatches}/{r.compared})" if r.compared else ""
                row.append(f"{r.verdict}{cells}")
        rows.append(row)
    counts = v["verdict"].value_counts().to_dict()
    para = ", ".join(f"{n} {k}" for k, n in counts.items())
    return Section("Scenarios x kernels", [f"Verdicts: {para}. In brackets: matching cells / compared cells."],
                   [Table(["scenario", *kernels], rows)],
                   [figs[n] for n in ("match-matrix",) if n in figs])


def _bench_section(data: RunData, figs: dict[str, Figure]) -> Section | None:
    if not data.bench_results:
        return None
    rows = []
    unstable = 0
    for kernel, result in data.bench_results.items():
        for h in HEADLINES:
            if not h.in_report:
                continue
            for s in sorted((s for s in result.summaries if s.benchmark == h.benchmark and s.metric == h.metric),
                            key=lambda s: (s.case, s.use_zero_pages or 0, s.size_mib or 0)):
                sm = s.summary
                unstable += bool(sm.unstable)
                rows.append([kernel, h.title, s.case, _num(s.use_zero_pages), _num(s.size_mib),
                             format_value(sm.median, s.unit), format_value(sm.mad, s.unit),
                             f"{sm.rel_stdev * 100:.1f}", str(sm.n),
                             "UNSTABLE: " + "; ".join(sm.warnings) if sm.unstable else "ok"])
    paras = ["Median ± median absolute deviation over the repeats; sd % is the standard deviation "
             "relative to the mean. A result is flagged unstable as pyperf flags it: sd ≥ 10 % of "
             "the mean, min or max ≥ 50 % away from the mean, or a time sample under 1 ms. Every "
             "raw sample is in bench.csv and bench.json."]
    if unstable:
        paras.append(f"{unstable} results are flagged unstable (a shared 2-core machine).")
    for kernel, result in data.bench_results.items():
        cc = result.crosscheck
        if cc is None:
            continue
        if isinstance(cc, CrosscheckNotDone):
            paras.append(f"Cross-check with ksm_tests -P on {kernel}: not done ({cc.error}).")
            continue
        o, t = cc.ours_mib_per_s, cc.ksm_tests_mib_per_s
        verdict = (f"they agree within {cc.tolerance * 100:.0f} %" if cc.agrees
                   else f"they DISAGREE by more than {cc.tolerance * 100:.0f} %")
        if not cc.is_judged:
            verdict = f"not judged: {cc.not_judged_because or ''}"
        idle = cc.idle_owner_mib_per_s
        paras.append(
            f"Cross-check on {kernel}: with the same tunables (pages_to_scan "
            f"{cc.tunables.pages_to_scan}, sleep_millisecs {cc.tunables.sleep_millisecs}, "
            f"observed during both runs) and {cc.size_mib} MiB, ksmbench measures "
            f"{o.median:.1f} MiB/s (sd {o.rel_stdev * 100:.1f} %, n={o.n}) and the kernel's "
            f"ksm_tests -P ({cc.ksm_tests.get('source_package', '')} "
            f"{cc.ksm_tests.get('source_version', '')}) {t.median:.1f} MiB/s "
            f"(sd {t.rel_stdev * 100:.1f} %, n={t.n}): ratio of the medians {cc.ratio:.3f}"
            + (f", median of the {len(cc.paired_ratios)} back-to-back pairs' ratios "
               f"{cc.paired_ratio_median:.3f}" if cc.paired_ratio_median else "")
            + f"; difference {cc.relative_difference * 100:.1f} %: {verdict}."
            + (f" Timed with the region's owner asleep and ksmd free (ksmbench's merge "
               f"benchmark) the same merge runs at {idle.median:.1f} MiB/s, "
               f"{cc.idle_owner_ratio:.2f}x ksm_tests -P: ksm_tests' own process spins on "
               "full_scans, and it is in ksmd's way." + _tlb_sentence(cc)
               if idle else ""))
        if cc.method:
            paras.append(f"How the cross-check is made: {cc.method}")
        tlb, cpu = cc.tlb_shootdowns_median, cc.ksmd_cpu_seconds_median
        rows.extend([kernel, "cross-check: " + k, "dup", "0", _num(cc.size_mib),
                     format_value(v.median, "MiB/s"), "", f"{v.rel_stdev * 100:.1f}",
                     str(v.n),
                     "" if tlb.get(k) is None else
                     f"{tlb[k]:.0f} TLB shootdowns, ksmd CPU {(cpu.get(k) or 0) * 1e3:.0f} ms"]
                    for k, v in cc.mib_per_s.items())
    return Section("Benchmarks", paras,
                   [Table(["kernel", "figure", "case", "uzp", "MiB", "median", "± MAD", "sd %", "n",
                           "stability"], rows)],
                   [figs[n] for n in ("merge-throughput", "costs", "ksmd-cpu-per-scan") if n in figs])


def _tlb_sentence(cc: CrosscheckResult) -> str:
    tlb, cpu = cc.tlb_shootdowns_median, cc.ksmd_cpu_seconds_median
    spin, idle = tlb.get("ksmbench-other-cpu"), tlb.get("ksmbench-idle-owner")
    if spin is None or idle is None:
        return ""
    return (f" Measured (/proc/interrupts): {spin:.0f} TLB shootdowns per merge with the owner "
            f"spinning on another CPU than ksmd, {idle:.0f} with it asleep; ksmd CPU "
            f"{(cpu.get('ksmbench-other-cpu') or 0) * 1e3:.0f} vs "
            f"{(cpu.get('ksmbench-idle-owner') or 0) * 1e3:.0f} ms.")


def _savings_section(data: RunData, figs: dict[str, Figure]) -> Section | None:
    tables, paras = [], []
    for kernel, result in data.bench_results.items():
        for uzp, rec in sorted((result.savings or {}).items()):
            w = rec.workload
            rows = [[v.view, "absent" if v.saved_bytes is None else f"{v.saved_bytes / MIB:.1f}",
                     "" if v.expected_bytes is None else f"{v.expected_bytes / MIB:.1f}",
                     "" if v.residual_bytes is None else f"{v.residual_bytes / MIB:+.1f}",
                     v.explanation] for v in rec.views]
            u = rec.unmerge
            rows.append(["unmerge cost: run=2 needs back (AnonPages)",
                         f"{u.measured_anon_bytes / MIB:.1f}",
                         f"{u.predicted_bytes_by_counters / MIB:.1f}",
                         f"{(u.measured_anon_bytes - u.predicted_bytes_by_counters) / MIB:+.1f}",
                         u.explanation + f"; run=2 took {u.run2_seconds:.3f} s, "
                         f"{u.zero_pages_left_after_run2} KSM zero pages were left mapped"])
            tables.append(Table([f"{kernel}, use_zero_pages={uzp}: view "
                                 f"({w.processes} processes x {w.mib_per_process} MiB)",
                                 "saved MiB", "expected MiB", "residual MiB", "why"], rows))
    if not tables:
        return None
    paras.append("Several processes hold similar memory (a quarter zero pages, half pages identical "
                 "across processes, a quarter unique). Each row is one way of seeing the saving; "
                 "'expected' is what that view must show if the stated reason is the whole story, "
                 "computed from the KSM counters and the processes' page tables; the residual is "
                 "what is left unexplained (for system-wide views, mostly other activity on the "
                 "machine, whose size the drift figure estimates).")
    return Section("Memory savings, three ways", paras, tables,
                   [figs[n] for n in ("savings-over-time", "zero-page-savings") if n in figs])


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(int(v)) if float(v).is_integer() else str(v)


# -- rendering -----------------------------------------------------------------------

def render_markdown(title: str, sections: list[Section], figure_dir: str = "figures") -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for w in s.warnings:
            out += [f"> **Warning:** {w}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for t in s.tables:
            out.append("| " + " | ".join(_md(h) for h in t.header) + " |")
            out.append("|" + "---|" * len(t.header))
            for r in t.rows:
                out.append("| " + " | ".join(_md(c) for c in r) + " |")
            out.append("")
        for f in s.figures:
            out += [f"![{f.title}]({figure_dir}/{f.name}.png)", "", f"*{f.caption}*", ""]
    return "\n".join(out)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_html(title: str, sections: list[Section], pngs: dict[str, bytes]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{esc(title)}</title>", "<style>", _CSS, "</style></head><body>",
             f"<h1>{esc(title)}</h1>", "<nav><ul>"]
    for i, s in enumerate(sections):
        parts.append(f"<li><a href=\"#s{i}\">{esc(s.title)}</a></li>")
    parts.append("</ul></nav>")
    for i, s in enumerate(sections):
        parts.append(f"<section id=\"s{i}\"><h2>{esc(s.title)}</h2>")
        for w in s.warnings:
            parts.append(f"<p class=\"warn\"><b>Warning:</b> {esc(w)}</p>")
        for p in s.paragraphs:
            parts.append(f"<p>{esc(p)}</p>")
        for t in s.tables:
            parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.header)
                         + "</tr></thead><tbody>")
            for r in t.rows:
                cells = []
                for c in r:
                    cls = _cell_class(str(c))
                    cells.append(f"<td{cls}>{esc(str(c))}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</tbody></table>")
        for f in s.figures:
            data = base64.b64encode(pngs[f.name]).decode("ascii")
            parts.append(f"<figure><img alt=\"{esc(f.title)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption><b>{esc(f.title)}.</b> {esc(f.caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _cell_class(text: str) -> str:
    if text.startswith("match"):
        return " class=\"ok\""
    if text.startswith(("mismatch", "UNSTABLE", "DISAGREE", "interrupted", "error")):
        return " class=\"bad\""
    return ""


_CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.ok { background: #e8f5e9; } td.bad { background: #ffebee; }
p.warn { background: #ffebee; border-left: 4px solid #c62828; padding: 0.5em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; }
nav ul { columns: 2; }
"""
