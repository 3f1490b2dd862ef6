"""ksmbench validate on Dask (ksmbench/compare/validate.py's _OnCluster on
ksmbench/matrix.py's MatrixSession): a variant of Debian's linux-source-6.12
booted by real `dask worker` processes on 127.0.0.1, one of them killed
mid-task; an unreachable scheduler; and a built image shipped to a worker
that does not see the client's files.

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
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ksmbench.cli import main
from ksmbench.matrix import ShippedImage
from test_matrix import BIN, _free_port, _only_rundir, dask_cluster
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


def _kill_a_worker_after_its_first_commit(run: subprocess.Popen, out: Path, client, names) -> dict:
    """Wait until a kernel's attempt has committed a scenario, then SIGKILL
    the dask worker running it (its guest dies with it). Returns the attempt."""
    deadline = time.monotonic() + 400
    while True:
        assert run.poll() is None, f"validate ended before a worker was killed: {run.stderr.read()}"
        assert time.monotonic() < deadline, "no scenario was committed in 400 s"
        for meta_path in out.glob("*/metadata.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                continue
            for kernel in meta["kernels"]:
                for attempt in kernel.get("attempts", []):
                    if attempt.get("committed") and attempt.get("worker"):
                        name = client.scheduler_info()["workers"][attempt["worker"]]["name"]
                        os.killpg(names[name].pid, signal.SIGKILL)
                        names[name].wait(timeout=10)
                        return {**attempt, "kernel": kernel["kernel"]}
        time.sleep(0.1)


def _without_rss(path: Path) -> list[str]:
    """observations.csv without the RssAnon cells, which differ from boot to
    boot (the agent's interpreter; per-cpu counter lag before 82241a83cd15)."""
    return [ln for ln in path.read_text().splitlines() if "rss_anon" not in ln]


@pytest.mark.vm
@pytest.mark.slow
def test_validate_on_a_dask_cluster_survives_a_killed_worker_and_judges_as_sequential(tmp_path):
    """The m06 mutant booted by a dask worker (its cached observations
    forgotten first; the base is replayed from the cache, or booted on the
    cluster too on a machine's first run). The worker is SIGKILLed after the
    kernel's first scenario is committed: the kernel boots again on the other
    worker, every scenario is committed once, and m06 is judged as
    test_validate_vm judges it. Then `--jobs 1` replays what the cluster run
    cached and writes the same judged tables."""
    _need_tools()
    patches = _patches(tmp_path)
    variant = "m06-general-profit-no-zero"
    # one scenario of this test's own (the replay cache is keyed by the set)
    common = ["validate", "debian-source:6.12", "--patches", str(patches), "--each",
              "cow-zero-pages"]
    _forget_observations([*common, "--out", str(tmp_path)], variant)
    started = time.time()
    out = tmp_path / "dask"
    with dask_cluster(tmp_path) as (address, client, names):
        run = subprocess.Popen([str(BIN / "ksmbench"), *common, "--scheduler", address,
                                "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        try:
            victim = _kill_a_worker_after_its_first_commit(run, out, client, names)
            _, err = run.communicate(timeout=500)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(timeout=10)
    assert run.returncode == 1, err
    dask = _only_rundir(out)
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
    assert victim["kernel"] in booted
    for label in booted:
        attempts = kernels[label]["attempts"]
        assert all(a["worker"].startswith("tcp://127.0.0.1:") for a in attempts)
        committed = [name for a in attempts for name in a["committed"]]
        assert sorted(committed) == sorted(meta["scenarios"])      # each once
        assert kernels[label]["kernel_release"].startswith("6.12.")
        t = timings[label]
        assert float(t["vm_seconds"]) > float(t["boot_seconds"]) > 0
        # its event stream came home and is its image's replay cache
        records = list(Path(t["image"]).parent.glob("observations-*.jsonl"))
        assert any(r.stat().st_mtime >= started for r in records), records
    first, second = kernels[victim["kernel"]]["attempts"]
    assert first["worker"] == victim["worker"] != second["worker"] and first["committed"]
    rows = (dask / "observations.csv").read_text().splitlines()
    assert len(rows) == len(set(rows)) > 500                # none twice
    assert {ln.split(",")[1] for ln in rows[1:]} == {"base", variant}

    # the sequential path replays the cached observations (the victim's from
    # its second attempt): the same judged tables
    assert main([*common, "--jobs", "1", "--out", str(tmp_path / "local")]) == 1
    local = _only_rundir(tmp_path / "local")
    for name in ("validate.csv", "validate-cells.csv", "expectations.csv"):
        assert (dask / name).read_text() == (local / name).read_text(), name
    assert _without_rss(dask / "observations.csv") == _without_rss(local / "observations.csv")
    assert [t["observations"] for t in _rows(local / "validate-timings.csv")] == ["cached"] * 2
    local_meta = json.loads((local / "metadata.json").read_text())
    for key in ("base_profile", "expected_profile", "results"):
        assert local_meta["validate"][key] == meta["validate"][key], key
    assert not _qemu_children_of_test(dask.name) and not _qemu_children_of_test(local.name)
