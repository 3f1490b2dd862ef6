"""The v1 scenario format as immutable dataclasses.

One class per op, all sharing :class:`Step` (index and process).  Backends and
the emulator dispatch on the class, so adding an op means adding a class here,
its parsing in ``loader.py`` and its execution in each backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from .patterns import Pattern

Advice = Literal["mergeable", "unmergeable", "dontneed", "free", "dontfork", "wipeonfork",
                 "cold", "pageout"]
ADVICES: tuple[str, ...] = ("mergeable", "unmergeable", "dontneed",
                            # vma-ops: MADV_FREE, MADV_DONTFORK, MADV_WIPEONFORK,
                            # MADV_COLD, MADV_PAGEOUT (README "Ops")
                            "free", "dontfork", "wipeonfork", "cold", "pageout")
MAIN = "main"


@dataclass(frozen=True)
class KsmSettings:
    """The ``[ksm]`` table: tunables held for the whole scenario."""

    use_zero_pages: bool = False
    max_page_sharing: int = 256
    smart_scan: bool = True
    merge_across_nodes: bool = True


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


# --- vma-ops: mprotect -------------------------------------------------------
#: mprotect() protections a scenario can ask for
PROTS: tuple[str, ...] = ("none", "read", "read-write")


@dataclass(frozen=True)
class Mprotect(Step):
    region: str
    first: int
    end: int
    prot: str  # one of PROTS
# --- end mprotect ------------------------------------------------------------


# --- vma-ops: mremap ---------------------------------------------------------
@dataclass(frozen=True)
class Mremap(Step):
    region: str
    #: the region's new size in pages
    pages: int
    #: True: move the region to a new address (MREMAP_MAYMOVE|MREMAP_FIXED);
    #: False: grow or shrink in place
    move: bool = False
# --- end mremap --------------------------------------------------------------


# --- vma-ops: write_byte -----------------------------------------------------
@dataclass(frozen=True)
class WriteByte(Step):
    region: str
    first: int
    end: int
    #: gives the byte written at offset 0 of each page (patterns.write_byte_values)
    pattern: Pattern
# --- end write_byte ----------------------------------------------------------


AnyStep = Union[Mmap, Fill, Read, Madvise, Prctl, Scan, UnmergeAll, Fork, Exit, Munmap, Expect,
                Mprotect, Mremap, WriteByte]

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
    Mprotect: "mprotect",
    Mremap: "mremap",
    WriteByte: "write_byte",
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
