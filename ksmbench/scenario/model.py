"""The v1 scenario format as immutable dataclasses.

One class per op, all sharing :class:`Step` (index and process).  Backends and
the emulator dispatch on the class, so adding an op means adding a class here,
its parsing in ``loader.py`` and its execution in each backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from ..metrics import SET_TUNABLE_NAMES
from .patterns import Pattern

Advice = Literal["mergeable", "unmergeable", "dontneed"]
ADVICES: tuple[str, ...] = ("mergeable", "unmergeable", "dontneed")
MAIN = "main"


# -- the modelled prune clock of [ksm] stable_node_chains_prune_millisecs ----------------
#: stable_node_dup() prunes a chain's stale dups only when this many ms have
#: passed since the chain's last prune (or its creation).  Three ranges give an
#: outcome that does not depend on timing (docs/stepping.md, "The prune clock"):
#: 0 prunes on every walk; PRUNE_PER_BATCH_MS (inclusive) is modelled as "at most
#: once per ksmd batch" (the host waits the interval before each batch and
#: checks that each batch is shorter); from PRUNE_NEVER_MS on a chain is never
#: pruned by time within a scenario (the host checks the scenario is shorter)
PRUNE_PER_BATCH_MS = (100, 10_000)
PRUNE_NEVER_MS = 3_600_000


def prune_regime(msecs: int) -> str | None:
    """"always", "per-batch", "never", or None for a value with no deterministic model."""
    if msecs == 0:
        return "always"
    if PRUNE_PER_BATCH_MS[0] <= msecs <= PRUNE_PER_BATCH_MS[1]:
        return "per-batch"
    if msecs >= PRUNE_NEVER_MS:
        return "never"
    return None


@dataclass(frozen=True)
class KsmSettings:
    """The ``[ksm]`` table: tunables held for the whole scenario."""

    use_zero_pages: bool = False
    max_page_sharing: int = 256
    smart_scan: bool = True
    merge_across_nodes: bool = True
    #: 0: stale dups of a chain are pruned on every stable-tree walk (what
    #: stepping always did); see ``prune_regime`` and docs/stepping.md for
    #: the other values the modelled prune clock accepts
    stable_node_chains_prune_millisecs: int = 0


@dataclass(frozen=True)
class Step:
    index: int
    proc: str

    @property
    def op(self) -> str:
        return OP_NAMES[type(self)]


@dataclass(frozen=True)
class Mmap(Step):
    region: str
    pages: int
    thp: bool = False


@dataclass(frozen=True)
class Fill(Step):
    region: str
    first: int
    end: int
    pattern: Pattern


@dataclass(frozen=True)
class Read(Step):
    region: str
    first: int
    end: int


@dataclass(frozen=True)
class Madvise(Step):
    region: str
    first: int
    end: int
    advice: str


@dataclass(frozen=True)
class Prctl(Step):
    merge: bool


@dataclass(frozen=True)
class Scan(Step):
    count: int
    #: a partial batch: ksmd runs one batch of ``pages`` pages (ksm_do_scan()
    #: with scan_npages = pages) instead of ``count`` full scans; it stops
    #: early where a full scan completes.  ``count`` is then 1.
    pages: int | None = None


# -- op "set": one KSM tunable changed between steps (issue 14) ----------------------
#: tunables a ``set`` step may change, and the type of their value
SET_TUNABLES: dict[str, type] = {
    "use_zero_pages": bool,
    "max_page_sharing": int,
    "smart_scan": bool,
    "merge_across_nodes": bool,
}
# the set step's observation names them (metrics.tunable_metric)
assert tuple(SET_TUNABLES) == SET_TUNABLE_NAMES


@dataclass(frozen=True)
class Set(Step):
    """Write ``value`` to /sys/kernel/mm/ksm/<tunable>.  The kernel may refuse
    (max_page_sharing and merge_across_nodes: -EBUSY while KSM pages exist);
    the step's observation records what it did (``set.error``, ``tunable.*``)."""

    tunable: str
    value: int  # booleans as 0/1, as sysfs prints them
# -- end of op "set" -------------------------------------------------------------------


@dataclass(frozen=True)
class UnmergeAll(Step):
    pass


@dataclass(frozen=True)
class Fork(Step):
    child: str


@dataclass(frozen=True)
class Exit(Step):
    pass


@dataclass(frozen=True)
class Munmap(Step):
    region: str


@dataclass(frozen=True)
class Expect(Step):
    #: metric name -> expected value (None: the kernel must lack the counter)
    values: tuple[tuple[str, int | None], ...]

    def check(self, observed: dict[str, int | None]) -> list[tuple[str, int | None, int | None, bool]]:
        """(metric, expected, observed, holds) for each value, against this
        step's observation; a counter the kernel lacks is None, and holds only
        where None is expected."""
        return [(metric, expected, observed.get(metric), observed.get(metric) == expected)
                for metric, expected in self.values]


AnyStep = Union[Mmap, Fill, Read, Madvise, Prctl, Scan, UnmergeAll, Fork, Exit, Munmap, Expect, Set]

OP_NAMES: dict[type, str] = {
    Mmap: "mmap",
    Fill: "fill",
    Read: "read",
    Madvise: "madvise",
    Prctl: "prctl",
    Scan: "scan",
    UnmergeAll: "unmerge_all",
    Fork: "fork",
    Exit: "exit",
    Munmap: "munmap",
    Expect: "expect",
    Set: "set",
}
OPS: dict[str, type] = {name: cls for cls, name in OP_NAMES.items()}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    ksm: KsmSettings
    steps: tuple[AnyStep, ...]
    #: where it was loaded from (a path, or "<suite>/name.toml"), for messages
    source: str = "<memory>"
    #: region sizes in pages, by (proc, region), as known after validation
    region_pages: dict[tuple[str, str], int] = field(default_factory=dict, compare=False)

    @property
    def scan_count(self) -> int:
        return sum(s.count for s in self.steps if isinstance(s, Scan))

    @property
    def max_pages(self) -> int:
        """Upper bound of pages mapped at once (for sizing timeouts)."""
        return sum(self.region_pages.values()) or 1
