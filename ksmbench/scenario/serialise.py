"""Scenario model -> TOML text: the one writer of scenario files.

Generic over the op table (each op field's declared kind, model.py), so a
new op needs nothing here.  What :func:`to_toml` writes loads back
(:func:`ksmbench.scenario.parse_scenario`) as an equal scenario: a generated
or shrunk scenario saved as a reproducer file is the scenario that was run.
Defaults are left out (a ``[ksm]`` tunable at its default, ``thp = false``,
a range that is the whole region, ``proc = "main"``), as a person would write
the file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import model as m

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
#: TOML basic-string escapes besides \\uXXXX
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r",
            "\b": "\\b", "\f": "\\f"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f"
                                                  else c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else toml_value(key)


def to_toml(scenario: m.Scenario, comment: str = "") -> str:
    """The scenario file of ``scenario``; ``comment`` goes on top as ``#`` lines."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines.append(f"name = {toml_value(scenario.name)}")
    lines.append(f"description = {toml_value(scenario.description)}")
    if scenario.swap:
        lines.append("swap = true")
    tunables = [(f.name, getattr(scenario.ksm, f.name)) for f in dataclasses.fields(m.KsmSettings)
                if getattr(scenario.ksm, f.name) != f.default]
    if tunables:
        lines += ["", "[ksm]", *(f"{key} = {toml_value(value)}" for key, value in tunables)]
    world = m.World()
    for step in scenario.steps:
        lines += ["", "[[step]]", f"op = {toml_value(step.op)}"]
        if step.proc != m.MAIN:
            lines.append(f"proc = {toml_value(step.proc)}")
        lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in step_items(step, world)]
        step.track(world)
    return "\n".join(lines) + "\n"


def step_items(step: m.Step, world: m.World) -> list[tuple[str, Any]]:
    """(TOML key, value) of each field of ``step`` that differs from what the
    loader assumes when the key is absent; ``world``: before the step."""
    defaults = {f.name: f.default for f in dataclasses.fields(step)}
    out: list[tuple[str, Any]] = []
    for attr, decl in m.toml_fields(type(step)):
        value = getattr(step, attr)
        if decl.kind == "range_end" or value == defaults[attr]:
            continue
        if decl.kind == "range":
            whole = (0, world.procs.get(step.proc, {}).get(step.region))
            # a required range (write_byte) is written even when it is the whole region
            if decl.required or (step.first, step.end) != whole:
                out.append((m.toml_key(attr, decl), [step.first, step.end]))
        elif decl.kind == "tunable_value" and m.SET_TUNABLES[step.tunable] is bool:
            out.append((m.toml_key(attr, decl), bool(value)))
        elif decl.kind == "metrics":
            out += [(metric, "none" if expected is None else expected) for metric, expected in value]
        else:
            out.append((m.toml_key(attr, decl), str(value) if decl.kind == "pattern" else value))
    return out
