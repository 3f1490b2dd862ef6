"""ksmbench.results.load(): observations.csv as a typed DataFrame, on the
shipped reference run; the v1 CSV itself is unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from ksmbench.results import OBSERVATION_COLUMNS, RunDir, load

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference" / "20261129-021707-c61b"


def test_types_and_split_on_the_reference_run():
    df = load(REFERENCE)
    raw = list(csv.DictReader(open(REFERENCE / "observations.csv", newline="")))
    assert len(df) == len(raw)
    assert list(df.columns) == [*OBSERVATION_COLUMNS, "proc", "region", "counter"]
    for column in ("step", "scan", "observed", "predicted"):
        assert df[column].dtype == "Int64", column
    assert df["match"].dtype == "boolean"
    for column in ("scenario", "kernel", "op", "metric", "proc", "region", "counter"):
        assert df[column].dtype == "string", column

    # every row agrees with the CSV text: empty cells are <NA>, never 0 or NaN
    for i in range(0, len(raw), 97):
        row, cells = df.iloc[i], raw[i]
        for column in ("scan", "observed", "predicted"):
            if cells[column] == "":
                assert row[column] is pd.NA, (i, column)
            else:
                assert row[column] == int(cells[column]), (i, column)
        expected_match = {"": pd.NA, "true": True, "false": False}[cells["match"]]
        assert row["match"] is expected_match or row["match"] == expected_match
        parts = cells["metric"].split(".")
        if parts[0] == "global":
            assert row["proc"] is pd.NA and row["region"] is pd.NA and row["counter"] == parts[1]
        elif parts[0] == "proc":
            assert (row["proc"], row["counter"]) == (parts[1], parts[2]) and row["region"] is pd.NA
        else:
            assert (row["proc"], row["region"], row["counter"]) == tuple(parts[1:])
    # kinds seen: all three
    assert df["region"].notna().any() and (df["proc"].notna() & df["region"].isna()).any()
    assert df["proc"].isna().any()
    assert df["match"].isna().sum() == sum(1 for r in raw if r["match"] == "")


def test_the_readme_pivot():
    df = load(REFERENCE)
    zero = df[(df.scenario == "zero-unmerge-whole") & (df.counter == "ksm_zero_pages") & df.proc.isna()]
    table = zero.pivot(index=["step", "op", "scan"], columns="kernel", values="observed")
    assert table[("debian:6.1")].isna().all()  # 6.1 has no ksm_zero_pages
    assert table.loc[(3, "scan", 2), "host"] == 512 and table.loc[(3, "scan", 2), "debian:6.12"] == 512
    assert table.loc[(4, "madvise", pd.NA), "host"] == 0


def test_the_v1_csv_is_unchanged(tmp_path):
    rundir = RunDir(tmp_path)
    rundir.add_observations([("s", "host", 0, "mmap", None, "global.full_scans", 0, None, None),
                             ("s", "host", 1, "scan", 1, "region.main.a.ksm", -3, -3, True)])
    rundir.close()
    text = (rundir.path / "observations.csv").read_text().splitlines()
    assert text == ["scenario,kernel,step,op,scan,metric,observed,predicted,match",
                    "s,host,0,mmap,,global.full_scans,0,,",
                    "s,host,1,scan,1,region.main.a.ksm,-3,-3,true"]
    df = load(rundir.path)
    assert df.loc[1, "observed"] == -3  # counters are signed
    assert df.loc[0, "predicted"] is pd.NA and df.loc[0, "match"] is pd.NA
    assert bool(df.loc[1, "match"]) is True
    assert (REFERENCE / "observations.csv").read_text().splitlines()[0] == ",".join(OBSERVATION_COLUMNS)


def test_the_report_fills_the_profile_column_from_metadata():
    from ksmbench.report.document import _runs_section
    from ksmbench.report.load import load_runs

    section = _runs_section(load_runs([REFERENCE]))
    (table,) = section.tables
    profile = table.header.index("profile")
    assert {row[0]: row[profile] for row in table.rows} == {
        "host": "linux-6.18.44", "debian:6.1": "linux-6.1", "debian:6.12": "linux-6.12.117"}
    assert section.warnings == []  # a complete run: nothing flagged
    shipped = (REFERENCE.parent / "report" / "summary.md").read_text()
    assert "| host | 6.18.44-fc-v657 | host |  | linux-6.18.44 |  |" in shipped
