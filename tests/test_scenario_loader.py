"""The v1 scenario format: valid files load; every malformed file gives one
ScenarioError naming the file, the step index and the field."""

from __future__ import annotations

import pytest

from ksmbench.errors import ScenarioError
from ksmbench.scenario import builtin_names, builtin_suite, parse_scenario, resolve_scenarios
from ksmbench.scenario import model as m

GOOD = """
name = "zero-pages-unmerge-half"
description = "KSM-placed zero pages are unshared by MADV_UNMERGEABLE"

[ksm]
use_zero_pages = true
max_page_sharing = 256
smart_scan = true
merge_across_nodes = true

[[step]]
op = "mmap"
region = "a"
pages = 512
thp = false

[[step]]
op = "fill"
region = "a"
range = [0, 512]
pattern = "zero"

[[step]]
op = "madvise"
region = "a"
advice = "mergeable"

[[step]]
op = "scan"
count = 3
"""


def test_the_format_documents_example_loads():
    s = parse_scenario(GOOD, source="example.toml")
    assert s.name == "zero-pages-unmerge-half"
    assert s.ksm == m.KsmSettings(use_zero_pages=True)
    assert [st.op for st in s.steps] == ["mmap", "fill", "madvise", "scan"]
    fill = s.steps[1]
    assert isinstance(fill, m.Fill) and (fill.first, fill.end) == (0, 512)
    assert str(fill.pattern) == "zero"
    assert s.scan_count == 3
    assert s.region_pages == {("main", "a"): 512}


def test_defaults():
    s = parse_scenario('name = "x"\n[[step]]\nop = "mmap"\nregion = "r"\npages = 4\n'
                       '[[step]]\nop = "fill"\nregion = "r"\npattern = "unique"\n')
    assert s.ksm == m.KsmSettings(False, 256, True, True)
    assert s.steps[0].thp is False and s.steps[0].proc == "main"
    assert (s.steps[1].first, s.steps[1].end) == (0, 4)


def test_processes_fork_and_exit_are_tracked():
    text = """
name = "procs"
[[step]]
op = "mmap"
region = "a"
pages = 8
[[step]]
op = "fork"
child = "kid"
[[step]]
op = "fill"
region = "a"
pattern = "cycle:c:3"
proc = "kid"
[[step]]
op = "exit"
[[step]]
op = "expect"
"proc.kid.ksm_rmap_items" = 0
region.kid.a.present = 8
"global.ksm_zero_pages" = "none"
"""
    s = parse_scenario(text)
    assert isinstance(s.steps[1], m.Fork) and s.steps[1].child == "kid"
    expect = s.steps[4]
    assert isinstance(expect, m.Expect)
    assert dict(expect.values) == {"proc.kid.ksm_rmap_items": 0, "region.kid.a.present": 8,
                                   "global.ksm_zero_pages": None}


BAD = [
    # (toml text, expected step, expected field, words in message)
    ('name = "x"', None, "step", "no steps"),
    ('description = "no name"\n[[step]]\nop = "scan"\ncount = 1', None, "name", "missing"),
    ('name = "Bad_Name"\n[[step]]\nop="scan"\ncount=1', None, "name", "[a-z0-9-]+"),
    ('name = "x"\nextra = 1\n[[step]]\nop="scan"\ncount=1', None, "extra", "unknown top-level"),
    ('name = "x"\n[ksm]\nuse_zero_page = true\n[[step]]\nop="scan"\ncount=1', None,
     "ksm.use_zero_page", "unknown tunable"),
    ('name = "x"\n[ksm]\nmax_page_sharing = 1\n[[step]]\nop="scan"\ncount=1', None,
     "ksm.max_page_sharing", "at least 2"),
    ('name = "x"\n[ksm]\nuse_zero_pages = 1\n[[step]]\nop="scan"\ncount=1', None,
     "ksm.use_zero_pages", "true or false"),
    ('name = "x"\n[[step]]\nop = "frobnicate"', 0, "op", "unknown op"),
    ('name = "x"\n[[step]]\nregion = "a"', 0, "op", "missing"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"', 0, "pages", "needs this field"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 0', 0, "pages", "at least 1"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = true', 0, "pages", "integer"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\ncolour = "red"', 0, "colour",
     "unknown field"),
    ('name = "x"\n[[step]]\nop = "fill"\nregion = "a"\npattern = "zero"', 0, "region", "not mapped"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\n[[step]]\nop = "fill"\n'
     'region = "a"\npattern = "zeros"', 1, "pattern", "unknown pattern"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\n[[step]]\nop = "fill"\n'
     'region = "a"\npattern = "cycle:n:0"', 1, "pattern", "at least 1"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\n[[step]]\nop = "read"\n'
     'region = "a"\nrange = [2, 9]', 1, "range", "within the region"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\n[[step]]\nop = "read"\n'
     'region = "a"\nrange = [3, 3]', 1, "range", "non-empty"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\n[[step]]\nop = "madvise"\n'
     'region = "a"\nadvice = "merge"', 1, "advice", "unknown advice"),
    ('name = "x"\n[[step]]\nop = "scan"\ncount = 0', 0, "count", "at least 1"),
    ('name = "x"\n[[step]]\nop = "prctl"\nmerge = "yes"', 0, "merge", "true or false"),
    ('name = "x"\n[[step]]\nop = "exit"\n[[step]]\nop = "prctl"\nmerge = true', 1, "proc",
     "has exited"),
    ('name = "x"\n[[step]]\nop = "fork"\nchild = "main"', 0, "child", "already used"),
    ('name = "x"\n[[step]]\nop = "munmap"\nregion = "a"\nproc = "ghost"', 0, "proc",
     "does not exist"),
    ('name = "x"\n[[step]]\nop = "expect"', 0, "op", "at least one metric"),
    ('name = "x"\n[[step]]\nop = "expect"\n"global.pages_sharedd" = 1', 0,
     "global.pages_sharedd", "unknown global counter"),
    ('name = "x"\n[[step]]\nop = "expect"\n"proc.kid.ksm_rmap_items" = 1', 0,
     "proc.kid.ksm_rmap_items", "not running"),
    ('name = "x"\n[[step]]\nop = "expect"\n"global.pages_shared" = 1.5', 0,
     "global.pages_shared", "integer"),
    ('name = "x"\n[[step]]\nop = "mmap"\nregion = "a"\npages = 4\n[[step]]\nop = "mmap"\n'
     'region = "a"\npages = 4', 1, "region", "already mapped"),
    ('name = "x"\nstep = 3', None, "step", "array of tables"),
    ('name = "x"\n[[step]\n', None, None, "not valid TOML"),
]


@pytest.mark.parametrize("text,step,field,words", BAD)
def test_malformed_scenarios_name_file_step_and_field(text, step, field, words):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, source="bad.toml")
    err = info.value
    line = str(err)
    assert "\n" not in line
    assert line.startswith("bad.toml")
    assert err.step == step
    assert err.field == field
    assert words in line
    if step is not None:
        assert f"step {step}" in line
    if field is not None:
        assert f"'{field}'" in line


def test_builtin_suite_is_valid_and_covers_the_issue():
    names = builtin_names()
    assert len(names) >= 12
    suite = builtin_suite()
    assert {s.name for s in suite} == set(names)
    ops = {st.op for s in suite for st in s.steps}
    assert ops >= {"mmap", "fill", "read", "madvise", "prctl", "scan", "unmerge_all", "fork",
                   "exit", "munmap", "expect"}
    assert any(s.ksm.use_zero_pages for s in suite) and any(not s.ksm.use_zero_pages for s in suite)
    assert any(s.scan_count >= 10 for s in suite)  # smart_scan over at least 10 scans


def test_resolve_scenarios_by_path_name_and_builtin_fallback(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    got = resolve_scenarios([str(f), "zero-pages", "scenarios/mixed-region.toml"])
    assert [s.name for s in got] == ["zero-pages-unmerge-half", "zero-pages", "mixed-region"]
    with pytest.raises(ScenarioError, match="no such file"):
        resolve_scenarios(["scenarios/does-not-exist.toml"])
    with pytest.raises(ScenarioError, match="appears twice"):
        resolve_scenarios(["zero-pages", "zero-pages"])


# -- exec and uffd_wp --------------------------------------------------------------

def _load(steps):
    from ksmbench.scenario.loader import scenario_from_dict

    return scenario_from_dict({"name": "t", "step": steps}, source="<t>")


def test_exec_and_uffd_wp_load():
    s = _load([{"op": "mmap", "region": "a", "pages": 8},
               {"op": "uffd_wp", "region": "a", "range": [2, 6]},
               {"op": "uffd_wp", "region": "a"},
               {"op": "exec"}])
    assert isinstance(s.steps[1], m.UffdWp) and (s.steps[1].first, s.steps[1].end) == (2, 6)
    assert (s.steps[2].first, s.steps[2].end) == (0, 8)
    assert isinstance(s.steps[3], m.Exec) and s.steps[3].op == "exec"


def test_exec_unmaps_every_region_of_the_process():
    with pytest.raises(ScenarioError) as e:
        _load([{"op": "mmap", "region": "a", "pages": 8}, {"op": "exec"},
               {"op": "fill", "region": "a", "pattern": "zero"}])
    assert e.value.step == 2 and "not mapped" in e.value.message
    # the name may be mapped again after exec
    _load([{"op": "mmap", "region": "a", "pages": 8}, {"op": "exec"},
           {"op": "mmap", "region": "a", "pages": 4}])


def test_writes_to_write_protected_pages_are_refused():
    base = [{"op": "mmap", "region": "a", "pages": 8}, {"op": "uffd_wp", "region": "a",
                                                       "range": [0, 4]}]
    with pytest.raises(ScenarioError) as e:
        _load(base + [{"op": "fill", "region": "a", "range": [3, 8], "pattern": "zero"}])
    assert e.value.step == 2 and e.value.field == "range" and "[3, 4)" in e.value.message
    # outside the range, in a forked child, after munmap or exec: allowed
    _load(base + [{"op": "fill", "region": "a", "range": [4, 8], "pattern": "zero"}])
    _load(base + [{"op": "fork", "child": "c"},
                  {"op": "fill", "proc": "c", "region": "a", "pattern": "zero"}])
    _load(base + [{"op": "munmap", "region": "a"}, {"op": "mmap", "region": "a", "pages": 8},
                  {"op": "fill", "region": "a", "pattern": "zero"}])


def test_uffd_wp_fields_are_checked():
    with pytest.raises(ScenarioError) as e:
        _load([{"op": "mmap", "region": "a", "pages": 8},
               {"op": "uffd_wp", "region": "a", "range": [0, 9]}])
    assert e.value.field == "range"
    with pytest.raises(ScenarioError) as e:
        _load([{"op": "exec", "region": "a"}])
    assert e.value.field == "region"


def test_the_ltp_set_loads_by_name():
    names = [s.name for s in resolve_scenarios(["ltp"])]
    assert names == ["ltp-ksm01", "ltp-ksm06", "ltp-ksm07"]
