"""The run directory: metadata.json, observations.csv, expectations.csv.

Rows are written as they are produced (and flushed), so an interrupted run
keeps everything it measured.  metadata.json is rewritten after every kernel
and at the end.  The columns are those of the README ("Running scenarios",
"Scenario format").
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .errors import os_boundary

OBSERVATION_COLUMNS = ("scenario", "kernel", "step", "op", "scan", "metric",
                       "observed", "predicted", "match")
EXPECTATION_COLUMNS = ("scenario", "kernel", "step", "metric", "expected", "observed", "holds")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class RunDir:
    """One run's output directory, written incrementally."""

    def __init__(self, out: str | os.PathLike, run_id: str | None = None, *,
                 tables: bool = True):
        """``tables=False``: no observations/expectations CSVs (a benchmark
        run writes its own tables next to metadata.json, see ksmbench.bench)."""
        self.run_id = run_id or new_run_id()
        self.path = Path(out) / self.run_id
        with os_boundary(f"creating the run directory {self.path}"):
            self.path.mkdir(parents=True, exist_ok=False)
        self.metadata: dict[str, Any] = {
            "toolkit_version": __version__,
            "run_id": self.run_id,
            "started_at": now_iso(),
            "ended_at": None,
            "kernels": [],
        }
        self._obs_file = self._exp_file = None
        if tables:
            self._obs_file = open(self.path / "observations.csv", "w", newline="")
            self._obs = csv.writer(self._obs_file)
            self._obs.writerow(OBSERVATION_COLUMNS)
            self._exp_file = open(self.path / "expectations.csv", "w", newline="")
            self._exp = csv.writer(self._exp_file)
            self._exp.writerow(EXPECTATION_COLUMNS)
        self.write_metadata()

    # -- rows ------------------------------------------------------------------
    def add_observations(self, rows: Iterable[tuple]) -> None:
        self._obs.writerows([_cell(v) for v in row] for row in rows)
        self._obs_file.flush()

    def add_expectations(self, rows: Iterable[tuple]) -> None:
        self._exp.writerows([_cell(v) for v in row] for row in rows)
        self._exp_file.flush()

    # -- metadata --------------------------------------------------------------
    def kernel_entry(self, label: str) -> dict[str, Any]:
        for entry in self.metadata["kernels"]:
            if entry["kernel"] == label:
                return entry
        entry: dict[str, Any] = {"kernel": label, "started_at": now_iso()}
        self.metadata["kernels"].append(entry)
        return entry

    def write_metadata(self) -> None:
        meta = dict(self.metadata)
        if len(meta["kernels"]) == 1:
            # one kernel: its facts at the top level too, as the format lists them
            for key, value in meta["kernels"][0].items():
                if key not in ("started_at", "ended_at"):
                    meta.setdefault(key, value)
        tmp = self.path / "metadata.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path / "metadata.json")

    def close(self) -> None:
        self.metadata["ended_at"] = now_iso()
        self.write_metadata()
        for f in (self._obs_file, self._exp_file):
            if f is not None:
                f.close()


def read_observations(path: str | os.PathLike):
    """observations.csv of a run directory as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "observations.csv"
    return pd.read_csv(path, dtype={"scenario": str, "kernel": str, "op": str, "metric": str,
                                    "match": "string"},
                       keep_default_na=True)
