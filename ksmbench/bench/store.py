"""A benchmark run directory: RunDir's conventions plus the benchmark tables.

``<out>/<run-id>/`` holds, next to ``metadata.json`` (written by
:class:`~ksmbench.results.RunDir`):

* ``bench.csv``: every raw sample, one row per (kernel, benchmark, case,
  size, use_zero_pages, repeat, metric), appended and flushed as measured;
* ``savings.csv``: the savings workload's time series (one row per point
  and metric), appended and flushed as measured;
* ``bench.json``: per kernel, every figure's summary (median, spread,
  stability warnings) *with its raw samples*, the savings reconciliation and
  the ksm_tests cross-check; rewritten (atomically) after each benchmark.

A guest kernel writes the same directory inside the VM; :meth:`BenchStore.merge_guest`
folds it into the host's run directory, so one run directory holds every
kernel of a ``ksmbench bench --kernel A --kernel B`` invocation.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ..errors import KsmbenchError, os_boundary
from ..results import RunDir
from .outcome import Crosscheck, KernelBench, MetricSummary, SavingsResult
from .stats import summarize

BENCH_COLUMNS = ("kernel", "benchmark", "case", "size_mib", "use_zero_pages", "repeat",
                 "metric", "value", "unit")
SAVINGS_COLUMNS = ("kernel", "use_zero_pages", "repeat", "point", "scan", "seconds", "metric", "value")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class BenchStore:
    """Writes one benchmark run directory as results are produced."""

    def __init__(self, out: str | os.PathLike, run_id: str | None = None):
        self.rundir = RunDir(out, run_id, tables=False)
        self.path = self.rundir.path
        self.metadata = self.rundir.metadata
        self.metadata["kind"] = "bench"
        self._bench_file = open(self.path / "bench.csv", "w", newline="")
        self._bench = csv.writer(self._bench_file)
        self._bench.writerow(BENCH_COLUMNS)
        self._savings_file = open(self.path / "savings.csv", "w", newline="")
        self._savings = csv.writer(self._savings_file)
        self._savings.writerow(SAVINGS_COLUMNS)
        #: kernel -> (benchmark, case, size, uzp, metric) -> (unit, [values])
        self._samples: dict[str, dict[tuple, tuple[str, list[float]]]] = defaultdict(dict)
        #: kernel -> the savings reconciliation / the ksm_tests cross-check
        self._savings_results: dict[str, dict[int, SavingsResult]] = {}
        self._crosscheck: dict[str, Crosscheck] = {}
        self.write_json()

    # -- raw rows ----------------------------------------------------------------
    def add_sample(self, kernel: str, benchmark: str, case: str, size_mib: float | None,
                   use_zero_pages: int | None, repeat: int, metrics: dict[str, tuple[float, str]]
                   ) -> None:
        """One repetition's measured values: ``metrics`` maps name -> (value, unit)."""
        rows = []
        for metric, (value, unit) in metrics.items():
            rows.append((kernel, benchmark, case, size_mib, use_zero_pages, repeat, metric, value, unit))
            if value is not None:
                key = (benchmark, case, size_mib, use_zero_pages, metric)
                entry = self._samples[kernel].setdefault(key, (unit, []))
                entry[1].append(float(value))
        self._bench.writerows([_cell(v) for v in row] for row in rows)
        self._bench_file.flush()

    def add_savings_rows(self, rows: Iterable[tuple]) -> None:
        self._savings.writerows([_cell(v) for v in row] for row in rows)
        self._savings_file.flush()

    def set_savings(self, kernel: str, savings: dict[int, SavingsResult]) -> None:
        self._savings_results[kernel] = savings
        self.write_json()

    def set_crosscheck(self, kernel: str, crosscheck: Crosscheck) -> None:
        self._crosscheck[kernel] = crosscheck
        self.write_json()

    def crosscheck(self, kernel: str) -> Crosscheck | None:
        return self._crosscheck.get(kernel)

    # -- summaries -----------------------------------------------------------------
    def summaries(self, kernel: str) -> list[MetricSummary]:
        return [MetricSummary(benchmark, case, size, uzp, metric, unit, summarize(values, unit),
                              tuple(values))
                for (benchmark, case, size, uzp, metric), (unit, values)
                in self._samples.get(kernel, {}).items()]

    def results(self) -> dict[str, KernelBench]:
        """Every kernel's results so far, by label."""
        kernels = sorted(set(self._samples) | set(self._savings_results) | set(self._crosscheck))
        return {k: KernelBench(self.summaries(k), self._savings_results.get(k), self._crosscheck.get(k))
                for k in kernels}

    def write_json(self) -> None:
        doc = {"run_id": self.rundir.run_id,
               "kernels": {k: r.to_dict() for k, r in self.results().items()}}
        tmp = self.path / "bench.json.tmp"
        with os_boundary(f"writing {tmp}"):
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path / "bench.json")

    # -- guests --------------------------------------------------------------------
    def merge_guest(self, guest_dir: Path, label: str) -> dict[str, Any]:
        """Fold a guest's run directory (written by the same code) into this one.

        Rows keep the label the guest was told to use (``--label``); the
        guest's metadata becomes this run's kernel entry for ``label``.
        """
        guest_dir = Path(guest_dir)
        meta_path = guest_dir / "metadata.json"
        if not meta_path.exists():
            raise KsmbenchError(f"{label}: the guest wrote no metadata.json in {guest_dir}",
                                hint="see the guest's output above for why it stopped")
        meta = json.loads(meta_path.read_text())
        with open(guest_dir / "bench.csv", newline="") as f:
            for row in csv.DictReader(f):
                metrics = {row["metric"]: (_num(row["value"]), row["unit"])}
                self.add_sample(row["kernel"], row["benchmark"], row["case"],
                                _num(row["size_mib"]), _int_or_none(row["use_zero_pages"]),
                                int(row["repeat"]), metrics)
        savings = guest_dir / "savings.csv"
        if savings.exists():
            with open(savings, newline="") as f:
                reader = csv.reader(f)
                next(reader, None)
                self.add_savings_rows(reader)
        for kernel, guest in read_results(guest_dir).items():  # its summaries came from bench.csv
            if guest.savings is not None:
                self._savings_results[kernel] = guest.savings
            if guest.crosscheck is not None:
                self._crosscheck[kernel] = guest.crosscheck
        self.write_json()
        return meta

    def close(self) -> None:
        self.write_json()
        self.rundir.close()
        self._bench_file.close()
        self._savings_file.close()


def _num(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def _int_or_none(text: str) -> int | None:
    return None if text == "" else int(text)


def _read_table(path: str | os.PathLike, name: str, dtype: dict):
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.exists():
        return None
    return pd.read_csv(path, dtype=dtype)


def read_bench(path: str | os.PathLike):
    """bench.csv of a run directory as a pandas DataFrame (None if absent)."""
    return _read_table(path, "bench.csv", {"kernel": str, "benchmark": str, "case": str,
                                           "metric": str, "unit": str})


def read_results(path: str | os.PathLike) -> dict[str, KernelBench]:
    """bench.json of a run directory, typed: kernel label -> its results
    (empty when the directory has no bench.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json"
    if not path.exists():
        return {}
    with os_boundary(f"reading {path}"):
        text = path.read_text()
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise KsmbenchError(f"{path} is not valid JSON ({exc})") from None
    return {kernel: KernelBench.from_dict(body) for kernel, body in doc.get("kernels", {}).items()}
