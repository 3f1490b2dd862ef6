"""Bench as a library: the command line becomes one BenchConfig, the guest
gets the same configuration as JSON (no argument list rebuilt by hand), and
bench.json reads back into typed results exactly as it was written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ksmbench.bench.cli import build_parser, config_from_args
from ksmbench.bench.config import PARTS, BenchConfig
from ksmbench.bench.guest import guest_argv
from ksmbench.bench.outcome import HEADLINES, CrosscheckNotDone, CrosscheckResult, KernelBench
from ksmbench.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_BENCH = ROOT / "results" / "reference" / "20261129-032147-c8d9"

#: every option of `ksmbench bench` with a value unlike its default, and the
#: config field it must land in
NON_DEFAULT = {
    "--kernel": ("debian:6.12", "kernels", ("debian:6.12",)),
    "--out": ("elsewhere", "out", "elsewhere"),
    "--sizes": ("2,8", "sizes_mib", (2, 8)),
    "--repeats": ("7", "repeats", 7),
    "--only": ("savings", "parts", ("savings",)),
    "--pages-to-scan": ("321", "pages_to_scan", 321),
    "--savings-procs": ("3", "savings_procs", 3),
    "--savings-mib": ("5", "savings_mib", 5),
    "--savings-repeats": ("2", "savings_repeats", 2),
    "--crosscheck-mib": ("12", "crosscheck_mib", 12),
    "--crosscheck-pairs": ("9", "crosscheck_pairs", 9),
    "--tolerance": ("0.1", "tolerance", 0.1),
    "--ksm-tests": ("/bin/ksm_tests", "ksm_tests", "/bin/ksm_tests"),
    "--source-series": ("6.1", "source_series", "6.1"),
    "--wait": ("30", "wait", 30.0),
    "--memory": ("1G", "memory", "1G"),
    "--cpus": ("1", "cpus", 1),
    "--accel": ("tcg", "accel", "tcg"),
    "--modules": ("/lib/modules/x", "modules", "/lib/modules/x"),
    "--guest-repeats": ("2", "guest_repeats", 2),
    "--guest-timeout": ("99", "guest_timeout", 99.0),
}


def test_every_option_lands_in_the_config():
    """The parser and the config cannot drift: an option without a field
    (or a field the option does not set) fails here."""
    parser = build_parser()
    options = {a.option_strings[0] for a in parser._actions
               if a.option_strings and a.dest not in ("help", "config")}
    assert options == set(NON_DEFAULT), "add the option to NON_DEFAULT and to config_from_args"
    argv = [x for opt, (value, _, _) in NON_DEFAULT.items() for x in (opt, value)]
    config = config_from_args(parser.parse_args(argv))
    default = BenchConfig()
    for opt, (_, name, want) in NON_DEFAULT.items():
        assert getattr(config, name) == want != getattr(default, name), opt
    assert config_from_args(parser.parse_args([])) == default


def test_the_guest_gets_the_config_as_json(tmp_path):
    config = config_from_args(build_parser().parse_args(
        ["--kernel", "debian:6.1", "--repeats", "4", "--guest-repeats", "2", "--savings-repeats", "3"]))
    guest = config.for_guest("debian:6.1", str(tmp_path), "/x/ksm_tests")
    # what the hand-built argv used to say: smaller defaults in a VM, the guest's repeats
    assert (guest.kernels, guest.in_guest, guest.label, guest.run_id) == (("host",), True, "debian:6.1", "guest")
    assert guest.sizes_mib == (4, 16) and guest.repeats == 2 and guest.savings_repeats == 2
    assert (guest.savings_mib, guest.crosscheck_mib, guest.crosscheck_pairs) == (8, 32, 5)
    assert guest.wait == 60 and guest.ksm_tests == "/x/ksm_tests" and guest.out == str(tmp_path)
    assert BenchConfig.from_json(guest.to_json()) == guest
    path = tmp_path / "config.json"
    path.write_text(guest.to_json())
    argv = guest_argv(path)
    assert argv[-2:] == ["--config", str(path)]
    assert config_from_args(build_parser().parse_args(argv[argv.index("bench") + 1:])) == guest


def test_a_config_refuses_what_cannot_run():
    with pytest.raises(UsageError):
        BenchConfig(repeats=0)
    with pytest.raises(UsageError):
        BenchConfig(parts=("timings", "speed"))
    with pytest.raises(UsageError):
        BenchConfig.from_json(json.dumps({"repeats": 2, "colour": "red"}))
    assert BenchConfig().parts == PARTS


def test_the_reference_bench_json_reads_back_typed_and_unchanged():
    doc = json.loads((REFERENCE_BENCH / "bench.json").read_text())
    for kernel, body in doc["kernels"].items():
        result = KernelBench.from_dict(body)
        assert isinstance(result.crosscheck, CrosscheckResult)
        assert result.to_dict() == body, kernel
    judged = {k: KernelBench.from_dict(b).crosscheck.is_judged for k, b in doc["kernels"].items()}
    assert judged == {"host": True, "debian:6.1": False, "debian:6.12": False}  # TCG guests


def test_a_crosscheck_not_done_round_trips():
    for body in ({"error": "no ksm_tests", "size_mib": 100, "error_kind": "KernelNotFound"},
                 {"error": "no successful ksm_tests runs: x", "size_mib": 32,
                  "failures": [{"case": "ksm_tests", "repeat": 0, "error": "x", "loadavg": 1.5}]}):
        result = KernelBench.from_dict({"summaries": [], "crosscheck": body})
        assert isinstance(result.crosscheck, CrosscheckNotDone)
        assert result.to_dict()["crosscheck"] == body


def test_headlines_name_real_metrics_once():
    pairs = [(h.benchmark, h.metric) for h in HEADLINES]
    assert len(pairs) == len(set(pairs))
    doc = json.loads((REFERENCE_BENCH / "bench.json").read_text())
    measured = {(s["benchmark"], s["metric"]) for s in doc["kernels"]["host"]["summaries"]}
    assert set(pairs) <= measured
