"""The v1 scenario format as immutable dataclasses, and the one table of ops.

One class per op, all sharing :class:`Step` (index and process).  Each op
class *is* its row of the op table: ``@op("name")`` registers it, and every
field says, through :func:`spec`, how it is written in a scenario file (TOML
key, kind, required or default, bounds, choices).  The loader
(:mod:`.loader`) and the serialiser (:mod:`.serialise`) are generic over these
declarations, and :meth:`Step.track` says what the op does to the processes
and regions that exist (the loader refuses a step on a region that is not
mapped).  The host backend forwards every op whose ``runs_in`` is ``"agent"``
to the scenario process unchanged; the agent runs it as ``op_<name>`` with
the step's fields as keyword arguments.  Adding an op: see docs/scenarios.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from ..metrics import SET_TUNABLE_NAMES
from .patterns import Pattern, write_byte_values

Advice = Literal["mergeable", "unmergeable", "dontneed", "free", "dontfork", "wipeonfork",
                 "cold", "pageout"]
ADVICES: tuple[str, ...] = ("mergeable", "unmergeable", "dontneed",
                            # MADV_FREE, MADV_DONTFORK, MADV_WIPEONFORK,
                            # MADV_COLD, MADV_PAGEOUT (README "Ops")
                            "free", "dontfork", "wipeonfork", "cold", "pageout")
MAIN = "main"
#: the largest NUMA node a region may be bound to (op mmap, ``node``): the
#: agent's mbind() nodemask is one unsigned long
MAX_NUMA_NODE = 63
#: the most pages one region can have: x86-64's 47-bit user address space
#: (128 TiB) in 4 KiB pages; a larger mmap can never succeed
MAX_REGION_PAGES = (1 << 47) // 4096


# -- how a field is written in a scenario file -----------------------------------

#: field kinds the loader parses and the serialiser writes (loader._PARSERS)
Kind = Literal["int", "bool", "choice", "pattern", "region", "new_region", "range", "range_end",
               "new_proc", "metrics", "tunable", "tunable_value"]


@dataclass(frozen=True)
class Field:
    """One op field as a scenario file has it.

    ``range`` reads the key ``range = [first, end]`` into the attribute it is
    declared on and the next one (``range_end``); ``metrics`` takes every key
    of the step besides ``op`` and ``proc`` (the ``expect`` table).
    """

    kind: Kind
    #: TOML key; None: the attribute's name
    key: str | None = None
    required: bool = True
    #: for ``int``: the smallest and largest value; ``too_big`` is the message
    #: above ``maximum`` ({value} and {maximum} are filled in)
    minimum: int | None = None
    maximum: int | None = None
    too_big: str = ""
    #: for ``choice``: the values, and the word for them in messages
    choices: tuple[str, ...] = ()
    what: str = ""


def spec(kind: Kind, *, default: Any = dataclasses.MISSING, optional: bool = False,
         **how: Any) -> Any:
    """A dataclass field declared with how the scenario file writes it; a
    field with a default (or ``optional``: the loader fills it in) may be
    left out of the file."""
    required = default is dataclasses.MISSING and not optional
    return field(default=default, metadata={"toml": Field(kind, required=required, **how)})


def toml_fields(cls: type) -> list[tuple[str, Field]]:
    """(attribute, declaration) of every op field, in declaration order."""
    return [(f.name, f.metadata["toml"]) for f in dataclasses.fields(cls) if "toml" in f.metadata]


def toml_key(attr: str, decl: Field) -> str:
    return decl.key or attr


def region_field() -> Any:
    return spec("region")


def range_first() -> Any:
    """``first`` of the optional ``range = [first, end]`` (default: the whole
    region, so it follows a region field); :func:`range_end` declares ``end``."""
    return spec("range", key="range", optional=True)


def range_end() -> Any:
    return spec("range_end", key="range", optional=True)


# -- KSM settings ------------------------------------------------------------------

def setting(default: Any, *, minimum: int | None = None, why: str = "") -> Any:
    return field(default=default, metadata={"minimum": minimum, "why": why})


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
    """The ``[ksm]`` table: tunables held for the whole scenario (the type of
    each comes from its default; the loader and serialiser read these fields)."""

    use_zero_pages: bool = False
    max_page_sharing: int = setting(256, minimum=2, why="the kernel refuses smaller values")
    smart_scan: bool = True
    merge_across_nodes: bool = True
    #: 0: stale dups of a chain are pruned on every stable-tree walk (what
    #: stepping always did); see ``prune_regime`` and docs/stepping.md for
    #: the other values the modelled prune clock accepts
    stable_node_chains_prune_millisecs: int = 0
    #: the scan-time advisor (6.8, 4e5fa4f5eff6 and 66790e9a735b): "none", or
    #: "scan-time", which hands pages_to_scan to the advisor for the whole
    #: scenario (ksmbench.emulator.advisor; docs/stepping.md "The advisor").
    #: The advisor_* values are written before advisor_mode, whose switch
    #: from none sets pages_to_scan to advisor_min_pages_to_scan
    advisor_mode: str = "none"
    advisor_max_cpu: int = setting(70, minimum=0,
                                   why="advisor_max_cpu_store() takes an unsigned number")
    advisor_min_pages_to_scan: int = setting(
        500, minimum=1, why="ksmd would scan no page per batch and never finish a scan")
    advisor_max_pages_to_scan: int = setting(
        30000, minimum=1, why="ksmd would scan no page per batch and never finish a scan")
    advisor_target_scan_time: int = setting(200, minimum=1,
                                            why="advisor_target_scan_time_store() refuses 0")

    @property
    def advisor(self) -> bool:
        return self.advisor_mode == "scan-time"


#: advisor_mode values a scenario may hold (advisor_mode_store())
ADVISOR_MODES = ("none", "scan-time")
#: the advisor's knobs (66790e9a735b), written before advisor_mode
ADVISOR_KNOBS = ("advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                 "advisor_target_scan_time")
#: the one feature (kernel.features, emulator profile flag) the advisor needs
ADVISOR_FEATURE = ("advisor", "the KSM scan-time advisor (6.8)")


# -- processes and regions, as steps change them ------------------------------------

class PageRuns:
    """A region's pages as runs [first, end) of equal VMA attributes (prot,
    dontfork, wipeonfork, absent, VM_MERGEABLE as madvise and prctl set it,
    and uffd: registered with userfaultfd by uffd_wp, in this process or the
    parent it was forked from, whose split the child's copy keeps; vma: see
    :meth:`pin`): each splits VMAs; regions can be far too large for a list
    per page."""

    DEFAULT = (("prot", "read-write"), ("dontfork", False), ("wipeonfork", False),
               ("absent", False), ("mergeable", False), ("uffd", False), ("vma", 0))

    def __init__(self, pages: int, attrs: tuple = DEFAULT):
        self.runs: list[list] = [[0, pages, attrs]]

    def _split(self, at: int) -> None:
        for i, (lo, hi, attrs) in enumerate(self.runs):
            if lo < at < hi:
                self.runs[i:i + 1] = [[lo, at, attrs], [at, hi, attrs]]
                return

    def set(self, first: int, end: int, key: str, value: Any) -> None:
        self._split(first)
        self._split(end)
        for run in self.runs:
            if first <= run[0] and run[1] <= end:
                run[2] = tuple((k, value if k == key else v) for k, v in run[2])

    def any(self, first: int, end: int, key: str, *values: Any) -> bool:
        return any(dict(attrs)[key] in values for lo, hi, attrs in self.runs
                   if lo < end and first < hi)

    def uniform(self) -> bool:
        return len({attrs for _, _, attrs in self.runs}) == 1

    def pin(self) -> None:
        """Keep today's VMAs apart even when their attributes become equal:
        prctl(PR_SET_MEMORY_MERGE) sets VM_MERGEABLE on each VMA in place,
        without vma_merge() (found by a random run: mremap EFAULT)."""
        if not self.uniform():
            for run in self.runs:
                run[2] = tuple((k, run[0] if k == "vma" else v) for k, v in run[2])

    def forked(self) -> "PageRuns":
        """The child's copy: pages of a VM_DONTCOPY run are absent there."""
        out = PageRuns(0)
        out.runs = [[lo, hi, tuple((k, v or dict(attrs)["dontfork"]) if k == "absent" else (k, v)
                                   for k, v in attrs)] for lo, hi, attrs in self.runs]
        return out

    def resized(self, pages: int) -> "PageRuns":
        """mremap in place: shrinking drops the tail, growing extends the last run."""
        out = PageRuns(0)
        out.runs = [[lo, min(hi, pages), attrs] for lo, hi, attrs in self.runs if lo < pages]
        out.runs[-1][1] = pages
        return out



class World:
    """Which processes live and which regions each maps, walked step by step
    (the loader validates against it, the serialiser and generator read it).
    Its updates take the steps as given: the loader checks them first, and
    the serialiser also writes scenarios (shrink candidates) that the loader
    will refuse."""

    def __init__(self) -> None:
        #: live processes -> their regions (name -> pages)
        self.procs: dict[str, dict[str, int]] = {MAIN: {}}
        self.ever_procs: set[str] = {MAIN}
        #: the largest size of every region that ever existed, by (proc, region)
        self.all_regions: dict[tuple[str, str], int] = {}
        #: (proc, region) -> page ranges write-protected with userfaultfd (op
        #: uffd_wp); a forked child's copy is not protected: without
        #: UFFD_FEATURE_EVENT_FORK fork drops the registration
        self.write_protected: dict[tuple[str, str], list[tuple[int, int]]] = {}
        #: what decides which ops a page allows: its VMA's attributes, by (proc, region)
        self.vmas: dict[tuple[str, str], PageRuns] = {}
        #: per process, the region placed last (the only one that can grow in
        #: place: the agent places regions upwards, see backends/agent.py)
        self.top: dict[str, str | None] = {MAIN: None}

    def map(self, proc: str, region: str, pages: int) -> None:
        self._size(proc, region, pages)
        self.vmas[(proc, region)] = PageRuns(pages)
        self.top[proc] = region

    def _size(self, proc: str, region: str, pages: int) -> None:
        self.procs.setdefault(proc, {})[region] = pages
        self.all_regions[(proc, region)] = max(pages, self.all_regions.get((proc, region), 0))

    def runs(self, proc: str, region: str) -> PageRuns:
        """The region's VMA attributes; for a region ``proc`` does not map, a
        throwaway (the serialiser tracks shrink candidates the loader refuses)."""
        return self.vmas.get((proc, region)) or PageRuns(0)

    def remap(self, proc: str, region: str, pages: int, move: bool) -> None:
        """mremap: a moved region is one VMA at the top; in place, shrinking
        drops the tail and growing extends the last run."""
        runs = self.runs(proc, region)
        if move:
            self.vmas[(proc, region)] = PageRuns(pages, runs.runs[0][2])
            self.top[proc] = region
        else:
            self.vmas[(proc, region)] = runs.resized(pages)
        self._size(proc, region, pages)

    def unmap(self, proc: str, region: str) -> None:
        self.procs.get(proc, {}).pop(region, None)
        self.write_protected.pop((proc, region), None)
        self.vmas.pop((proc, region), None)
        if self.top.get(proc) == region:
            self.top[proc] = None

    def exec(self, proc: str) -> None:
        """execve() replaces the mm: the process keeps its name, not its regions."""
        self._forget_write_protection(proc)
        for region in self.procs.get(proc, {}):
            self.vmas.pop((proc, region), None)
        self.procs[proc] = {}
        self.top[proc] = None

    def write_blocked(self, proc: str, region: str, first: int, end: int) -> str | None:
        """Why a write to pages [first, end) would block (userfaultfd write
        protection with no handler, which ksmbench does not run), or None."""
        for lo, hi in self.write_protected.get((proc, region), ()):
            if lo < end and first < hi:
                return (f"pages [{max(lo, first)}, {min(hi, end)}) of region '{region}' are "
                        f"write-protected with userfaultfd (op uffd_wp) in process '{proc}': a "
                        "write would block; write before protecting, or in a forked child")
        return None

    def access_problem(self, proc: str, region: str, first: int, end: int,
                       prot: str | None) -> tuple[str, str] | None:
        """Why an op cannot touch pages [first, end): pages a fork did not copy
        (MADV_DONTFORK), or, for ``prot``, pages whose protection lacks it (the
        agent would die of SIGSEGV); None when it can."""
        runs = self.vmas[(proc, region)]
        if runs.any(first, end, "absent", True):
            return ("range", f"pages of [{first}, {end}) are not mapped in process '{proc}' "
                    "(MADV_DONTFORK kept them out of the fork)")
        if prot == "read-write" and runs.any(first, end, "prot", "none", "read"):
            return ("range", f"pages of [{first}, {end}) are not writable (mprotect); "
                    "write_byte writes through /proc/self/mem, fill cannot")
        if prot == "read" and runs.any(first, end, "prot", "none"):
            return ("range", f"pages of [{first}, {end}) are PROT_NONE (mprotect)")
        return None

    def _forget_write_protection(self, proc: str) -> None:
        for key in [k for k in self.write_protected if k[0] == proc]:
            del self.write_protected[key]

    def fork(self, parent: str, child: str) -> None:
        self.procs[child] = dict(self.procs.get(parent, {}))
        self.ever_procs.add(child)
        self.top[child] = self.top.get(parent)
        for region in self.procs[child]:
            # dup_mmap() copies no VM_DONTCOPY VMA (MADV_DONTFORK)
            self.vmas[(child, region)] = self.runs(parent, region).forked()
        for region, pages in self.procs[child].items():
            self.all_regions[(child, region)] = pages

    def exit(self, proc: str) -> None:
        self._forget_write_protection(proc)
        self.procs.pop(proc, None)


# -- the op table ----------------------------------------------------------------------

OP_NAMES: dict[type, str] = {}
OPS: dict[str, type] = {}


def op(name: str):
    """Register an op class under its name in the scenario format."""
    def register(cls: type) -> type:
        OP_NAMES[cls] = name
        OPS[name] = cls
        return cls
    return register


@dataclass(frozen=True)
class Step:
    index: int
    proc: str

    #: where the op happens: "agent" (the scenario process runs ``op_<name>``
    #: with the step's fields; the host backend forwards it unchanged),
    #: "controller" (the backend itself: ksmd, process lifecycle), or
    #: "runner" (nothing runs; expect is judged by the runner)
    runs_in: ClassVar[str] = "agent"
    #: whether ``proc`` must be a live process (False for KSM-wide ops)
    needs_proc: ClassVar[bool] = True
    #: (kernel feature, what it is) the op needs: a feature name of
    #: ksmbench.kernel.features.detect() and of the emulator profiles; a
    #: kernel without it refuses the scenario (the emulator stops there too)
    requires: ClassVar[tuple[str, str] | None] = None
    #: TOML keys that may not stand together in one step, and the message
    exclusive: ClassVar[tuple[tuple[str, ...], str] | None] = None

    @property
    def op(self) -> str:
        return OP_NAMES[type(self)]

    def fields(self) -> dict[str, Any]:
        """The op's own fields by name (what the agent's ``op_<name>`` gets)."""
        return {attr: getattr(self, attr) for attr, _ in toml_fields(type(self))}

    def track(self, world: World) -> None:
        """What this step does to the processes and regions that exist."""

    def problem(self, world: World) -> tuple[str, str] | None:
        """A rule across fields that their kinds cannot state, checked by the
        loader after the fields: (TOML key, message), or None when valid.
        ``world``: before the step."""
        return None


@op("mmap")
@dataclass(frozen=True)
class Mmap(Step):
    region: str = spec("new_region")
    pages: int = spec("int", minimum=1, maximum=MAX_REGION_PAGES,
                      too_big="{value} pages is more than a 47-bit user address space "
                              "holds (at most {maximum})")
    thp: bool = spec("bool", default=False)
    #: NUMA node the region's pages are bound to (mbind(MPOL_BIND) before any
    #: page is faulted in); None: the default policy (the local node).  A
    #: kernel without that node makes the scenario not applicable.
    node: int | None = spec("int", default=None, minimum=0, maximum=MAX_NUMA_NODE,
                            too_big="node {value} is past the largest NUMA node id "
                                    "ksmbench binds to ({maximum})")

    def track(self, world: World) -> None:
        world.map(self.proc, self.region, self.pages)


@op("fill")
@dataclass(frozen=True)
class Fill(Step):
    region: str = region_field()
    first: int = range_first()
    end: int = range_end()
    pattern: Pattern = spec("pattern")

    def problem(self, world: World) -> tuple[str, str] | None:
        blocked = world.write_blocked(self.proc, self.region, self.first, self.end)
        if blocked:
            return ("range", blocked)
        return world.access_problem(self.proc, self.region, self.first, self.end, "read-write")


@op("read")
@dataclass(frozen=True)
class Read(Step):
    region: str = region_field()
    first: int = range_first()
    end: int = range_end()

    def problem(self, world: World) -> tuple[str, str] | None:
        return world.access_problem(self.proc, self.region, self.first, self.end, "read")


@op("madvise")
@dataclass(frozen=True)
class Madvise(Step):
    region: str = region_field()
    first: int = range_first()
    end: int = range_end()
    advice: str = spec("choice", choices=ADVICES, what="advice")

    def problem(self, world: World) -> tuple[str, str] | None:
        return world.access_problem(self.proc, self.region, self.first, self.end, None)

    def track(self, world: World) -> None:
        runs = world.runs(self.proc, self.region)
        if self.advice in ("dontfork", "wipeonfork"):
            runs.set(self.first, self.end, self.advice, True)
        elif self.advice in ("mergeable", "unmergeable"):
            runs.set(self.first, self.end, "mergeable", self.advice == "mergeable")


@op("prctl")
@dataclass(frozen=True)
class Prctl(Step):
    requires: ClassVar[tuple[str, str] | None] = (
        "prctl_memory_merge", "PR_SET_MEMORY_MERGE (Linux 6.4, d7597f59d1d3)")
    merge: bool = spec("bool")

    def track(self, world: World) -> None:
        for region, pages in world.procs.get(self.proc, {}).items():  # every VMA changes
            runs = world.runs(self.proc, region)
            runs.pin()
            runs.set(0, pages, "mergeable", self.merge)


@op("scan")
@dataclass(frozen=True)
class Scan(Step):
    runs_in: ClassVar[str] = "controller"
    needs_proc: ClassVar[bool] = False
    exclusive: ClassVar[tuple[tuple[str, ...], str] | None] = (
        ("count", "pages"), "op 'scan' takes count (full scans) or pages (one partial batch), "
                            "not both")
    #: full scans, each observed (1 where the key is left out)
    count: int = spec("int", default=1, minimum=1)
    #: a partial batch: ksmd runs one batch of ``pages`` pages (ksm_do_scan()
    #: with scan_npages = pages) instead of ``count`` full scans; it stops
    #: early where a full scan completes.  ``count`` is then 1.
    pages: int | None = spec("int", default=None, minimum=1)


# -- op "set": one KSM tunable changed between steps ---------------------------------
#: tunables a ``set`` step may change, and the type of their value
SET_TUNABLES: dict[str, type] = {
    "use_zero_pages": bool,
    "max_page_sharing": int,
    "smart_scan": bool,
    "merge_across_nodes": bool,
}
# the set step's observation names them (metrics.tunable_metric)
assert tuple(SET_TUNABLES) == SET_TUNABLE_NAMES
#: tunables a scenario may not change with "set", and why
SET_REFUSED: dict[str, str] = {
    "pages_to_scan": "is owned by the scan stepper (for a partial batch use "
                     "op = \"scan\" with pages = N)",
    "sleep_millisecs": "is owned by the scan stepper, which parks ksmd with it",
    "run": "is owned by the scan stepper (use op = \"unmerge_all\" for run=2)",
    "stable_node_chains_prune_millisecs": "is held for the whole scenario: set it in [ksm]",
    "advisor_mode": "is held for the whole scenario: set it in [ksm] (advisor_mode = \"scan-time\")",
}


@op("set")
@dataclass(frozen=True)
class Set(Step):
    """Write ``value`` to /sys/kernel/mm/ksm/<tunable>.  The kernel may refuse
    (max_page_sharing and merge_across_nodes: -EBUSY while KSM pages exist);
    the step's observation records what it did (``set.error``, ``tunable.*``)."""

    runs_in: ClassVar[str] = "controller"
    needs_proc: ClassVar[bool] = False
    tunable: str = spec("tunable")
    #: booleans as 0/1, as sysfs prints them (the file writes true/false)
    value: int = spec("tunable_value")


@op("unmerge_all")
@dataclass(frozen=True)
class UnmergeAll(Step):
    runs_in: ClassVar[str] = "controller"
    needs_proc: ClassVar[bool] = False


@op("fork")
@dataclass(frozen=True)
class Fork(Step):
    runs_in: ClassVar[str] = "controller"
    child: str = spec("new_proc")

    def track(self, world: World) -> None:
        world.fork(self.proc, self.child)


@op("exit")
@dataclass(frozen=True)
class Exit(Step):
    runs_in: ClassVar[str] = "controller"

    def track(self, world: World) -> None:
        world.exit(self.proc)


@op("munmap")
@dataclass(frozen=True)
class Munmap(Step):
    region: str = region_field()

    def track(self, world: World) -> None:
        world.unmap(self.proc, self.region)


@op("expect")
@dataclass(frozen=True)
class Expect(Step):
    runs_in: ClassVar[str] = "runner"
    needs_proc: ClassVar[bool] = False
    #: metric name -> expected value (None: the kernel must lack the counter)
    values: tuple[tuple[str, int | None], ...] = spec("metrics")

    def check(self, observed: dict[str, int | None]) -> list[tuple[str, int | None, int | None, bool]]:
        """(metric, expected, observed, holds) for each value, against this
        step's observation; a counter the kernel lacks is None, and holds only
        where None is expected."""
        return [(metric, expected, observed.get(metric), observed.get(metric) == expected)
                for metric, expected in self.values]


@op("exec")
@dataclass(frozen=True)
class Exec(Step):
    """``proc`` re-executes its program (execve): every region is gone, the
    process keeps its name and pid, and keeps what the kernel carries across
    exec (MMF_VM_MERGE_ANY since 6.7, 3c6f33b7273a).  The host runs it itself:
    a new interpreter starts, which is slow under TCG."""

    runs_in: ClassVar[str] = "controller"

    def track(self, world: World) -> None:
        world.exec(self.proc)


@op("uffd_wp")
@dataclass(frozen=True)
class UffdWp(Step):
    """Register pages [first, end) of a region with ``proc``'s userfaultfd in
    write-protect mode and write-protect them (UFFDIO_REGISTER_MODE_WP,
    UFFDIO_WRITEPROTECT).  Writes to them would block, so the loader refuses
    them in that process for as long as the region stays mapped."""

    region: str = region_field()
    first: int = range_first()
    end: int = range_end()

    def track(self, world: World) -> None:
        world.write_protected.setdefault((self.proc, self.region), []).append(
            (self.first, self.end))
        # UFFDIO_REGISTER on part of a VMA splits it (mremap cannot move or grow it then)
        world.runs(self.proc, self.region).set(self.first, self.end, "uffd", True)


#: mprotect() protections a scenario can ask for
PROTS: tuple[str, ...] = ("none", "read", "read-write")


@op("mprotect")
@dataclass(frozen=True)
class Mprotect(Step):
    """mprotect() on pages [first, end) of a region (a range splits the VMA)."""

    region: str = region_field()
    first: int = range_first()
    end: int = range_end()
    prot: str = spec("choice", choices=PROTS, what="prot")

    def problem(self, world: World) -> tuple[str, str] | None:
        return world.access_problem(self.proc, self.region, self.first, self.end, None)

    def track(self, world: World) -> None:
        world.runs(self.proc, self.region).set(self.first, self.end, "prot", self.prot)


@op("mremap")
@dataclass(frozen=True)
class Mremap(Step):
    """Grow or shrink a region in place, or move it (MREMAP_MAYMOVE|MREMAP_FIXED)."""

    region: str = region_field()
    #: the region's new size in pages
    pages: int = spec("int", minimum=1, maximum=MAX_REGION_PAGES,
                      too_big="{value} pages is more than a 47-bit user address space "
                              "holds (at most {maximum})")
    #: True: move the region to a new address; False: grow or shrink in place
    move: bool = spec("bool", default=False)

    def problem(self, world: World) -> tuple[str, str] | None:
        old = world.procs[self.proc][self.region]
        runs = world.vmas[(self.proc, self.region)]
        if (self.move or self.pages > old) and not runs.uniform():
            # vma_to_resize()/mremap_to(): the old range must be one VMA
            return ("region", f"region '{self.region}' is split into several VMAs (mprotect or "
                    "madvise on part of it); mremap can only move or grow one VMA")
        if self.pages > old and not self.move and world.top.get(self.proc) != self.region:
            return ("pages", f"region '{self.region}' cannot grow in place: a later region "
                    "follows it; use move = true")
        return None

    def track(self, world: World) -> None:
        world.remap(self.proc, self.region, self.pages, self.move)


@op("write_byte")
@dataclass(frozen=True)
class WriteByte(Step):
    """Byte 0 of each page of [first, end) written through /proc/self/mem
    (FOLL_FORCE, so under any protection)."""

    region: str = region_field()
    first: int = spec("range", key="range")
    end: int = spec("range_end", key="range")
    #: gives the byte written at offset 0 of each page (patterns.write_byte_values)
    pattern: Pattern = spec("pattern")

    def problem(self, world: World) -> tuple[str, str] | None:
        try:
            write_byte_values(self.pattern, 0)
        except ValueError as exc:
            return ("pattern", str(exc))
        blocked = world.write_blocked(self.proc, self.region, self.first, self.end)
        if blocked:
            return ("range", blocked)
        return world.access_problem(self.proc, self.region, self.first, self.end, None)


@op("reclaim")
@dataclass(frozen=True)
class Reclaim(Step):
    """Reclaim every page the scenario's processes have that the kernel can
    reclaim: the backend writes more than they hold to ``memory.reclaim`` of
    the memory cgroup it put them in.  With swap (the scenario needs
    ``swap = true``: the loader says so) every anonymous folio goes, KSM pages
    and pages shared after fork included (README "Swap")."""

    runs_in: ClassVar[str] = "controller"
    needs_proc: ClassVar[bool] = False


AnyStep = Union[Mmap, Fill, Read, Madvise, Prctl, Scan, UnmergeAll, Fork, Exit, Munmap, Expect, Set,
                Exec, UffdWp, Mprotect, Mremap, WriteByte, Reclaim]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    ksm: KsmSettings
    steps: tuple[AnyStep, ...]
    #: top-level ``swap = true``: the scenario runs with a swap device, so
    #: ``madvise pageout`` swaps anonymous pages out (README "Swap"); a
    #: machine without one reports it not applicable.  False (v1 files): it
    #: runs without swap, as it always did
    swap: bool = False
    #: where it was loaded from (a path, or "<suite>/name.toml"), for messages
    source: str = "<memory>"
    #: region sizes in pages, by (proc, region), as known after validation
    region_pages: dict[tuple[str, str], int] = field(default_factory=dict, compare=False)

    @property
    def scan_count(self) -> int:
        return sum(s.count for s in self.steps if isinstance(s, Scan))

    @property
    def numa_nodes(self) -> int:
        """How many NUMA nodes the scenario needs: one more than the highest
        node a region is bound to (op mmap, ``node``), else 1."""
        return 1 + max((s.node for s in self.steps if isinstance(s, Mmap) and s.node is not None),
                       default=0)

    @property
    def max_pages(self) -> int:
        """Upper bound of pages mapped at once (for sizing timeouts)."""
        return sum(self.region_pages.values()) or 1


# -- THP regions: the ops the emulator's THP model covers ----------------------------------

#: madvise advices the THP model covers in a THP region
THP_ADVICES = ("mergeable", "unmergeable")


class ThpRegions:
    """Which regions are THP regions (``thp = true``), walked step by step,
    and whether a step takes them outside the emulator's THP model.

    The model covers what a THP region goes through with writes (fill,
    write_byte), MADV_MERGEABLE/UNMERGEABLE, scans, set, run=2, prctl, munmap,
    exec and exit: huge pages come only from first-touch write faults and go
    only by KSM's split or a whole zap.  It leaves out read faults (the huge
    zero page), the other madvise advices (partial zaps: a PMD split, and a
    deferred split the shrinker does when memory runs short), mprotect, mremap
    and uffd_wp (PMD splits at new VMA edges), fork (a THP shared by two
    mms, CoW of a PMD-mapped page) and reclaim (a THP is split or swapped
    whole, as the swap device allows).
    """

    def __init__(self) -> None:
        self.regions: set[tuple[str, str]] = set()

    def outside(self, step: "Step") -> str | None:
        """Why ``step`` leaves the THP model (before :meth:`track`), or None."""
        if isinstance(step, Fork) and any(p == step.proc for p, _ in self.regions):
            return f"step {step.index}: fork of a process with a THP region"
        if isinstance(step, Reclaim) and self.regions:
            return f"step {step.index}: reclaim with a THP region mapped"
        region = getattr(step, "region", None)
        if region is None or (step.proc, region) not in self.regions or isinstance(step, Mmap):
            return None
        if isinstance(step, (Read, Mprotect, Mremap, UffdWp)) or (
                isinstance(step, Madvise) and step.advice not in THP_ADVICES):
            return f"step {step.index}: {step.op} on THP region '{region}'"
        return None

    def track(self, step: "Step") -> None:
        if isinstance(step, Mmap):
            if step.thp:
                self.regions.add((step.proc, step.region))
            else:
                self.regions.discard((step.proc, step.region))
        elif isinstance(step, Munmap):
            self.regions.discard((step.proc, step.region))
        elif isinstance(step, (Exec, Exit)):
            self.regions = {(p, r) for p, r in self.regions if p != step.proc}


def has_reclaim(steps) -> bool:
    """Whether a scenario reclaims (op ``reclaim``): it then needs a memory
    cgroup and the multi-gen LRU, and a cell of the Not modelled list
    (ksmbench.metrics.UNMODELLED) depends on it."""
    return any(isinstance(step, Reclaim) for step in steps)


def thp_outside_model(steps) -> str | None:
    """The first step that takes a THP region outside the emulator's THP
    model (:class:`ThpRegions`), described, or None."""
    thp = ThpRegions()
    for step in steps:
        why = thp.outside(step)
        if why is not None:
            return why
        thp.track(step)
    return None
