"""What a new user meets first: help that speaks to users, output that
survives a pipe, user text that is printed as it is (never read as console
markup), refusals that come before anything starts, and the smaller rough
edges (scenarios in directories, every bad file reported, emulate's profile
and expect steps, pre-6.1 profiles, identify without root, plurals)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import merging_scenario
from ksmbench import cli
from ksmbench.scenario import model as m

KSMBENCH = [sys.executable, "-m", "ksmbench.cli"]
SUITE = Path(cli.__file__).parent / "scenario" / "suite"
MARKUP_LIKE = ["[/x]", "[bold]", "/path/to/[bzImage]", "[red]boom[/red]"]


def ksmbench(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.run([*KSMBENCH, *args], capture_output=True, text=True, env=env, **kw)


# -- help ---------------------------------------------------------------------------

def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's own parser: the built-in ones and the delegated ones."""
    import importlib

    main = cli.build_parser()
    sub = next(a for a in main._actions if isinstance(a, argparse._SubParsersAction))
    out = {"ksmbench": main}
    for name, parser in sub.choices.items():
        if name in cli.DELEGATED:
            module = importlib.import_module(cli.DELEGATED[name])
            build = getattr(module, "build_parser", None) or getattr(module.cli, "build_parser")
            parser = build()
        out[name] = parser
    return out


def _module_docstrings() -> set[str]:
    import importlib

    docs = set()
    for name in ["ksmbench.cli", *cli.DELEGATED.values(), "ksmbench.bench.cli",
                 "ksmbench.report.cli", "ksmbench.selftests.cli", "ksmbench.emulator.cli",
                 "ksmbench.compare.identify", "ksmbench.backends.vm.catalogue"]:
        doc = importlib.import_module(name).__doc__ or ""
        docs.update(line.strip() for line in doc.splitlines() if line.strip())
    return docs


def test_every_command_has_a_user_description_and_every_argument_help():
    docs = _module_docstrings()
    parsers = _parsers()
    assert set(parsers) >= {"ksmbench", "run", "emulate", "identify", "kernels", "scenarios",
                            "bench", "report", "selftest"}
    for name, parser in parsers.items():
        text = (parser.description or "").strip()
        assert len(text) > 40, f"{name}: no real description"
        first = text.splitlines()[0].strip()
        assert not first.startswith(("``", "`", ":", "..", "*", "#", "[", "=")), \
            f"{name}: the description starts with markup: {first!r}"
        assert "``" not in text and ":mod:" not in text and ":func:" not in text, name
        assert first not in docs, f"{name}: the description is a module docstring line: {first!r}"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name}: argument {action.dest} has no help"


def test_help_states_the_exit_codes():
    top = ksmbench("--help")
    assert top.returncode == 0
    assert "exit status:" in top.stdout
    for code in ("0  ", "1  ", "2  "):
        assert code in top.stdout.split("exit status:")[1]
    assert "Command line: argument parsing" not in top.stdout
    for command in ("run", "emulate", "identify", "scenarios", "report", "bench", "selftest"):
        out = ksmbench(command, "--help")
        assert out.returncode == 0, (command, out.stderr)
        assert "exit status" in out.stdout, command
        assert "``" not in out.stdout, command


# -- piped output -------------------------------------------------------------------------

def test_piped_tables_are_neither_cut_nor_wrapped(tmp_path):
    # stdout is a pipe here; a narrow COLUMNS must not cut it either
    out = ksmbench("scenarios", env={"COLUMNS": "40"})
    assert out.returncode == 0
    from ksmbench.scenario import builtin_suite

    lines = out.stdout.splitlines()
    for s in builtin_suite():
        first = s.description.splitlines()[0]
        assert f"{s.name}: {first}" in lines  # one whole line each: grep finds it
    flags = subprocess.run([sys.executable, "-m", "ksmbench.emulator"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "COLUMNS": "40"})
    assert "…" not in flags.stdout
    assert "79271476b336+e2942062e01d+6080d19f0704+1a8e84305783, 6.6" in flags.stdout
    assert "kpf_ksm_all_anon" in flags.stdout


def test_pipe_console_is_unbounded_and_terminal_console_is_not():
    import io

    from rich.table import Table

    from ksmbench.console import PIPE_WIDTH, make_console

    console = make_console()  # pytest captures stdout: not a terminal
    assert console.width == PIPE_WIDTH
    long_name = "linux-image-6.12.117+deb13-amd64-unsigned-" + "x" * 200
    table = Table()
    for col in ("kernel", "package-with-a-long-header", "version"):
        table.add_column(col)
    table.add_row("debian:6.12", long_name, "6.12.117-1")
    console.file = io.StringIO()
    console.print(table)
    text = console.file.getvalue()
    assert long_name in text and "package-with-a-long-header" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) < len(long_name) + 60  # natural width


# -- markup-like user text ------------------------------------------------------------------

@pytest.mark.parametrize("label", MARKUP_LIKE)
def test_markup_like_kernel_labels_print_as_they_are(tmp_path, capsys, label):
    """The runner, its progress display and the summary print a kernel label
    and error text that look like console markup, literally."""
    from ksmbench.emulator import Predictor
    from ksmbench.emulator.backend import EmulatorBackend
    from ksmbench.progress import run_kernel_with_progress
    from ksmbench.results import RunDir
    from ksmbench.scenario import builtin

    console = cli._console()
    scenarios = [builtin("zero-pages"), builtin("dup-at-max")]
    backend = EmulatorBackend("linux-6.18", label=label)
    rundir = RunDir(tmp_path)
    outcome = run_kernel_with_progress(console, rundir, backend, scenarios, Predictor(), "linux-6.6")
    rundir.close()
    outcome.scenarios["dup-at-max"].error = f"failed at {label}"
    cli._print_summary(console, [outcome, outcome], scenarios)
    out = capsys.readouterr().out
    assert label in out
    assert f"failed at {label}" in out
    assert f"[{label}]" in out  # the "[kernel]" after a scenario name


def test_selftest_disagreements_with_a_path_kernel_print(capsys):
    """The crash of the issue: a bzImage path kernel in the disagreement list."""
    from ksmbench.selftests.catalogue import PEERS
    from ksmbench.selftests.cli import KernelReport, print_disagreements, print_kernel
    from ksmbench.selftests.compare import PeerRow, SelftestVerdict

    console = cli._console()
    label = "/path/to/[bzImage]"
    peer = next(p for p in PEERS if p.scenario)
    row = PeerRow(peer, label, SelftestVerdict("pass", "ok [/x] detail"), "fail",
                  ours_detail="[bold] observed 3")
    report = KernelReport(label, label, rows=[row], scenario_error="boom [/red]")
    print_kernel(console, report)
    print_disagreements(console, [report])
    out = capsys.readouterr().out
    assert f"[{label}]" in out and "ok [/x] detail" in out and "[bold] observed 3" in out
    assert "boom [/red]" in out


@pytest.mark.parametrize("name", ["k/[bzImage]", "k[/bzImage]"])
def test_a_markup_like_kernel_path_goes_through_run(tmp_path, name):
    """``run --kernel /path/to/[bzImage]``: the label reaches the progress
    display, the kernel's error line and the summary tables, printed as given
    (``.../k[/bzImage]`` holds a closing tag, as in the crash of the issue)."""
    image = tmp_path / name
    image.parent.mkdir()
    image.write_bytes(b"not a kernel image" * 64)
    res = ksmbench("run", "--kernel", str(image), "--kernel", "emulator:linux-6.6", "zero-pages",
                   "--out", str(tmp_path / "out"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "MarkupError" not in res.stderr
    assert f"{image}: --kernel {image}: not an x86 boot image" in res.stdout
    matrix = [line for line in res.stdout.splitlines() if "zero-pages" in line and "│" in line]
    assert any(str(image) in line for line in res.stdout.splitlines() if "┃" in line)  # header
    assert any("match" in line for line in matrix)  # the emulator kernel still ran


def test_scenario_files_in_markup_like_directories(tmp_path):
    d = tmp_path / "[bold]" / "[/x]"
    d.mkdir(parents=True)
    shutil.copy(SUITE / "zero-pages.toml", d / "a.toml")
    out = ksmbench("scenarios", str(d / "a.toml"))
    assert out.returncode == 0, out.stderr
    assert f"{d / 'a.toml'}: ok (zero-pages: 5 steps, 3 scans)" in out.stdout
    emu = ksmbench("emulate", str(d / "a.toml"), "--profile", "linux-6.6")
    assert emu.returncode == 0, emu.stderr
    assert "Traceback" not in emu.stderr


# -- refused up front --------------------------------------------------------------------------

@pytest.mark.slow
def test_unknown_debian_series_is_refused_before_anything_starts(tmp_path):
    """Every command taking --kernel: one line naming the series there are, no
    run directory, no progress, no table."""
    from ksmbench.sources.debian import DebianArchive

    try:
        available = list(DebianArchive().kernel_series())
    except Exception as exc:  # noqa: BLE001 - no archive: nothing to compare with
        pytest.skip(f"Debian archive not reachable here: {exc}")
    assert available
    listing = ksmbench("kernels", env={"COLUMNS": "40"})  # piped: nothing cut
    assert listing.returncode == 0, listing.stderr
    assert "…" not in listing.stdout
    for series, pkg in DebianArchive().kernel_series().items():
        line = next(line for line in listing.stdout.splitlines() if f"debian:{series} " in line)
        assert pkg.name in line and pkg.version in line and pkg.suite in line
    for command in ("run", "identify", "selftest", "bench"):
        out = tmp_path / command
        res = ksmbench(command, "--kernel", "debian:9.9", "--out", str(out))
        assert res.returncode == 2, (command, res.stdout, res.stderr)
        errors = [line for line in res.stderr.splitlines() if line.startswith("ksmbench: error:")]
        assert len(errors) == 1, (command, res.stderr)
        assert "debian:9.9" in errors[0]
        assert all(f"debian:{series}" in errors[0] for series in available), errors[0]
        assert res.stdout == "", (command, res.stdout)
        assert not out.exists(), command


def test_profiles_before_6_1_are_refused_in_one_line():
    res = ksmbench("emulate", "zero-pages", "--profile", "linux-5.4")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "before 6.1" in lines[0] and "linux-5.4" in lines[0]
    from ksmbench.emulator.profiles import profile_for_release

    assert profile_for_release("5.15.0-91-generic") is None  # run only observes there
    assert profile_for_release("6.1.0-28-amd64") == "linux-6.1"


def test_identify_without_root_says_what_run_says(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to drop to an unprivileged user) and setpriv")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    tmp_path.chmod(0o777)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    results = {}
    for command in ("run", "identify"):
        results[command] = subprocess.run(
            [*nobody, *KSMBENCH, command, "--out", str(tmp_path / command)], capture_output=True,
            text=True, timeout=300, env=env, cwd=tmp_path)
    for command, res in results.items():
        assert res.returncode == 2, (command, res.stderr)
        assert "needs root" in res.stderr and "VM kernel" in res.stderr, (command, res.stderr)
        assert "permission denied" not in res.stderr.lower(), (command, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (command, res.stderr)
    assert results["run"].stderr == results["identify"].stderr


# -- scenarios ----------------------------------------------------------------------------------

def test_scenarios_accepts_a_directory_and_reports_every_bad_file(tmp_path):
    good = tmp_path / "dir"
    good.mkdir()
    for name in ("zero-pages", "dup-at-max"):
        shutil.copy(SUITE / f"{name}.toml", good / f"{name}.toml")
    res = ksmbench("scenarios", str(good))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(": ok (") == 2

    a, c = tmp_path / "a.toml", tmp_path / "c.toml"
    shutil.copy(SUITE / "zero-pages.toml", a)
    shutil.copy(SUITE / "dup-at-max.toml", c)
    bad1 = tmp_path / "bad.toml"
    bad1.write_text('name = "bad"\n')
    bad2 = tmp_path / "bad2.toml"
    bad2.write_text((SUITE / "zero-pages.toml").read_text().replace('op = "scan"', 'op = "scna"'))
    res = ksmbench("scenarios", str(a), str(bad1), str(c), str(bad2), str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert f"{a}: ok (" in res.stdout and f"{c}: ok (" in res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("ksmbench: error:")]
    assert len(errors) == 3
    assert str(bad1) in errors[0] and str(bad2) in errors[1] and "nope.toml" in errors[2]
    assert "3 scenario files invalid, 2 valid" in res.stderr


def test_one_scenario_is_singular():
    from ksmbench.cli import _count

    assert _count(1, "scenario") == "1 scenario" and _count(2, "scenario") == "2 scenarios"
    res = ksmbench("scenarios", "dup-at-max")
    assert "1 steps" not in res.stdout and "1 scans" not in res.stdout


# -- emulate --------------------------------------------------------------------------------------

EXPECTS = merging_scenario("expects-zero-pages", 64, "zero", scans=2, use_zero_pages=True, then=(
    m.Expect(0, m.MAIN, (("global.ksm_zero_pages", 64), ("region.main.a.zero_pfn", 64))),))


def test_emulate_judges_expect_steps(tmp_path):
    path = tmp_path / "expects.toml"
    path.write_text(EXPECTS)
    # 6.6 counts KSM zero pages: both hold
    ok = ksmbench("emulate", str(path), "--profile", "linux-6.6")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.count("holds") == 2 and "does not hold" not in ok.stderr
    # 6.1 has no ksm_zero_pages counter: that expect fails, the other holds; csv stays clean
    bad = ksmbench("emulate", str(path), "--profile", "linux-6.1", "--format", "csv")
    assert bad.returncode == 1, bad.stderr
    assert "global.ksm_zero_pages = 64: does not hold (predicted absent)" in bad.stderr
    assert "region.main.a.zero_pfn = 64: holds" in bad.stderr
    assert bad.stdout.splitlines()[0].startswith("scenario,kernel,step")
    assert "holds" not in bad.stdout


def test_emulate_profile_auto_is_this_kernels_profile():
    from ksmbench.emulator.profiles import get_profile, profile_for_release, resolve_profile
    from ksmbench.kernel.features import kernel_release

    release = kernel_release()
    expected = profile_for_release(release)
    if expected is None:
        pytest.skip(f"no profile describes this kernel ({release})")
    assert resolve_profile("auto").name == expected
    # the kpageflags bug (dee3d0bef2b0) is fixed in 6.18.36 (stable) and in 7.2
    assert "kpf_ksm_all_anon" not in resolve_profile("auto", "6.18.44-fc-v657").flags
    assert "kpf_ksm_all_anon" in resolve_profile("auto", "6.18.20").flags
    assert "kpf_ksm_all_anon" in get_profile("linux-6.18").flags
    assert "kpf_ksm_all_anon" not in resolve_profile("auto", "7.2.1").flags

    res = ksmbench("emulate", "mixed-region", "--format", "csv")  # default: --profile auto
    assert res.returncode == 0, res.stderr
    rows = res.stdout.splitlines()
    assert all(f",emulator:{expected}," in row for row in rows[1:])
    fills = [r.split(",") for r in rows[1:] if ",fill," in r and ",region.main.a.ksm," in r]
    assert fills
    has_bug = "kpf_ksm_all_anon" in get_profile(expected).flags
    for row in fills:  # plain fills: no page is KSM, unless the kernel has the kpageflags bug
        assert (int(row[7]) > 0) == has_bug, row
    with pytest.raises(Exception, match="no profile describes"):
        resolve_profile("auto", "5.10.0-30-amd64")
