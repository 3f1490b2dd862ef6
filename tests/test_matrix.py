"""Many kernels at once (ksmbench/matrix.py): the default of --jobs, the
LocalCluster and a real Dask cluster (a `dask scheduler` and two `dask
worker` processes on 127.0.0.1), a worker killed mid-task, an unreachable
scheduler, and a worker without QEMU.

The kernels are mostly the emulator backend (`--kernel emulator:<profile>`):
it runs the same Runner as a real kernel, in a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ksmbench.cli import main
from ksmbench.matrix import default_jobs, parse_memory, sequential_order

BIN = Path(sys.executable).parent
GiB = 1 << 30


# -- the default of --jobs -------------------------------------------------------------

def test_default_jobs_is_cores_bounded_by_memory():
    # this machine's shape: 2 cores, plenty of memory for 2G guests
    assert default_jobs("2G", cores=2, available=20 * GiB).jobs == 2
    # many cores, little memory: 0.8 * 6 GiB holds one guest of 2G + 512 MiB... plus change
    d = default_jobs("2G", cores=16, available=6 * GiB)
    assert (d.jobs, d.by_memory) == (1, 1)
    assert default_jobs("1G", cores=16, available=6 * GiB).jobs == 3
    # never 0, even without the memory for one guest
    assert default_jobs("8G", cores=4, available=1 * GiB).jobs == 1
    assert "cores" in d.explanation and "GiB available" in d.explanation


def test_parse_memory_reads_qemu_sizes():
    assert parse_memory("2G") == 2 * GiB
    assert parse_memory("1536M") == 1536 << 20
    assert parse_memory("1024") == GiB          # QEMU: no suffix is MiB
    assert parse_memory("2GiB") == 2 * GiB


def test_sequential_order_rewrites_tables_in_run_order(tmp_path):
    (tmp_path / "observations.csv").write_text(
        "scenario,kernel,step\nb,k2,0\nb,k2,1\na,k2,0\nb,k1,0\na,k1,0\na,k1,1\n")
    sequential_order(tmp_path, ["k1", "k2"], ["a", "b"])
    assert (tmp_path / "observations.csv").read_text().splitlines() == [
        "scenario,kernel,step", "a,k1,0", "a,k1,1", "b,k1,0", "a,k2,0", "b,k2,0", "b,k2,1"]


# -- a real Dask cluster on 127.0.0.1 -----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@contextmanager
def dask_cluster(tmp_path: Path, workers: int = 2, worker_env: dict | None = None):
    """A `dask scheduler` and `workers` `dask worker` processes (no nanny, one
    thread each), each in its own process group; all killed at the end."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []
    names: dict[str, subprocess.Popen] = {}
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"),
            start_new_session=True))
        for i in range(workers):
            env = {**os.environ, **(worker_env or {})}
            p = subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--name", f"w{i}", "--death-timeout", "60"],
                stdout=subprocess.DEVNULL, stderr=open(logs / f"w{i}.log", "w"), env=env,
                start_new_session=True)
            procs.append(p)
            names[f"w{i}"] = p
        deadline = time.monotonic() + 90
        client = None
        while client is None:
            try:
                client = Client(address, timeout="5s", set_as_default=False)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the dask scheduler did not listen on {address} in 90 s")
                time.sleep(0.5)
        try:
            client.wait_for_workers(workers, timeout=90)
        except TimeoutError:
            raise AssertionError(f"{workers} dask workers did not join {address} in 90 s") from None
        try:
            yield address, client, names
        finally:
            client.close(timeout=10)
    finally:
        for p in reversed(procs):
            _stop(p)
        assert all(p.poll() is not None for p in procs), "a dask process outlived the test"


def _tables(rundir: Path) -> tuple[str, str]:
    return ((rundir / "observations.csv").read_text(), (rundir / "expectations.csv").read_text())


def _only_rundir(out: Path) -> Path:
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


KERNELS = ["emulator:linux-6.6", "emulator:linux-6.18", "emulator:linux-6.12"]


@pytest.mark.slow
def test_cluster_run_has_the_content_of_a_local_run(tmp_path):
    args = [a for k in KERNELS for a in ("--kernel", k)]
    assert main(["run", *args, "--jobs", "1", "--out", str(tmp_path / "local")]) == 0
    local = _only_rundir(tmp_path / "local")
    with dask_cluster(tmp_path) as (address, _client, _names):
        assert main(["run", *args, "--scheduler", address, "--out", str(tmp_path / "dask")]) == 0
    remote = _only_rundir(tmp_path / "dask")
    assert _tables(remote) == _tables(local)
    rows = _tables(remote)[0].splitlines()
    assert len(rows) == len(set(rows)) > 1000          # no duplicated row
    meta = json.loads((remote / "metadata.json").read_text())
    assert [k["kernel"] for k in meta["kernels"]] == KERNELS
    assert meta["matrix"]["scheduler"] == address and meta["matrix"]["workers"] == 2
    for k in meta["kernels"]:
        (attempt,) = k["attempts"]                      # one attempt each, on a worker
        assert attempt["worker"].startswith("tcp://127.0.0.1:")
        assert len(attempt["committed"]) == len(meta["scenarios"])
        assert k["kernel_release"].endswith("-emulator")


@pytest.mark.slow
def test_local_cluster_jobs_2_has_the_content_of_jobs_1(tmp_path):
    args = [a for k in KERNELS[:2] for a in ("--kernel", k)]
    assert main(["run", *args, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    assert main(["run", *args, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = _only_rundir(tmp_path / "one"), _only_rundir(tmp_path / "two")
    assert _tables(two) == _tables(one)
    meta = json.loads((two / "metadata.json").read_text())
    assert meta["matrix"] == {"jobs": 2, "scheduler": "LocalCluster", "workers": 2}


def _slow_scenarios(directory: Path, count: int) -> list[str]:
    """Scenarios the emulator needs about a second each for (1 GiB, 8 scans; 7 contents x 147 KSM pages of max_page_sharing 256)."""
    paths = []
    for i in range(count):
        p = directory / f"slow-{i:02d}.toml"
        p.write_text(f'name = "slow-{i:02d}"\n'
                     '[[step]]\nop = "mmap"\nregion = "a"\npages = 262144\n'
                     f'[[step]]\nop = "fill"\nregion = "a"\npattern = "cycle:s{i}:7"\n'
                     '[[step]]\nop = "madvise"\nregion = "a"\nadvice = "mergeable"\n'
                     '[[step]]\nop = "scan"\ncount = 8\n'
                     '[[step]]\nop = "expect"\n"global.pages_shared" = 1029\n')
        paths.append(str(p))
    return paths


@pytest.mark.slow
def test_worker_killed_mid_task_reruns_its_kernel_elsewhere(tmp_path):
    scen = tmp_path / "scenarios"
    scen.mkdir()
    files = _slow_scenarios(scen, 14)
    kernel = ["--kernel", "emulator:linux-6.18"]
    assert main(["run", *files, *kernel, "--jobs", "1", "--out", str(tmp_path / "local")]) == 0
    local = _only_rundir(tmp_path / "local")
    out = tmp_path / "dask"
    with dask_cluster(tmp_path) as (address, client, names):
        run = subprocess.Popen([str(BIN / "ksmbench"), "run", *files, *kernel, "--scheduler",
                                address, "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        try:
            # wait until the task has committed a scenario, then kill its worker
            victim = None
            deadline = time.monotonic() + 120
            while victim is None:
                assert run.poll() is None, f"the run ended before a worker was killed: {run.stderr.read()}"
                assert time.monotonic() < deadline, "no scenario was committed in 120 s"
                for meta_path in out.glob("*/metadata.json"):
                    try:
                        meta = json.loads(meta_path.read_text())
                    except ValueError:
                        continue
                    for attempt in [a for k in meta["kernels"] for a in k.get("attempts", [])]:
                        if attempt.get("committed") and attempt.get("worker"):
                            victim = attempt
                time.sleep(0.1)
            assert len(victim["committed"]) < len(files), "the task finished before the kill"
            workers = client.scheduler_info()["workers"]
            name = workers[victim["worker"]]["name"]
            os.killpg(names[name].pid, signal.SIGKILL)
            names[name].wait(timeout=10)
            _, err = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(timeout=10)
        assert run.returncode == 0, err
    remote = _only_rundir(out)
    assert _tables(remote) == _tables(local)            # none missing, none twice
    meta = json.loads((remote / "metadata.json").read_text())
    attempts = meta["kernels"][0]["attempts"]
    assert len(attempts) == 2
    assert attempts[0]["worker"] == victim["worker"] != attempts[1]["worker"]
    committed = attempts[0]["committed"] + attempts[1]["committed"]
    assert sorted(committed) == sorted(meta["scenarios"]) and attempts[0]["committed"]


def test_unreachable_scheduler_is_one_line_and_no_run_directory(tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    status = main(["run", "--kernel", "emulator:linux-6.6", "--kernel", "emulator:linux-6.18",
                   "--scheduler", address, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and address in lines[0] and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def _path_without_qemu(tmp_path: Path) -> str:
    """A PATH with every program of this one except QEMU's."""
    shadow = tmp_path / "bin-without-qemu"
    shadow.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith("qemu") or (shadow / name).exists():
                continue
            (shadow / name).symlink_to(Path(d) / name)
    return str(shadow)


@pytest.mark.vm
@pytest.mark.slow
def test_worker_without_qemu_fails_that_kernel_only(tmp_path, capsys):
    """debian:6.1 (fetched into the cache if it is not there yet) on workers
    that have no QEMU: that kernel fails with the reason, the other finishes."""
    with dask_cluster(tmp_path, worker_env={"PATH": _path_without_qemu(tmp_path)}) as (address, _c, _n):
        status = main(["run", "zero-pages", "--kernel", "debian:6.1", "--kernel",
                       "emulator:linux-6.18", "--scheduler", address, "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert status == 2
    rundir = _only_rundir(tmp_path / "o")
    meta = json.loads((rundir / "metadata.json").read_text())
    by = {k["kernel"]: k for k in meta["kernels"]}
    assert "qemu-system-x86_64 is not installed" in by["debian:6.1"]["error"]
    assert "tcp://127.0.0.1:" in by["debian:6.1"]["error"]        # which worker
    assert by["emulator:linux-6.18"]["verdicts"] == {"zero-pages": "match"}
    assert "debian:6.1" in out and "qemu-system-x86_64 is not installed" in out


def _comparable(rundir: Path) -> list[list[str]]:
    """observations.csv without the values that differ from boot to boot:
    RssAnon where the emulator predicts nothing (the agent's interpreter; the
    per-cpu counters' lag before 82241a83cd15)."""
    import csv

    with open(rundir / "observations.csv", newline="") as f:
        rows = list(csv.reader(f))
    metric, observed, predicted = (rows[0].index(c) for c in ("metric", "observed", "predicted"))

    def varies(r):
        return r[metric].endswith(("rss_anon_pages", "rss_anon_scenario_pages")) and not r[predicted]

    return [[c if not (i == observed and varies(r)) else "*" for i, c in enumerate(r)]
            for r in rows]


@pytest.mark.vm
@pytest.mark.slow
def test_real_guest_on_the_cluster_matches_a_local_run(tmp_path):
    """debian:6.1 booted by a dask worker gives the rows a local run gives."""
    args = ["zero-pages", "fork-after-merge", "--kernel", "debian:6.1", "--kernel",
            "emulator:linux-6.1"]
    assert main(["run", *args, "--jobs", "1", "--out", str(tmp_path / "local")]) == 0
    with dask_cluster(tmp_path) as (address, _client, _names):
        assert main(["run", *args, "--scheduler", address, "--out", str(tmp_path / "dask")]) == 0
    local, remote = _only_rundir(tmp_path / "local"), _only_rundir(tmp_path / "dask")
    assert _comparable(remote) == _comparable(local)
    assert (remote / "expectations.csv").read_text() == (local / "expectations.csv").read_text()
    meta = json.loads((remote / "metadata.json").read_text())
    guest = meta["kernels"][0]
    assert guest["kernel"] == "debian:6.1" and guest["kernel_release"].startswith("6.1.")
    assert guest["artifacts"].endswith("debian_6.1")       # console log kept on the worker
    assert Path(guest["artifacts"].split(":", 1)[1], "console.log").is_file()


def test_jobs_below_one_is_refused(tmp_path, capsys):
    assert main(["run", "--kernel", "emulator:linux-6.6", "--jobs", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--jobs 0" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_identify_on_a_local_cluster_judges_each_kernel(tmp_path, capsys):
    assert main(["identify", "--kernel", "emulator:linux-6.6", "--kernel", "emulator:linux-6.12",
                 "--jobs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fitted profile: linux-6.6 (0)" in out
    meta = json.loads((_only_rundir(tmp_path) / "metadata.json").read_text())
    fitted = {k["kernel"]: k["identify"]["fitted_disagreeing_cells"] for k in meta["kernels"]}
    assert fitted == {"emulator:linux-6.6": 0, "emulator:linux-6.12": 0}
    assert meta["matrix"]["scheduler"] == "LocalCluster"


@pytest.mark.slow
def test_without_a_terminal_each_committed_scenario_is_a_line(tmp_path, capsys):
    """A CI log gets no live bar: the matrix prints a line per attempt, per
    committed scenario and per kernel ending."""
    assert main(["run", "--kernel", "emulator:linux-6.6", "--kernel", "emulator:linux-6.12",
                 "--jobs", "2", "--out", str(tmp_path), "zero-pages"]) == 0
    out = capsys.readouterr().out
    for kernel in ("emulator:linux-6.6", "emulator:linux-6.12"):
        assert f"{kernel}: zero-pages: match (1 of 1 scenarios)" in out
        assert f"{kernel}: done (1 of 1 scenarios)" in out
