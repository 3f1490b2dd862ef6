"""Seeded random scenarios and shrinking (for differential tests).

:func:`random_scenario` builds a valid v1 scenario (model objects, as the
loader would return them) from a seed: random ops over a few processes and
regions, biased towards what makes KSM do something (duplicate fills,
MADV_MERGEABLE, scans) but reaching every op and every tunable a ``set`` step
may change.  Each candidate step is checked with the op's own rules
(``Step.problem`` against the :class:`~.model.World` so far) and drawn again
when they refuse it, so every scenario is valid by construction; the rules
live in the model only.  :func:`shrink` removes steps (and simplifies the
rest) while a predicate keeps failing.

One combination is never generated (nor kept by :func:`rebuild`): a fork of
a process with MADV_DONTFORK or MADV_WIPEONFORK ranges once use_zero_pages
has been on.  KSM zero pages in those ranges stay counted in the global
``ksm_zero_pages`` after the child exits (``dup_mm()`` copies the per-mm
count, ``ksm_fork()`` adds it; measured on 6.12 to 7.3, see docs/emulator.md
"dontfork") and the leak lasts until reboot, so a random run would leave the
host changed.  The built-in scenario ``dontfork-wipeonfork`` covers the fork
behaviour without zero pages.  ``stable_node_chains_prune_millisecs`` is
drawn from the two regimes that cost no time (0 and "never"): the per-batch
regime makes the host wait the interval before every batch.  A scenario's
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

#: madvise advices and their weights (the first three as before the VMA ops)
_ADVICE_WEIGHTS = {"mergeable": 6, "unmergeable": 2, "dontneed": 1.5, "free": 0.8,
                   "dontfork": 0.5, "wipeonfork": 0.5, "cold": 0.4, "pageout": 0.7}
#: with swap = true, pageout is what swaps pages out: drawn more often
_SWAP_ADVICE_WEIGHTS = {**_ADVICE_WEIGHTS, "pageout": 3}
#: tunables a ``set`` step changes, their weights and the values drawn
_SET_WEIGHTS = {"use_zero_pages": 3, "max_page_sharing": 3, "smart_scan": 2,
                "merge_across_nodes": 0.7}
_MAX_PAGE_SHARING = (2, 3, 4, 5, 8, 256)
#: how often a candidate step is drawn again when the model refuses it
_DRAWS = 8
#: the share of random scenarios with the scan-time advisor (6.8).  Its knobs
#: come from a second generator seeded apart, so the scenarios of every other
#: seed stay what they were; advisor_max_pages_to_scan <= 10 makes its
#: outcome exact on any machine (the 10% CPU floor is at least 10 pages:
#: docs/stepping.md "The advisor"), and advisor_min_pages_to_scan sets the
#: first scan's batches
ADVISOR_SHARE = 0.12


def _forks_zero_pages_out(world: m.World, step: m.Step, zero_pages_seen: bool) -> bool:
    """Whether ``step`` forks a process that has MADV_DONTFORK/MADV_WIPEONFORK
    ranges after use_zero_pages has been on: KSM zero pages there would stay
    counted in the global ksm_zero_pages until reboot (module docstring)."""
    if not (zero_pages_seen and isinstance(step, m.Fork)):
        return False
    return any(world.runs(step.proc, region).any(0, pages, advice, True)
               for region, pages in world.procs.get(step.proc, {}).items()
               for advice in ("dontfork", "wipeonfork"))


def leaks_zero_pages(steps: Sequence[m.Step], ksm: m.KsmSettings) -> bool:
    """Whether a step of these forks KSM zero pages out of DONTFORK or
    WIPEONFORK ranges (:func:`_forks_zero_pages_out`), which the generator
    and the shrinker never run."""
    world, seen = m.World(), ksm.use_zero_pages
    for step in steps:
        if _forks_zero_pages_out(world, step, seen):
            return True
        if isinstance(step, m.Set) and step.tunable == "use_zero_pages" and step.value:
            seen = True
        step.track(world)
    return False


#: sizes of the THP region of a ``thp`` random scenario: one or two whole
#: huge pages, or one or two and a tail of 4 KiB pages
_THP_PAGES = (512, 700, 1024, 1100)


def random_scenario(seed: int, *, max_steps: int = 18, max_pages: int = 48,
                    name_prefix: str = "random", numa_nodes: int = 1,
                    swap: bool = False, thp: bool = False) -> m.Scenario:
    """``numa_nodes`` > 1: regions are bound to random nodes (op mmap, node) and
    merge_across_nodes starts at 0 half the time.  ``swap``: the scenario has
    ``swap = true`` (a guest's zram device), and op ``reclaim`` joins the mix.
    ``thp``: the first region is a THP region (``thp = true``) of one or two
    huge pages, and no step takes it outside the emulator's THP model
    (:class:`ksmbench.scenario.model.ThpRegions`).  With the defaults no draw
    is spent on any of them, so a seed gives the scenario it always gave."""
    rng = random.Random(seed)
    world = m.World()
    thp_regions = m.ThpRegions()
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
    if rng.random() < 0.15:  # the time-free regimes only (module docstring)
        ksm["stable_node_chains_prune_millisecs"] = m.PRUNE_NEVER_MS
    if numa_nodes > 1 and rng.random() < 0.5:
        ksm["merge_across_nodes"] = False
    knobs = random.Random(f"advisor-{seed}")
    advisor = knobs.random() < ADVISOR_SHARE
    if advisor:
        ksm.update(advisor_mode="scan-time", advisor_min_pages_to_scan=knobs.randint(1, 40),
                   advisor_max_pages_to_scan=knobs.randint(1, 10),
                   advisor_max_cpu=knobs.choice((0, 5, 20, 70)),
                   advisor_target_scan_time=knobs.choice((1, 2, 200)))
    region_counter = 0
    zero_pages_seen = bool(ksm.get("use_zero_pages"))

    def node() -> dict[str, int]:
        """op mmap's ``node``: none on one node; else mostly a random node."""
        if numa_nodes <= 1 or rng.random() < 0.2:
            return {}
        return {"node": rng.randrange(numa_nodes)}

    def add(cls: type, proc: str = m.MAIN, **fields: Any) -> None:
        step = cls(len(steps), proc, **fields)
        step.track(world)
        thp_regions.track(step)
        steps.append(step)

    def draw(make: Callable[[], tuple[type, str, dict[str, Any]]]) -> None:
        """Add the first of a few candidates from ``make`` that the model
        accepts (``problem``) and that forks no zero pages out; none if all fail."""
        nonlocal zero_pages_seen
        for _ in range(_DRAWS):
            cls, at, fields = make()
            step = cls(len(steps), at, **fields)
            if step.problem(world) is None and not _forks_zero_pages_out(
                    world, step, zero_pages_seen) and thp_regions.outside(step) is None:
                step.track(world)
                thp_regions.track(step)
                steps.append(step)
                if isinstance(step, m.Set) and step.tunable == "use_zero_pages" and step.value:
                    zero_pages_seen = True
                return

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
    for i in range(rng.randint(1, 3)):
        region_counter += 1
        name = f"r{region_counter}"
        pages = rng.randint(1, max_pages)
        if thp and i == 0:
            # its own generator: the draws of the main one stay as they were
            pages = random.Random(f"thp-{seed}").choice(_THP_PAGES)
            add(m.Mmap, region=name, pages=pages, thp=True, **node())
        else:
            add(m.Mmap, region=name, pages=pages, **node())
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
            # the ops and tunables added after v1
            "set": 1.2,
            "write_byte": 1.2 if regions else 0,
            "mprotect": 0.8 if regions else 0,
            "mremap": 0.7 if regions else 0,
            "uffd_wp": 0.4 if regions else 0,
            # a new interpreter per exec: slow under TCG
            "exec": 0.25,
        }
        if swap:
            weights["reclaim"] = 1.0
        if proc is None:
            weights = {"scan": 1, "unmerge_all": 0.2, "set": 0.3}
        ops = [op for op, w in weights.items() if w > 0]
        op = rng.choices(ops, [weights[o] for o in ops])[0]
        cls = m.OPS[op]
        at = proc if cls.needs_proc else m.MAIN
        if op == "mmap":
            region_counter += 1
            add(cls, at, region=f"r{region_counter}", pages=rng.randint(1, max_pages), **node())
        elif op in ("fill", "read", "madvise", "write_byte", "mprotect", "uffd_wp"):
            def make(cls=cls, at=at, op=op):
                name = rng.choice(list(regions))
                fields: dict[str, Any] = {"region": name, **some_range(regions[name])}
                if op in ("fill", "write_byte"):
                    fields["pattern"] = pattern()
                elif op == "madvise":
                    advices = _SWAP_ADVICE_WEIGHTS if swap else _ADVICE_WEIGHTS
                    fields["advice"] = rng.choices(list(advices), list(advices.values()))[0]
                elif op == "mprotect":
                    fields["prot"] = rng.choices(m.PROTS, (2, 1, 3))[0]
                return cls, at, fields
            draw(make)
        elif op == "mremap":
            def make(cls=cls, at=at):
                name = rng.choice(list(regions))
                return cls, at, {"region": name, "pages": rng.randint(1, max_pages),
                                 "move": rng.random() < 0.4}
            draw(make)
        elif op == "munmap":
            add(cls, at, region=rng.choice(list(regions)))
        elif op == "prctl":
            add(cls, at, merge=rng.random() < 0.6)
        elif op == "scan":
            if rng.random() < 0.25:  # one partial batch, up to about two full scans
                pages = rng.randint(1, 2 * max_pages)
                if advisor:  # pages_to_scan is the advisor's: whole scans only
                    add(cls, at, count=1)
                else:
                    add(cls, at, pages=pages)
            else:
                add(cls, at, count=rng.choice((1, 1, 2, 2, 3, 4)))
        elif op == "set":
            def make(cls=cls, at=at):
                tunable = rng.choices(list(_SET_WEIGHTS), list(_SET_WEIGHTS.values()))[0]
                value = (rng.choice(_MAX_PAGE_SHARING) if tunable == "max_page_sharing"
                         else int(rng.random() < 0.5))
                return cls, at, {"tunable": tunable, "value": value}
            draw(make)
        elif op == "fork":
            child = f"p{len(used_names)}"
            draw(lambda cls=cls, at=at: (cls, at, {"child": child}))
            if isinstance(steps[-1], m.Fork) and steps[-1].child == child:
                used_names.add(child)
        else:  # exit, unmerge_all, exec, reclaim
            add(cls, at)
    # end with scans so that the last changes are seen by ksmd
    add(m.Scan, count=rng.choice((1, 2, 3)))
    name = f"{name_prefix}-{seed}"
    return m.Scenario(name=name, description=f"random scenario, seed {seed}",
                      ksm=m.KsmSettings(**ksm), steps=tuple(steps), source=f"<{name}>", swap=swap,
                      region_pages=dict(world.all_regions))


def rebuild(scenario: m.Scenario, steps: Sequence[m.Step],
            ksm: m.KsmSettings | None = None) -> m.Scenario | None:
    """``scenario`` with these steps (renumbered) and tunables, as its
    reproducer file loads; None when that file would not be valid."""
    candidate = dataclasses.replace(
        scenario, ksm=scenario.ksm if ksm is None else ksm,
        steps=tuple(dataclasses.replace(s, index=i) for i, s in enumerate(steps)))
    try:
        loaded = parse_scenario(to_toml(candidate), source=scenario.source)
    except ScenarioError:
        return None
    # valid, but never run (module docstring)
    return None if leaks_zero_pages(loaded.steps, loaded.ksm) else loaded


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
        if getattr(ksm, f.name) != f.default and f.name != "advisor_max_pages_to_scan":
            # (the advisor's cap stays: above 10 its outcome may depend on timing)
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
