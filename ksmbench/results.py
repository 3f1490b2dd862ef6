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


def load(rundir: str | os.PathLike):
    """A run directory's observations.csv as a pandas DataFrame ready to analyse.

    The columns of observations.csv (unchanged: the file stays the v1
    format), typed: ``step``, ``scan``, ``observed`` and ``predicted`` are
    nullable integers (``Int64``: an empty cell, such as a counter the kernel
    lacks or a step that is not a scan, is ``<NA>``, never 0 or NaN), ``match``
    is a nullable ``boolean``, the text columns are ``string``.  Added: the
    metric split into ``proc``, ``region`` and ``counter``
    (``region.main.a.ksm`` -> ``main``, ``a``, ``ksm``; ``global.full_scans``
    -> ``<NA>``, ``<NA>``, ``full_scans``).
    """
    import pandas as pd

    path = Path(rundir)
    csv_path = path / "observations.csv" if path.is_dir() else path
    with os_boundary(f"reading {csv_path}"):
        df = pd.read_csv(csv_path, keep_default_na=False, na_values=[""],
                         dtype={"scenario": "string", "kernel": "string", "op": "string",
                                "metric": "string", "step": "Int64", "scan": "Int64",
                                "observed": "Int64", "predicted": "Int64", "match": "string"})
    df["match"] = df["match"].str.lower().map({"true": True, "false": False}).astype("boolean")
    parts = df["metric"].str.split(".", n=3, expand=True).reindex(columns=range(4))
    kind = parts[0]
    df["proc"] = parts[1].where(kind.isin(["proc", "region"])).astype("string")
    df["region"] = parts[2].where(kind == "region").astype("string")
    df["counter"] = parts[1].where(kind == "global",
                                   parts[2].where(kind == "proc", parts[3])).astype("string")
    return df

