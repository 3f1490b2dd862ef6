"""One scenario form and one op table.

Every built-in scenario is a package-data TOML file; generated scenarios are
model objects whose reproducer file (the one serialiser) loads back as the
same scenario; and an op declared once in model.py is loaded, written and
forwarded to the agent with no code of its own in the loader, the
serialiser or the host backend.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmbench.backends.agent import Agent
from ksmbench.emulator.emulate import ScenarioRun
from ksmbench.errors import ScenarioError
from ksmbench.scenario import BUILTIN_SETS, builtin_names, builtin_set, parse_scenario
from ksmbench.scenario import model as m
from ksmbench.scenario.generate import random_scenario, rebuild
from ksmbench.scenario.serialise import to_toml


def reloaded(scenario: m.Scenario) -> m.Scenario:
    return parse_scenario(to_toml(scenario, "a reproducer\nfile"), source=scenario.source)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), max_steps=st.integers(3, 40), max_pages=st.integers(1, 300))
def test_a_generated_scenario_saved_as_a_file_loads_back_identically(seed, max_steps, max_pages):
    scenario = random_scenario(seed, max_steps=max_steps, max_pages=max_pages)
    again = reloaded(scenario)
    assert again == scenario
    assert again.region_pages == scenario.region_pages


@settings(max_examples=100, deadline=None)
@given(description=st.text(), values=st.lists(st.one_of(st.none(), st.integers(-2**40, 2**40)),
                                              min_size=1, max_size=3))
def test_any_description_and_expected_values_survive_the_file(description, values):
    metrics = ("global.pages_shared", "region.main.a.zero_pfn", "proc.main.ksm_zero_pages")
    expect = m.Expect(1, m.MAIN, tuple(zip(metrics, values)))
    scenario = dataclasses.replace(random_scenario(3), description=description)
    scenario = rebuild(scenario, [m.Mmap(0, m.MAIN, "a", 4), expect])
    assert scenario is not None and reloaded(scenario) == scenario
    assert scenario.description == description and scenario.steps[1] == expect


@pytest.mark.parametrize("kind", BUILTIN_SETS)
def test_every_builtin_set_loads_and_round_trips(kind):
    scenarios = builtin_set(kind)
    assert [s.name for s in scenarios] == builtin_names(kind) and scenarios
    for s in scenarios:
        assert s.source == f"<{kind}>/{s.name}.toml"
        assert reloaded(s) == s


def test_builtin_sets_do_not_share_names_and_unknown_sets_are_refused():
    names = [name for kind in BUILTIN_SETS for name in builtin_names(kind)]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="no built-in scenario set 'nope'"):
        builtin_set("nope")


def test_every_op_is_exercised_by_a_builtin_scenario():
    used = {step.op for kind in BUILTIN_SETS for s in builtin_set(kind) for step in s.steps}
    assert used == set(m.OPS)


@pytest.mark.parametrize("name", [n for n, cls in m.OPS.items() if cls.runs_in == "agent"])
def test_every_agent_op_has_a_method_taking_its_fields(name):
    params = inspect.signature(getattr(Agent, "op_" + name)).parameters
    fields = [attr for attr, _ in m.toml_fields(m.OPS[name])]
    assert list(params)[1:len(fields) + 1] == fields


@pytest.fixture
def touch_op():
    """A new op, declared in one place only (as docs/scenarios.md says)."""
    @m.op("touch")
    @dataclasses.dataclass(frozen=True)
    class Touch(m.Step):
        region: str = m.region_field()
        first: int = m.range_first()
        end: int = m.range_end()
        times: int = m.spec("int", default=1, minimum=1)

        def problem(self, world):
            if self.times > self.end - self.first:
                return "times", "at most one touch per page of the range"
            return None

    yield Touch
    del m.OPS["touch"], m.OP_NAMES[Touch]


TOUCH = """
name = "touch"
[[step]]
op = "mmap"
region = "a"
pages = 8
[[step]]
op = "touch"
region = "a"
range = [2, 6]
times = 3
[[step]]
op = "touch"
region = "a"
"""


def test_an_op_declared_once_is_loaded_written_and_forwarded_generically(touch_op):
    scenario = parse_scenario(TOUCH)
    assert scenario.steps[1] == touch_op(1, m.MAIN, "a", 2, 6, 3)
    assert scenario.steps[2] == touch_op(2, m.MAIN, "a", 0, 8, 1)  # defaults: whole region, once
    assert reloaded(scenario) == scenario
    with pytest.raises(ScenarioError, match="must be at least 1, got 0"):
        parse_scenario(TOUCH.replace("times = 3", "times = 0"))
    with pytest.raises(ScenarioError, match="at most one touch per page") as info:
        parse_scenario(TOUCH.replace("times = 3", "times = 5"))
    assert (info.value.step, info.value.field) == (1, "times")
    with pytest.raises(ScenarioError, match=r"unknown field for op 'touch' "
                       r"\(allowed: op, proc, region, range, times\)"):
        parse_scenario(TOUCH.replace("times = 3", "count = 3"))
    with pytest.raises(ScenarioError, match="region 'b' is not mapped"):
        parse_scenario(TOUCH.replace('range = [2, 6]', 'range = [2, 6]\nproc = "main"')
                       .replace('region = "a"\nrange', 'region = "b"\nrange'))

    calls = []

    class TouchingAgent(Agent):
        def op_touch(self, region, first, end, times):
            calls.append((region, first, end, times))

    # what the host backend sends for every op that runs in the agent
    TouchingAgent(None, "main").op_step(scenario.steps[1], scenario.name)
    assert calls == [("a", 2, 6, 3)]


def test_the_emulator_refuses_an_op_it_does_not_know(touch_op):
    scenario = parse_scenario(TOUCH)
    with pytest.raises(TypeError, match="unknown step"):
        ScenarioRun(scenario, "linux-6.12").apply(scenario.steps[1])
