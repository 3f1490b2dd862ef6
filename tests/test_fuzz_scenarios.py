"""Malformed scenario files, fuzzed (hypothesis): every input is either a valid Scenario or
exactly one ScenarioError line, never another exception; the CLI prints that one line and
exits 2, without a traceback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ksmbench import cli
from ksmbench.errors import ScenarioError
from ksmbench.scenario import Scenario, parse_scenario
from ksmbench.scenario.loader import scenario_from_dict
from ksmbench.scenario.model import ADVICES, OPS

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def outcome(parse, *args, **kwargs):
    """Scenario, or the ScenarioError's one line; anything else propagates (a bug)."""
    try:
        result = parse(*args, **kwargs)
    except ScenarioError as exc:
        line = exc.one_line()
        assert line and "\n" not in line and "\r" not in line, repr(line)
        assert "Traceback" not in line
        return line
    assert isinstance(result, Scenario)
    assert result.steps, "a valid scenario has at least one step"
    return result


# -- raw text ----------------------------------------------------------------------------

TOKENS = st.sampled_from(list('[]{}="\'.,#\n \t-_0123456789abcdeimnoprstuxyz')
                        + ["step", "op", "name", "mmap", "fill", "scan", "region", "pages",
                           "pattern", "true", "[[step]]\n", "zero", "tag:", "range", "proc",
                           "\\u0000", "1e9", 'op = "', 'name = "x"\n'])
#: text made of TOML-ish tokens: more of it gets past the TOML parser into validation
TOMLISH = st.lists(TOKENS, max_size=120).map("".join)


@FUZZ
@given(st.one_of(st.text(max_size=400), TOMLISH))
@example("")
@example("[[step]]\n")
@example('name = "x"\n[[step]]\nop = "scan"\ncount = 1\n')
@example('name = "x"\nstep = 3\n')
@example('name = "x"\n[ksm]\nmax_page_sharing = 1\n[[step]]\nop = "scan"\ncount = 1\n')
@example('name = "\\u0000"\n[[step]]\nop = "scan"\ncount = 1\n')
def test_any_text_is_a_scenario_or_one_error_line(text):
    outcome(parse_scenario, text, source="fuzz.toml")


# -- structured: near-valid scenarios with wrong shapes, types, values ------------------------

SCALARS = st.one_of(st.none(), st.booleans(),
                    st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), st.sampled_from(["a", "b", "main", "child", "zero",
                                                           "unique", "tag:x", "cycle:c:3",
                                                           "cycle:c:0", "tag:", "none"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
FIELDS = ["op", "proc", "region", "pages", "thp", "range", "pattern", "advice", "merge", "count",
          "child", "values", "global.pages_shared", "region.main.a.zero_pfn", "junk"]


def _step():
    good = st.fixed_dictionaries({"op": st.sampled_from([*OPS, "exit", "frobnicate", 3])}, optional={
        "region": st.sampled_from(["a", "b", "a b", ""]),
        "pages": st.one_of(st.integers(-3, 600), SCALARS),
        "range": st.one_of(st.lists(st.integers(-5, 600), max_size=3), SCALARS),
        "pattern": st.one_of(st.sampled_from(["zero", "unique", "tag:t", "cycle:c:4", "cycle:c:-1",
                                              "tag:", "ones"]), SCALARS),
        "advice": st.one_of(st.sampled_from([*ADVICES, "hugepage"]), SCALARS),
        "count": st.one_of(st.integers(-2, 5), SCALARS),
        "merge": st.one_of(st.booleans(), SCALARS),
        "child": st.sampled_from(["child", "main", "c-2", "bad name"]),
        "proc": st.sampled_from(["main", "child", "ghost", "x y"]),
        "thp": st.one_of(st.booleans(), SCALARS),
    })
    wild = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5)
    return st.one_of(good, wild)


SCENARIOS = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["ok-name", "Bad Name", ""]), SCALARS),
    "description": st.one_of(st.text(max_size=30), SCALARS),
    "ksm": st.one_of(st.fixed_dictionaries({}, optional={
        "use_zero_pages": st.one_of(st.booleans(), SCALARS),
        "max_page_sharing": st.one_of(st.integers(-1, 300), SCALARS),
        "smart_scan": st.one_of(st.booleans(), SCALARS),
        "nonsense": SCALARS}), SCALARS),
    "step": st.one_of(st.lists(_step(), max_size=8), SCALARS),
    "extra": SCALARS,
})


@FUZZ
@given(SCENARIOS)
def test_any_structure_is_a_scenario_or_one_error_line(data):
    outcome(scenario_from_dict, data, source="fuzz.toml")


def to_toml(data: dict) -> str | None:
    """Inline-table TOML for a generated structure (None where TOML cannot say it: null)."""

    def value(v):
        if v is None:
            raise ValueError("null")
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v) if -2**63 <= v < 2**63 else json.dumps(str(v))
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else "nan"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise ValueError(type(v))

    try:
        return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in data.items())
    except ValueError:
        return None


@FUZZ
@given(SCENARIOS)
def test_the_same_structures_as_toml_text(data):
    text = to_toml(data)
    if text is not None:
        outcome(parse_scenario, text, source="fuzz.toml")


def test_a_valid_generated_scenario_is_accepted():
    text = to_toml({"name": "ok-name", "step": [{"op": "mmap", "region": "a", "pages": 4},
                                                {"op": "fill", "region": "a", "pattern": "zero"},
                                                {"op": "scan", "count": 1}]})
    assert isinstance(outcome(parse_scenario, text), Scenario)


# -- the CLI: one line, exit 2, no traceback ----------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(TOMLISH, SCENARIOS.map(to_toml).filter(lambda t: t is not None),
                 st.binary(max_size=60)))
def test_cli_validating_a_fuzzed_file_prints_one_line(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        import contextlib
        import io

        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = cli.main(["scenarios", str(path)])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    if status == 0:
        assert not lines
    else:
        assert status == 2 and len(lines) == 1, err.getvalue()
        assert lines[0].startswith("ksmbench: error: ") and str(path) in lines[0]


BAD_FILES = {
    "binary.toml": b"\x00\xff\xfe garbage",
    "not-toml.toml": b"name = \n[[step",
    "no-steps.toml": b'name = "x"\n',
    "wrong-type.toml": b'name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = "many"\n',
    "nested.toml": b'name = "x"\nstep = [[1, 2], {op = {op = "scan"}}]\n',
    "huge.toml": b'name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 99999999999999999999\n',
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("command", ["scenarios", "run"])
def test_cli_process_on_malformed_files(tmp_path, name, command):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", command, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr
