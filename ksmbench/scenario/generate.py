"""Seeded random scenarios and shrinking (for differential tests).

:func:`random_scenario` builds a valid v1 scenario (model objects, as the
loader would return them) from a seed: random ops over a few processes and
regions, biased towards what makes KSM do something (duplicate fills,
MADV_MERGEABLE, scans) but reaching every op.  :func:`shrink` removes steps
(and simplifies the rest) while a predicate keeps failing.  A scenario's
reproducer file comes from :func:`ksmbench.scenario.serialise.to_toml`, and
every candidate is checked by loading that text back, so what is saved is
what was run.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Iterator, Sequence

from ..errors import ScenarioError
from . import model as m
from .loader import parse_scenario
from .patterns import parse_pattern
from .serialise import to_toml

_TAGS = ("a", "b", "c")


def random_scenario(seed: int, *, max_steps: int = 18, max_pages: int = 48,
                    name_prefix: str = "random") -> m.Scenario:
    rng = random.Random(seed)
    world = m.World()
    procs = world.procs  # live processes -> their regions, in creation order
    used_names = {m.MAIN}
    steps: list[m.Step] = []
    ksm: dict[str, Any] = {}
    if rng.random() < 0.6:
        ksm["use_zero_pages"] = rng.random() < 0.6
    if rng.random() < 0.6:
        ksm["max_page_sharing"] = rng.choice((2, 3, 4, 5, 8, 256))
    if rng.random() < 0.2:
        ksm["smart_scan"] = False
    region_counter = 0

    def add(cls: type, proc: str = m.MAIN, **fields: Any) -> None:
        step = cls(len(steps), proc, **fields)
        step.track(world)
        steps.append(step)

    def pattern():
        r = rng.random()
        if r < 0.25:
            return parse_pattern("zero")
        if r < 0.65:
            return parse_pattern("tag:" + rng.choice(_TAGS))
        if r < 0.85:
            return parse_pattern("unique")
        return parse_pattern(f"cycle:{rng.choice(_TAGS)}:{rng.randint(2, 4)}")

    def some_range(pages: int) -> dict[str, int]:
        """``first`` and ``end``: half the time the whole region."""
        if rng.random() < 0.5:
            return {"first": 0, "end": pages}
        first = rng.randrange(pages)
        return {"first": first, "end": rng.randint(first + 1, pages)}

    # a set-up that gives ksmd something to merge: regions filled with mostly
    # duplicate content and made mergeable, then a random mix of everything
    for _ in range(rng.randint(1, 3)):
        region_counter += 1
        name = f"r{region_counter}"
        pages = rng.randint(1, max_pages)
        add(m.Mmap, region=name, pages=pages)
        for _ in range(rng.randint(1, 3)):
            pat = pattern()
            add(m.Fill, region=name, pattern=pat, **some_range(pages))
        if rng.random() < 0.85:
            add(m.Madvise, region=name, first=0, end=pages, advice="mergeable")
    if rng.random() < 0.7:
        add(m.Scan, count=rng.choice((1, 2, 2, 3)))
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
        cls = m.OPS[op]
        at = proc if cls.needs_proc else m.MAIN
        if op == "mmap":
            region_counter += 1
            add(cls, at, region=f"r{region_counter}", pages=rng.randint(1, max_pages))
        elif op in ("fill", "read", "madvise"):
            name = rng.choice(list(regions))
            span = some_range(regions[name])
            if op == "fill":
                add(cls, at, region=name, pattern=pattern(), **span)
            elif op == "madvise":
                advice = rng.choices(("mergeable", "unmergeable", "dontneed"), (6, 2, 1.5))[0]
                add(cls, at, region=name, advice=advice, **span)
            else:
                add(cls, at, region=name, **span)
        elif op == "munmap":
            add(cls, at, region=rng.choice(list(regions)))
        elif op == "prctl":
            add(cls, at, merge=rng.random() < 0.6)
        elif op == "scan":
            add(cls, at, count=rng.choice((1, 1, 2, 2, 3, 4)))
        elif op == "fork":
            child = f"p{len(used_names)}"
            used_names.add(child)
            add(cls, at, child=child)
        else:  # exit, unmerge_all
            add(cls, at)
    # end with scans so that the last changes are seen by ksmd
    add(m.Scan, count=rng.choice((1, 2, 3)))
    name = f"{name_prefix}-{seed}"
    return m.Scenario(name=name, description=f"random scenario, seed {seed}",
                      ksm=m.KsmSettings(**ksm), steps=tuple(steps), source=f"<{name}>",
                      region_pages=dict(world.all_regions))


def rebuild(scenario: m.Scenario, steps: Sequence[m.Step],
            ksm: m.KsmSettings | None = None) -> m.Scenario | None:
    """``scenario`` with these steps (renumbered) and tunables, as its
    reproducer file loads; None when that file would not be valid."""
    candidate = dataclasses.replace(
        scenario, ksm=scenario.ksm if ksm is None else ksm,
        steps=tuple(dataclasses.replace(s, index=i) for i, s in enumerate(steps)))
    try:
        return parse_scenario(to_toml(candidate), source=scenario.source)
    except ScenarioError:
        return None


def valid(scenario: m.Scenario) -> bool:
    return rebuild(scenario, scenario.steps) is not None


def _region_sizes(steps: Sequence[m.Step]) -> list[int | None]:
    """The size of the region each step names, just before it (else None)."""
    world = m.World()
    out: list[int | None] = []
    for step in steps:
        region = getattr(step, "region", None)
        out.append(world.procs.get(step.proc, {}).get(region))
        step.track(world)
    return out


def _candidates(scenario: m.Scenario) -> Iterator[tuple[list[m.Step], m.KsmSettings]]:
    steps, ksm = list(scenario.steps), scenario.ksm
    n = len(steps)
    # drop chunks of steps, large chunks first
    size = max(1, n // 2)
    while size >= 1:
        for start in range(0, n, size):
            yield steps[:start] + steps[start + size:], ksm
        size //= 2
    # simplify single steps
    for i, (step, pages) in enumerate(zip(steps, _region_sizes(steps))):
        simpler: list[list[m.Step]] = []
        if isinstance(step, m.Scan) and step.count > 1:
            simpler.append([dataclasses.replace(step, count=step.count - 1)])
        if hasattr(step, "first") and pages is not None and (step.first, step.end) != (0, pages):
            simpler.append([dataclasses.replace(step, first=0, end=pages)])  # the whole region
        if isinstance(step, m.Mmap) and step.pages > 1:
            half = max(1, step.pages // 2)
            # later steps on the whole region keep covering the whole region
            later = [dataclasses.replace(s, end=half)
                     if getattr(s, "region", None) == step.region and hasattr(s, "first")
                     and (s.first, s.end) == (0, step.pages) else s for s in steps[i + 1:]]
            simpler.append([dataclasses.replace(step, pages=half), *later])
        for alt in simpler:
            yield steps[:i] + alt + steps[i + len(alt):], ksm
    for f in dataclasses.fields(ksm):
        if getattr(ksm, f.name) != f.default:
            yield steps, dataclasses.replace(ksm, **{f.name: f.default})


def shrink(scenario: m.Scenario, fails: Callable[[m.Scenario], bool], *,
           budget: int = 60) -> tuple[m.Scenario, int]:
    """Greedy delta debugging: the smallest variant found that still fails.

    ``fails`` runs the candidate (on the kernel and the emulator) and says
    whether it still mismatches; at most ``budget`` candidates are tried.
    Returns the shrunk scenario and the number of candidates tried.
    """
    tried = 0
    improved = True
    while improved and tried < budget:
        improved = False
        for steps, ksm in _candidates(scenario):
            if tried >= budget:
                break
            candidate = rebuild(scenario, steps, ksm)
            if candidate is None:
                continue
            tried += 1
            if fails(candidate):
                scenario = candidate
                improved = True
                break
    return scenario, tried
