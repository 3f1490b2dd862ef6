"""The printed summary of a benchmark run: numbers, ratios, warnings, verdicts."""

from __future__ import annotations

from ..console import esc
from .outcome import (CROSSCHECK_CASES, HEADLINES, Crosscheck, CrosscheckNotDone, KernelBench,
                      SavingsResult)
from .stats import format_value

MIB = 1 << 20
#: a figure of one of these metrics (of any benchmark) that is unstable is warned about
HEADLINE_METRICS = {h.metric for h in HEADLINES}


def print_summary(console, results: dict[str, KernelBench], tolerance: float) -> int:
    """Print every kernel's results; return the exit status (1: cross-check disagrees)."""
    from rich.table import Table

    status = 0
    for kernel, result in results.items():
        table = Table(title=f"benchmarks on {esc(kernel)}: median ± MAD of the repeats")
        table.add_column("benchmark, case, size: metric")
        table.add_column("median ± MAD", justify="right")
        table.add_column("sd%", justify="right")
        table.add_column("n", justify="right")
        for s in result.headline_summaries():
            sm = s.summary
            case = s.case + (f" uzp={s.use_zero_pages}" if s.case.startswith("zero") else "")
            flag = " [red](unstable)[/red]" if sm.unstable else ""
            table.add_row(f"{s.benchmark} {case} {_show(s.size_mib)} MiB: {s.metric}",
                          f"{format_value(sm.median, s.unit)} ± {format_value(sm.mad, s.unit)}",
                          f"{sm.rel_stdev * 100:.0f}{flag}", str(sm.n))
        if table.row_count:
            console.print(table)
        unstable = [s for s in result.summaries if s.summary.unstable and s.metric in HEADLINE_METRICS]
        if unstable:
            console.print(f"[yellow]WARNING: {len(unstable)} results on {esc(kernel)} may be unstable:[/yellow]")
            for s in unstable[:5]:
                console.print(f"  {s.benchmark} {s.case} uzp={s.use_zero_pages} "
                              f"{s.size_mib} MiB {s.metric}: " + esc("; ".join(s.summary.warnings)))
            if len(unstable) > 5:
                console.print(f"  ... and {len(unstable) - 5} more (bench.json has every warning)")
            console.print("  rerun with more --repeats, or on a quieter machine")
        if result.savings is not None:
            _print_savings(console, kernel, result.savings)
        if result.crosscheck is not None:
            status = max(status, _print_crosscheck(console, kernel, result.crosscheck, tolerance))
    return status


def _show(v) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() else str(v)


def _print_savings(console, kernel: str, savings: dict[int, SavingsResult]) -> None:
    from rich.table import Table

    for uzp, rec in sorted(savings.items()):
        w, n = rec.workload, rec.repeats_done
        table = Table(title=f"memory saved on {esc(kernel)}, use_zero_pages={uzp} "
                            f"({w.processes} processes x {w.mib_per_process} MiB, "
                            f"median of {n})")
        for col in ("view", "saved MiB", "expected", "residual", "range"):
            table.add_column(col, justify="left" if col == "view" else "right")
        for v in rec.views:
            exp, res = v.expected_bytes, v.residual_bytes
            rng = ""
            if v.residual_min_bytes is not None and n > 1:
                rng = f"{v.residual_min_bytes / MIB:+.1f}..{v.residual_max_bytes / MIB:+.1f}"
            table.add_row(esc(v.view), "absent" if v.saved_bytes is None else f"{v.saved_bytes / MIB:.1f}",
                          "" if exp is None else f"{exp / MIB:.1f}",
                          "" if res is None else f"{res / MIB:+.1f}", rng)
        console.print(table)
        u, drift = rec.unmerge, rec.median_abs_drift
        console.print(f"  unmerging everything (run=2) took {u.run2_seconds:.3f} s and needs back "
                      f"{u.measured_anon_bytes / MIB:.1f} MiB (AnonPages), "
                      f"{u.measured_pss_bytes / MIB:.1f} MiB (PSS); the counters predict "
                      f"{u.predicted_bytes_by_counters / MIB:.1f} MiB; "
                      f"{u.zero_pages_left_after_run2:.0f} KSM zero pages left mapped")
        console.print(f"  machine drift over 0.5 s before merging (median |x|): AnonPages "
                      f"{drift.drift_anon_bytes / MIB:.1f} MiB, MemFree+pcp "
                      f"{drift.drift_free_and_pcp_bytes / MIB:.1f} MiB")


def _print_crosscheck(console, kernel: str, cc: Crosscheck, tolerance: float) -> int:
    if isinstance(cc, CrosscheckNotDone):
        console.print(f"[yellow]cross-check with ksm_tests -P on {esc(kernel)}: not done: "
                      f"{esc(cc.error)}[/yellow]")
        return 0
    ours, theirs = cc.ours_mib_per_s, cc.ksm_tests_mib_per_s
    diff = cc.relative_difference
    verdict = "agrees" if diff <= tolerance else "DISAGREES"
    colour = "green" if diff <= tolerance else "red"
    if not cc.is_judged:
        verdict, colour = f"not judged: {esc(cc.not_judged_because or '')}", "yellow"
    console.print(f"cross-check on {esc(kernel)}, ksmd and the spinning process on one CPU "
                  f"({cc.size_mib} MiB, pages_to_scan "
                  f"{cc.tunables.pages_to_scan}, sleep_millisecs {cc.tunables.sleep_millisecs}): "
                  f"ksmbench {ours.median:.1f} MiB/s (sd {ours.rel_stdev * 100:.1f}%), "
                  f"ksm_tests -P {theirs.median:.1f} MiB/s (sd {theirs.rel_stdev * 100:.1f}%): "
                  + (f"median of {len(cc.paired_ratios)} paired ratios "
                     f"{cc.paired_ratio_median:.3f}, " if cc.paired_ratio_median else "")
                  + f"difference {diff * 100:.1f}% -> [{colour}]{verdict}[/{colour}] "
                  f"(tolerance {tolerance * 100:.0f}%)")
    for f in cc.failures:
        console.print(f"  [yellow]{f.case} #{f.repeat + 1} failed (load {f.loadavg}): "
                      f"{esc(f.error)}[/yellow]")
    for key, s in cc.mib_per_s.items():
        extra = ""
        if cc.tlb_shootdowns_median.get(key) is not None:
            extra = f", {cc.tlb_shootdowns_median[key]:.0f} TLB shootdowns"
        if cc.ksmd_cpu_seconds_median.get(key) is not None:
            extra += f", ksmd CPU {cc.ksmd_cpu_seconds_median[key] * 1e3:.0f} ms"
        console.print(f"  {CROSSCHECK_CASES.get(key, key)}: {s.median:.1f} MiB/s "
                      f"(sd {s.rel_stdev * 100:.0f}%, n={s.n}{extra})")
    return 0 if diff <= tolerance or not cc.is_judged else 1
