"""Reading run directories (from ``ksmbench run`` and ``ksmbench bench``) into
one set of tables for the report.

A run directory may hold observations.csv / expectations.csv (scenario runs),
bench.csv / bench.json / savings.csv (benchmarks), or both; several
directories are concatenated, each row keeping the run id it came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..bench.outcome import KernelBench
from ..bench.store import read_bench, read_results
from ..errors import UsageError


@dataclass
class RunData:
    """Everything the report reads, across one or more run directories."""

    runs: list[dict[str, Any]] = field(default_factory=list)      # metadata.json of each
    observations: pd.DataFrame | None = None
    expectations: pd.DataFrame | None = None
    bench: pd.DataFrame | None = None
    savings: pd.DataFrame | None = None
    #: kernel -> its benchmark results (bench.json, typed)
    bench_results: dict[str, KernelBench] = field(default_factory=dict)
    #: ``ksmbench savings`` runs: (metadata, savings.csv as a DataFrame)
    workload_savings: list[tuple[dict[str, Any], pd.DataFrame]] = field(default_factory=list)
    #: ``ksmbench validate``: one row per variant, and every changed cell
    validate: pd.DataFrame | None = None
    validate_cells: pd.DataFrame | None = None

    @property
    def kernels(self) -> list[str]:
        seen: list[str] = []
        for df in (self.observations, self.bench):
            if df is not None:
                for k in df["kernel"].dropna().unique():
                    if k not in seen:
                        seen.append(str(k))
        for k in self.bench_results:
            if k not in seen:
                seen.append(k)
        return seen

    def kernel_info(self, label: str) -> dict[str, Any]:
        """The metadata entry of kernel ``label`` (from whichever run has it)."""
        info: dict[str, Any] = {}
        for meta in self.runs:
            for entry in meta.get("kernels", []):
                if entry.get("kernel") == label:
                    for k, v in entry.items():
                        info.setdefault(k, v)
        return info


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    frames = [f for f in frames if f is not None and len(f.columns)]
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)


def load_runs(paths: list[str | os.PathLike]) -> RunData:
    if not paths:
        raise UsageError("give at least one run directory", hint="e.g. ksmbench report results/<run-id>")
    data = RunData()
    obs, exp, bench, savings, vrows, vcells = [], [], [], [], [], []
    for p in paths:
        path = Path(p)
        meta_path = path / "metadata.json"
        if not meta_path.exists():
            raise UsageError(f"{path} is not a run directory (no metadata.json)",
                             hint="pass a directory written by ksmbench run or ksmbench bench")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise UsageError(f"{meta_path} is not valid JSON ({exc})") from None
        meta["_path"] = str(path)
        data.runs.append(meta)
        run_id = meta.get("run_id", path.name)
        if (path / "observations.csv").exists():
            df = pd.read_csv(path / "observations.csv",
                             dtype={"scenario": str, "kernel": str, "op": str, "metric": str,
                                    "match": "string"})
            df["observed"] = pd.to_numeric(df["observed"], errors="coerce")
            df["predicted"] = pd.to_numeric(df["predicted"], errors="coerce")
            df["scan"] = pd.to_numeric(df["scan"], errors="coerce").astype("Int64")
            df["run_id"] = run_id
            obs.append(df)
        if (path / "expectations.csv").exists():
            df = pd.read_csv(path / "expectations.csv", dtype={"scenario": str, "kernel": str,
                                                               "metric": str, "holds": "string"})
            df["run_id"] = run_id
            exp.append(df)
        df = read_bench(path)
        if df is not None:
            df["run_id"] = run_id
            bench.append(df)
        if (path / "savings.csv").exists() and meta.get("command") == "savings":
            # ksmbench savings: scan, metric, predicted, measured
            df = pd.read_csv(path / "savings.csv", dtype={"scan": str, "metric": str})
            data.workload_savings.append((meta, df))
        elif (path / "savings.csv").exists():
            df = pd.read_csv(path / "savings.csv", dtype={"kernel": str, "point": str, "metric": str})
            df["run_id"] = run_id
            savings.append(df)
        if (path / "validate.csv").exists():
            df = pd.read_csv(path / "validate.csv", dtype=str, keep_default_na=False)
            df["run_id"] = run_id
            vrows.append(df)
        if (path / "validate-cells.csv").exists():
            df = pd.read_csv(path / "validate-cells.csv", dtype=str, keep_default_na=False)
            df["run_id"] = run_id
            vcells.append(df)
        for kernel, result in read_results(path).items():
            # several bench runs of one kernel add up
            data.bench_results.setdefault(kernel, KernelBench()).update(result)
    data.observations = _concat(obs)
    data.expectations = _concat(exp)
    data.bench = _concat(bench)
    data.savings = _concat(savings)
    data.validate = _concat(vrows)
    data.validate_cells = _concat(vcells)
    return data


def incomplete(data: RunData) -> list[str]:
    """One sentence per run that did not run to its end (interrupted, or a
    kernel that failed): the report puts these first, so that the verdicts of
    a partial run are not read as a whole run's."""
    out = []
    for meta in data.runs:
        run_id = meta.get("run_id", meta.get("_path"))
        where = meta.get("interrupted_at") or {}
        if meta.get("interrupted"):
            text = f"Run {run_id} is INCOMPLETE: it was interrupted"
            if where.get("signal"):
                text += f" by {where['signal']}"
            if where.get("kernel"):
                text += f" on {where['kernel']}"
            if where.get("scenario"):
                text += f" during {where['scenario']}"
                if where.get("after_step") is not None:
                    text += f", after step {where['after_step']}"
                    if where.get("after_scan") is not None:
                        text += f" scan {where['after_scan']}"
                        if where.get("scans_in_step"):
                            text += f" of {where['scans_in_step']}"
                else:
                    text += ", before its first observation"
            elif where:
                text += " between two scenarios"
            planned = list(meta.get("scenarios") or [])
            for entry in meta.get("kernels", []):
                done = [n for n, v in (entry.get("verdicts") or {}).items() if v != "interrupted"]
                missing = [n for n in planned if n not in done]
                if missing:
                    text += (f"; on {entry.get('kernel')}, {len(missing)} of {len(planned)} scenarios "
                             "did not finish")
            if meta.get("kernels_not_run"):
                text += f"; kernels not run: {', '.join(meta['kernels_not_run'])}"
            out.append(text + ". Its verdicts cover only what was measured before that.")
        for entry in meta.get("kernels", []):
            if entry.get("error"):
                out.append(f"Run {run_id} is INCOMPLETE on {entry.get('kernel')}: {entry['error']}.")
    return out


def _recorded_verdicts(data: RunData) -> dict[tuple[str, str], str]:
    """(scenario, kernel) -> the verdict metadata.json records, where the run
    itself knew better than its rows: interrupted, error."""
    out = {}
    for meta in data.runs:
        for entry in meta.get("kernels", []):
            for scenario, verdict in (entry.get("verdicts") or {}).items():
                if verdict in ("interrupted", "error"):
                    out[(scenario, entry.get("kernel"))] = verdict
    return out


def verdicts(data: RunData) -> pd.DataFrame | None:
    """(scenario, kernel) -> verdict, as ``ksmbench run`` decides it.

    match: every compared cell matched and every expect held; mismatch: some
    did not; observed: nothing to compare (no prediction, no expect);
    interrupted / error: the scenario did not run to its end (from metadata.json).
    """
    if data.observations is None or data.observations.empty:
        return None
    obs = data.observations
    recorded = _recorded_verdicts(data)
    rows = []
    for (scenario, kernel), g in obs.groupby(["scenario", "kernel"], sort=False):
        m = g["match"].dropna().str.lower()
        compared = int(len(m))
        mismatches = int((m == "false").sum())
        exp_failed = exp_checked = 0
        if data.expectations is not None and not data.expectations.empty:
            e = data.expectations
            e = e[(e["scenario"] == scenario) & (e["kernel"] == kernel)]
            holds = e["holds"].dropna().str.lower()
            exp_checked = int(len(holds))
            exp_failed = int((holds == "false").sum())
        if mismatches or exp_failed:
            verdict = "mismatch"
        elif compared or exp_checked:
            verdict = "match"
        else:
            verdict = "observed"
        verdict = recorded.get((scenario, kernel), verdict)
        rows.append({"scenario": scenario, "kernel": kernel, "verdict": verdict,
                     "compared": compared, "mismatches": mismatches,
                     "expects": exp_checked, "expects_failed": exp_failed})
    return pd.DataFrame(rows)
