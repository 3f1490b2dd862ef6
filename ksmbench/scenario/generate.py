"""Seeded random scenarios, their TOML form, and shrinking (for differential tests).

:func:`random_scenario` builds a valid v1 scenario (as the dict a TOML file
parses to) from a seed: random ops over a few processes and regions, biased
towards what makes KSM do something (duplicate fills, MADV_MERGEABLE, scans)
but reaching every op.  :func:`shrink` removes steps (and simplifies the
rest) while a predicate keeps failing; :func:`to_toml` writes a scenario
file that reproduces the case.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from ..errors import ScenarioError
from . import model as m
from .loader import scenario_from_dict

Spec = dict[str, Any]

_TAGS = ("a", "b", "c")


def random_scenario(seed: int, *, max_steps: int = 18, max_pages: int = 48,
                    name_prefix: str = "random") -> Spec:
    rng = random.Random(seed)
    procs: dict[str, dict[str, int]] = {m.MAIN: {}}
    used_names = {m.MAIN}
    steps: list[dict[str, Any]] = []
    ksm: dict[str, Any] = {}
    if rng.random() < 0.6:
        ksm["use_zero_pages"] = rng.random() < 0.6
    if rng.random() < 0.6:
        ksm["max_page_sharing"] = rng.choice((2, 3, 4, 5, 8, 256))
    if rng.random() < 0.2:
        ksm["smart_scan"] = False
    region_counter = 0

    def pattern() -> str:
        r = rng.random()
        if r < 0.25:
            return "zero"
        if r < 0.65:
            return "tag:" + rng.choice(_TAGS)
        if r < 0.85:
            return "unique"
        return f"cycle:{rng.choice(_TAGS)}:{rng.randint(2, 4)}"

    def some_range(pages: int) -> list[int] | None:
        if rng.random() < 0.5:
            return None
        first = rng.randrange(pages)
        end = rng.randint(first + 1, pages)
        return [first, end]

    # a set-up that gives ksmd something to merge: regions filled with mostly
    # duplicate content and made mergeable, then a random mix of everything
    for _ in range(rng.randint(1, 3)):
        region_counter += 1
        name = f"r{region_counter}"
        pages = rng.randint(1, max_pages)
        steps.append({"op": "mmap", "region": name, "pages": pages})
        procs[m.MAIN][name] = pages
        for _ in range(rng.randint(1, 3)):
            fill: dict[str, Any] = {"op": "fill", "region": name, "pattern": pattern()}
            rng_ = some_range(pages)
            if rng_ is not None:
                fill["range"] = rng_
            steps.append(fill)
        if rng.random() < 0.85:
            steps.append({"op": "madvise", "region": name, "advice": "mergeable"})
    if rng.random() < 0.7:
        steps.append({"op": "scan", "count": rng.choice((1, 2, 2, 3))})
    n_steps = len(steps) + rng.randint(3, max_steps)
    while len(steps) < n_steps:
        live = list(procs)
        proc = rng.choice(live) if live else None
        regions = procs.get(proc, {}) if proc else {}
        weights = {
            "mmap": 3 if len(regions) < 3 else 0.5,
            "fill": 6 if regions else 0,
            "read": 1 if regions else 0,
            "madvise": 5 if regions else 0,
            "prctl": 1,
            "scan": 6,
            "unmerge_all": 0.5,
            "fork": 1 if len(procs) < 3 else 0,
            "exit": 0.7 if len(procs) > 1 else 0.1,
            "munmap": 0.7 if regions else 0,
        }
        if proc is None:
            weights = {"scan": 1, "unmerge_all": 0.2}
        ops = [op for op, w in weights.items() if w > 0]
        op = rng.choices(ops, [weights[o] for o in ops])[0]
        step: dict[str, Any] = {"op": op}
        if op not in ("scan", "unmerge_all") and proc != m.MAIN:
            step["proc"] = proc
        if op == "mmap":
            region_counter += 1
            name = f"r{region_counter}"
            pages = rng.randint(1, max_pages)
            step.update(region=name, pages=pages)
            procs[proc][name] = pages
        elif op in ("fill", "read", "madvise", "munmap"):
            name = rng.choice(list(regions))
            step["region"] = name
            if op != "munmap":
                rng_ = some_range(regions[name])
                if rng_ is not None:
                    step["range"] = rng_
            if op == "fill":
                step["pattern"] = pattern()
            elif op == "madvise":
                step["advice"] = rng.choices(("mergeable", "unmergeable", "dontneed"),
                                             (6, 2, 1.5))[0]
            elif op == "munmap":
                del procs[proc][name]
        elif op == "prctl":
            step["merge"] = rng.random() < 0.6
        elif op == "scan":
            step["count"] = rng.choice((1, 1, 2, 2, 3, 4))
        elif op == "fork":
            child = f"p{len(used_names)}"
            used_names.add(child)
            step["child"] = child
            procs[child] = dict(regions)
        elif op == "exit":
            del procs[proc]
        steps.append(step)
    # end with scans so that the last changes are seen by ksmd
    steps.append({"op": "scan", "count": rng.choice((1, 2, 3))})
    spec: Spec = {"name": f"{name_prefix}-{seed}", "description": f"random scenario, seed {seed}"}
    if ksm:
        spec["ksm"] = ksm
    spec["step"] = steps
    return spec


def to_scenario(spec: Spec) -> m.Scenario:
    return scenario_from_dict(spec, source=f"<{spec.get('name', 'random')}>")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(spec: Spec, comment: str = "") -> str:
    lines = []
    for line in comment.splitlines():
        lines.append(f"# {line}".rstrip())
    lines.append(f"name = {_toml_value(spec['name'])}")
    lines.append(f"description = {_toml_value(spec.get('description', ''))}")
    if spec.get("ksm"):
        lines.append("")
        lines.append("[ksm]")
        for key, value in spec["ksm"].items():
            lines.append(f"{key} = {_toml_value(value)}")
    for step in spec["step"]:
        lines.append("")
        lines.append("[[step]]")
        for key, value in step.items():
            key_text = key if key.replace("_", "").isalnum() else _toml_value(key)
            lines.append(f"{key_text} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def valid(spec: Spec) -> bool:
    try:
        to_scenario(spec)
    except ScenarioError:
        return False
    return True


def _candidates(spec: Spec):
    steps = spec["step"]
    n = len(steps)
    # drop chunks of steps, large chunks first
    size = max(1, n // 2)
    while size >= 1:
        for start in range(0, n, size):
            yield {**spec, "step": steps[:start] + steps[start + size:]}
        size //= 2
    # simplify single steps
    for i, step in enumerate(steps):
        simpler: list[dict[str, Any]] = []
        if step.get("op") == "scan" and step.get("count", 1) > 1:
            simpler.append({**step, "count": step["count"] - 1})
        if "range" in step:
            simpler.append({k: v for k, v in step.items() if k != "range"})
        if step.get("op") == "mmap" and step.get("pages", 1) > 1:
            simpler.append({**step, "pages": max(1, step["pages"] // 2)})
        for alt in simpler:
            yield {**spec, "step": steps[:i] + [alt] + steps[i + 1:]}
    if spec.get("ksm"):
        for key in list(spec["ksm"]):
            yield {**spec, "ksm": {k: v for k, v in spec["ksm"].items() if k != key}}


def shrink(spec: Spec, fails: Callable[[Spec], bool], *, budget: int = 60) -> tuple[Spec, int]:
    """Greedy delta debugging: the smallest variant found that still fails.

    ``fails`` runs the candidate (on the kernel and the emulator) and says
    whether it still mismatches; at most ``budget`` candidates are tried.
    Returns the shrunk spec and the number of candidates tried.
    """
    tried = 0
    improved = True
    while improved and tried < budget:
        improved = False
        for cand in _candidates(spec):
            if tried >= budget:
                break
            if not valid(cand):
                continue
            tried += 1
            if fails(cand):
                spec = cand
                improved = True
                break
    return spec, tried
