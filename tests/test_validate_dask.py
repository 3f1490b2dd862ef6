"""ksmbench validate on Dask (ksmbench/compare/validate.py's _OnCluster on
ksmbench/matrix.py's MatrixSession): the base and a variant of Debian's
linux-source-6.12 booted by two real `dask worker` processes on 127.0.0.1,
an unreachable scheduler, and a built image shipped to a worker that does not
see the client's files.

The images come from the build cache that tests/test_validate_vm.py fills
($KSMBENCH_CACHE/validate): only a machine's first run builds (the base about
5 min on 2 free cores, the one-line mutant under a minute).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from ksmbench.cli import main
from ksmbench.matrix import ShippedImage
from test_matrix import _free_port, _only_rundir, dask_cluster
from test_validate_vm import MUTANT, _need_tools, _qemu_children_of_test


def _patches(tmp_path: Path) -> Path:
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(MUTANT, patches)
    return patches


def test_unreachable_scheduler_is_one_line_and_no_run_directory(tmp_path, capsys):
    _need_tools()
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    status = main(["validate", "debian-source:6.12", "--patches", str(_patches(tmp_path)),
                   "--scheduler", address, "--out", str(out), "zero-pages"])
    err = capsys.readouterr().err
    assert status == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and address in lines[0] and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_jobs_and_make_jobs_below_one_are_refused(tmp_path, capsys):
    patches = _patches(tmp_path)
    for option in ("--jobs", "--make-jobs"):
        status = main(["validate", "debian-source:6.12", "--patches", str(patches), option, "0",
                       "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and f"{option} 0" in err, err
    assert not (tmp_path / "out").exists()


def test_a_shipped_image_is_written_into_the_workers_cache(tmp_path, monkeypatch):
    """A worker that cannot see the client's path boots a copy of the shipped
    bytes, kept in its cache under their digest; one that sees the same file
    uses it in place."""
    monkeypatch.setenv("KSMBENCH_CACHE", str(tmp_path / "worker-cache"))
    image = tmp_path / "client" / "bzImage"
    image.parent.mkdir()
    image.write_bytes(os.urandom(4096))
    shipped = ShippedImage.read(image)
    assert shipped.materialize() == str(image)              # same machine: no copy
    image.unlink()                                          # a worker elsewhere
    copy = Path(shipped.materialize())
    assert copy != image and copy.is_relative_to(tmp_path / "worker-cache")
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == shipped.sha256
    # the file on the worker differs from the shipped one: the shipped bytes win
    image.write_bytes(b"another kernel")
    assert Path(shipped.materialize()) == copy


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def _forget_observations(argv: list[str], variant: str) -> list[Path]:
    """Delete the variant's cached observations for this command's scenario
    set (its replay cache), so that the next run boots it."""
    from ksmbench.cli import build_parser
    from ksmbench.compare.builds import cache_dir
    from ksmbench.compare.identify import probe_scenarios
    from ksmbench.compare.validate import _suite_key
    from ksmbench.scenario import resolve_scenarios

    args = build_parser().parse_args(argv)
    scenarios = list(resolve_scenarios(args.scenarios))
    scenarios += [p for p in probe_scenarios() if p.name not in {s.name for s in scenarios}]
    key = _suite_key(scenarios, args)
    gone = list(cache_dir().glob(f"images/*/variants/{variant}-*/observations-{key}.jsonl"))
    for record in gone:
        record.unlink()
    return gone


@pytest.mark.vm
@pytest.mark.slow
def test_validate_on_a_dask_cluster_judges_as_the_sequential_path(tmp_path):
    """The m06 mutant booted by a dask worker (its cached observations
    forgotten first; the base is replayed from the cache, or booted on the
    cluster too on a machine's first run), judged as test_validate_vm judges
    it; then `--jobs 1` replays what the cluster run cached and writes the
    same tables."""
    _need_tools()
    patches = _patches(tmp_path)
    variant = "m06-general-profit-no-zero"
    # one scenario of this test's own (the replay cache is keyed by the set)
    common = ["validate", "debian-source:6.12", "--patches", str(patches), "--each",
              "cow-zero-pages"]
    _forget_observations([*common, "--out", str(tmp_path)], variant)
    started = time.time()
    with dask_cluster(tmp_path) as (address, _client, _names):
        status = main([*common, "--scheduler", address, "--out", str(tmp_path / "dask")])
    assert status == 1
    dask = _only_rundir(tmp_path / "dask")
    [row] = _rows(dask / "validate.csv")
    assert row["variant"] == variant and row["verdict"] == "changed"
    assert int(row["unexplained"]) > 0 and int(row["cells_compared"]) > 100
    cells = _rows(dask / "validate-cells.csv")
    assert cells and {c["metric"] for c in cells} == {"global.general_profit"}
    meta = json.loads((dask / "metadata.json").read_text())
    assert meta["matrix"]["scheduler"] == address and meta["matrix"]["workers"] == 2
    kernels = {k["kernel"]: k for k in meta["kernels"]}
    assert list(kernels) == ["base", variant]
    timings = {t["kernel"]: t for t in _rows(dask / "validate-timings.csv")}
    assert timings[variant]["observations"] == "measured"
    booted = [k for k, t in timings.items() if t["observations"] == "measured"]
    for label in booted:
        (attempt,) = kernels[label]["attempts"]             # booted once, on a worker
        assert attempt["worker"].startswith("tcp://127.0.0.1:")
        assert sorted(attempt["committed"]) == sorted(meta["scenarios"])
        assert kernels[label]["kernel_release"].startswith("6.12.")
        t = timings[label]
        assert float(t["vm_seconds"]) > float(t["boot_seconds"]) > 0
        # its event stream came home and is its image's replay cache
        records = list(Path(t["image"]).parent.glob("observations-*.jsonl"))
        assert any(r.stat().st_mtime >= started for r in records), records
    rows = (dask / "observations.csv").read_text().splitlines()
    assert len(rows) == len(set(rows)) > 500                # none twice
    assert {ln.split(",")[1] for ln in rows[1:]} == {"base", variant}

    # the sequential path replays those observations: the same judged tables
    status = main([*common, "--jobs", "1", "--out", str(tmp_path / "local")])
    assert status == 1
    local = _only_rundir(tmp_path / "local")
    for name in ("validate.csv", "validate-cells.csv", "observations.csv", "expectations.csv"):
        assert (dask / name).read_text() == (local / name).read_text(), name
    assert [t["observations"] for t in _rows(local / "validate-timings.csv")] == ["cached"] * 2
    local_meta = json.loads((local / "metadata.json").read_text())
    for key in ("base_profile", "expected_profile", "results"):
        assert local_meta["validate"][key] == meta["validate"][key], key
    assert not _qemu_children_of_test(dask.name) and not _qemu_children_of_test(local.name)
