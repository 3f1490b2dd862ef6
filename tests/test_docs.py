"""The documentation cannot fall behind the code, and the repo cites only itself.

* The README's "Scenario format" section names every op, field, advice,
  pattern form, tunable, top-level key and metric the loader accepts.
* Its worked fork example loads, and its ``expect`` checks hold in the
  emulator for every preset (and, as root, on this host's kernel).
* No file in the repository cites a Markdown file that is not in the
  repository, nor the directory of notes the project was started from.
* The README's Layout table names every top-level module and directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import host_ksm_usable
from ksmbench.emulator.emulate import predict
from ksmbench.emulator.profiles import PRESETS
from ksmbench.metrics import GLOBAL_COUNTERS, PROC_FIELDS, REGION_METRICS
from ksmbench.scenario import loader, parse_scenario
from ksmbench.scenario import model as m
from ksmbench.scenario.patterns import _PATTERN_RE, PATTERN_FORMS, parse_pattern

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_section(title: str) -> str:
    """The text of one ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = re.search(rf"^## {re.escape(title)}\n", text, re.M)
    assert start, f"README has no '## {title}' section"
    rest = text[start.end():]
    end = re.search(r"^## ", rest, re.M)
    return rest[:end.start()] if end else rest


def mentioned(section: str, word: str) -> bool:
    """``word`` appears in the section as code (`word`, or `word = ...` inside code)."""
    return (f"`{word}`" in section or f"`{word} =" in section
            or re.search(rf"^{re.escape(word)} =", section, re.M) is not None)


FORMAT = readme_section("Scenario format")


def test_every_op_is_in_the_format_reference():
    missing = [op for op in m.OPS if f"| `{op}` |" not in FORMAT]
    assert not missing, f"ops missing from the README's ops table: {missing}"


def test_every_op_field_is_in_the_format_reference():
    fields = {key for cls in m.OPS.values() for key in loader.op_keys(cls)} | {"op", "proc"}
    missing = sorted(f for f in fields if not mentioned(FORMAT, f))
    assert not missing, f"step fields missing from the README's 'Scenario format': {missing}"


def test_every_advice_tunable_and_top_level_key_is_in_the_format_reference():
    words = [*(f'"{a}"' for a in m.ADVICES), *loader._KSM_FIELDS, *loader._TOP_FIELDS,
             *(f'"{w}"' for w in loader.ABSENT_WORDS)]
    missing = []
    for word in words:
        bare = word.strip('"')
        if word.startswith('"'):
            ok = word in FORMAT
        else:
            ok = mentioned(FORMAT, bare) or f"`[{bare}]`" in FORMAT or f"`[[{bare}]]`" in FORMAT
        if not ok:
            missing.append(word)
    assert not missing, f"missing from the README's 'Scenario format': {missing}"


def test_every_pattern_form_is_in_the_format_reference_and_parses():
    # each alternative of the pattern grammar ends in \Z: a new pattern added
    # to the grammar without a PATTERN_FORMS entry (and so without docs) fails
    assert _PATTERN_RE.pattern.count(r"\Z") == len(PATTERN_FORMS)
    for form in PATTERN_FORMS:
        assert f"| `{form}` |" in FORMAT, f"pattern {form} missing from the README's patterns table"
        parse_pattern(form.replace("<name>", "x").replace("<k>", "3"))


def test_every_metric_is_in_the_format_reference():
    rows = [line for line in FORMAT.splitlines() if line.startswith("| `")]

    def listed(prefix: str, field: str) -> bool:
        # `prefix.field`, or `field` later in a row that starts with `prefix.<other>`
        return any(f"`{prefix}.{field}`" in row
                   or (row.startswith(f"| `{prefix}.") and f"`{field}`" in row) for row in rows)

    missing = [f"global.{c}" for c in GLOBAL_COUNTERS if not listed("global", c)]
    missing += [f"proc.<p>.{f}" for f in PROC_FIELDS if not listed("proc.<p>", f)]
    missing += [f"region.<p>.<r>.{f}" for f in REGION_METRICS if not listed("region.<p>.<r>", f)]
    assert not missing, f"metrics missing from the README's 'Scenario format': {missing}"


def _worked_example() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", FORMAT, re.S)
    examples = [b for b in blocks if b.lstrip().startswith("name =")]
    assert len(examples) == 1, "the 'Scenario format' section should hold one complete example"
    return examples[0]


def test_worked_example_forks_a_second_process():
    scenario = parse_scenario(_worked_example(), source="README example")
    assert any(isinstance(s, m.Fork) for s in scenario.steps)
    assert {s.proc for s in scenario.steps} >= {"main", "worker"}
    assert any(isinstance(s, m.Expect) for s in scenario.steps)


@pytest.mark.parametrize("profile", PRESETS)
def test_worked_example_expectations_hold_in_the_emulator(profile):
    scenario = parse_scenario(_worked_example(), source="README example")
    points = {(p.step, p.scan): p.values for p in predict(scenario, profile)}
    checked = 0
    for step in scenario.steps:
        if isinstance(step, m.Expect):
            values = points[(step.index, None)]
            for metric, expected in step.values:
                assert values[metric] == expected, (profile, step.index, metric)
                checked += 1
    assert checked == 5


@pytest.mark.root
@pytest.mark.skipif(not host_ksm_usable(), reason="needs root and a writable KSM sysfs")
def test_worked_example_runs_and_matches_on_this_kernel(tmp_path):
    path = tmp_path / "fork-two-procs.toml"
    path.write_text(_worked_example(), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "run", "--kernel", "host",
                           "--wait", "900", "--out", str(tmp_path / "out"), str(path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rundir = next((tmp_path / "out").iterdir())
    rows = (rundir / "expectations.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and all(r.endswith(",true") for r in rows[1:]), rows


# -- the repository cites only itself ---------------------------------------------------

#: file names the code writes (outputs), not documents it cites
OUTPUT_NAMES = {"summary.md", "workloads.md"}
_MD_TOKEN = re.compile(r"[A-Za-z0-9_./~-]*[A-Za-z0-9_-]\.md\b")
#: the notes directory outside the repository the project started from
_OUTSIDE_NOTES = re.compile(r"(?:\.\./)+shared\b|/work/(?:shared)\b|(?<![\w/-])shared/[\w.-]+\.(?:md|txt)\b"
                            r"|\bof the notes\b|\(notes \d")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    files = []
    for name in filter(None, out):
        # results/ holds recorded runs (console logs, guest output): data, not citations
        if name.startswith("results/"):
            continue
        path = REPO / name
        if path.is_file() and path.suffix not in (".png", ".pickle", ".nul"):
            files.append(path)
    return files


def cited_but_missing(path: Path, text: str, known: set[str]) -> list[str]:
    bad = [m_.group(0) for m_ in _OUTSIDE_NOTES.finditer(text)]
    for token in _MD_TOKEN.findall(text):
        name = token.lstrip("./")
        if Path(name).name in OUTPUT_NAMES or token.startswith(("http", "//")):
            continue
        if name in known or (path.parent / token).resolve().is_file():
            continue
        bad.append(token)
    return bad


def test_no_file_cites_a_document_outside_the_repo():
    files = tracked_text_files()
    known = {str(f.relative_to(REPO)) for f in files} | {f.name for f in files}
    problems = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        bad = cited_but_missing(path, text, known)
        if bad:
            problems[str(path.relative_to(REPO))] = sorted(set(bad))
    assert not problems, f"citations of files that are not in the repository: {problems}"


def test_the_citation_check_catches_outside_notes(tmp_path):
    here = tmp_path / "x.py"
    known = {"README.md", "docs/emulator.md", "emulator.md"}
    assert cited_but_missing(here, "see docs/emulator.md and README.md", known) == []
    elsewhere = "notes-elsewhere" + ".md"  # spelt in two parts: this file is checked too
    assert cited_but_missing(here, f"see {elsewhere}", known) == [elsewhere]
    # joined at run time: the compiler folds "a" + "b" into one constant, which
    # would put the outside path itself into this file's bytecode
    outside = "/".join(("..", "shared", "x.txt"))
    assert cited_but_missing(here, f"see {outside}", known)
    assert cited_but_missing(here, "pages_shared/pages_sharing", known) == []
    assert cited_but_missing(here, "(2.1 of the " + "notes)", known)


# -- the README's Layout table matches the tree ------------------------------------------

def test_layout_names_every_top_level_module_and_directory():
    layout = readme_section("Layout")
    missing = []
    for entry in sorted((REPO / "ksmbench").iterdir()):
        if entry.name.startswith(("_", ".")) or entry.name == "py.typed":
            continue
        if entry.is_dir() and not (entry / "__init__.py").exists():
            continue
        name = entry.name + ("/" if entry.is_dir() else "")
        if f"`ksmbench/{name}`" not in layout and f"`{name}`" not in layout:
            missing.append(f"ksmbench/{name}")
    for top in ("docs/", "tests/", "vm/"):
        if f"`{top}`" not in layout:
            missing.append(top)
    assert not missing, f"the README's Layout section does not name: {missing}"
    for cited in re.findall(r"`((?:ksmbench|docs|vm|tests|results)/[^`]*)`", layout):
        assert (REPO / cited).exists(), f"Layout names {cited}, which does not exist"
