"""Loading and validating v1 scenario files.

Every problem becomes one :class:`~ksmbench.errors.ScenarioError` naming the
file, the 0-based step index and the field.  Validation also walks the steps
in order, tracking which processes and regions exist, so that a step using a
region that was never mapped (or a process that already exited) is refused
before anything runs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from ..metrics import parse_metric
from . import model as m
from .patterns import parse_pattern, write_byte_values

NAME_RE = re.compile(r"[a-z0-9-]+\Z")
IDENT_RE = re.compile(r"[A-Za-z0-9_-]+\Z")

_KSM_FIELDS = {
    "use_zero_pages": bool,
    "max_page_sharing": int,
    "smart_scan": bool,
    "merge_across_nodes": bool,
}
_TOP_FIELDS = {"name", "description", "ksm", "step"}
#: fields each op accepts besides ``op`` and ``proc``: name -> required?
_OP_FIELDS: dict[str, dict[str, bool]] = {
    "mmap": {"region": True, "pages": True, "thp": False},
    "fill": {"region": True, "range": False, "pattern": True},
    "read": {"region": True, "range": False},
    "madvise": {"region": True, "range": False, "advice": True},
    "prctl": {"merge": True},
    "scan": {"count": True},
    "unmerge_all": {},
    "fork": {"child": True},
    "exit": {},
    "munmap": {"region": True},
    # vma-ops (README "Ops")
    "mprotect": {"region": True, "range": False, "prot": True},
    "mremap": {"region": True, "pages": True, "move": False},
    "write_byte": {"region": True, "range": True, "pattern": True},
}
#: the most pages one region can have: x86-64's 47-bit user address space
#: (128 TiB) in 4 KiB pages; a larger mmap can never succeed
MAX_REGION_PAGES = (1 << 47) // 4096
#: how an expected value says "the kernel must not provide this counter"
ABSENT_WORDS = ("none", "absent", "null")


def load_scenario(path: str | Path, *, source: str | None = None) -> m.Scenario:
    """Read and validate one scenario file."""
    path = Path(path)
    label = source or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(label, "no such file") from None
    except IsADirectoryError:
        raise ScenarioError(label, "is a directory, not a scenario file") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(label, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ScenarioError(label, f"cannot be read: {exc.strerror}") from None
    return parse_scenario(text, source=label)


def parse_scenario(text: str, *, source: str = "<string>") -> m.Scenario:
    """Parse and validate scenario TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, f"not valid TOML: {exc}") from None
    return scenario_from_dict(data, source=source)


def scenario_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> m.Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(source, "the top level must be a table")
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise ScenarioError(source, f"unknown top-level key '{unknown[0]}' "
                            f"(allowed: {', '.join(sorted(_TOP_FIELDS))})", field=unknown[0])
    name = data.get("name")
    if name is None:
        raise ScenarioError(source, "missing required key", field="name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ScenarioError(source, f"must match [a-z0-9-]+, got {name!r}", field="name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(source, "must be a string", field="description")
    ksm = _parse_ksm(data.get("ksm", {}), source)
    raw_steps = data.get("step")
    if raw_steps is None:
        raise ScenarioError(source, "no steps: add at least one [[step]] table", field="step")
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise ScenarioError(source, "must be an array of tables ([[step]])", field="step")
    if not raw_steps:
        raise ScenarioError(source, "no steps: add at least one [[step]] table", field="step")
    validator = _StepValidator(source)
    steps = tuple(validator.step(i, raw) for i, raw in enumerate(raw_steps))
    return m.Scenario(name=name, description=description, ksm=ksm, steps=steps,
                      source=source, region_pages=dict(validator.all_regions))


def _parse_ksm(raw: Any, source: str) -> m.KsmSettings:
    if not isinstance(raw, dict):
        raise ScenarioError(source, "must be a table", field="ksm")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        want = _KSM_FIELDS.get(key)
        if want is None:
            raise ScenarioError(source, f"unknown tunable (allowed: {', '.join(_KSM_FIELDS)})",
                                field=f"ksm.{key}")
        if not _is_type(value, want):
            raise ScenarioError(source, f"must be {_type_word(want)}, got {value!r}",
                                field=f"ksm.{key}")
        values[key] = value
    if values.get("max_page_sharing", 256) < 2:
        raise ScenarioError(source, "must be at least 2 (the kernel refuses smaller values)",
                            field="ksm.max_page_sharing")
    return m.KsmSettings(**values)


def _is_type(value: Any, want: type) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _type_word(want: type) -> str:
    return {bool: "true or false", int: "an integer", str: "a string"}[want]


class _StepValidator:
    """Checks steps in order against the processes and regions that exist."""

    def __init__(self, source: str):
        self.source = source
        #: live processes -> their regions (name -> pages)
        self.procs: dict[str, dict[str, int]] = {m.MAIN: {}}
        self.ever_procs: set[str] = {m.MAIN}
        self.all_regions: dict[tuple[str, str], int] = {}
        #: vma-ops: page attributes that decide which ops a page allows
        self.vmas: dict[tuple[str, str], _Runs] = {}
        #: vma-ops: per process, the region placed last (the only one that
        #: can grow in place: the agent places regions upwards, see agent.py)
        self.top: dict[str, str | None] = {m.MAIN: None}

    def fail(self, index: int, message: str, fieldname: str | None = None) -> ScenarioError:
        return ScenarioError(self.source, message, step=index, field=fieldname)

    def step(self, index: int, raw: dict[str, Any]) -> m.AnyStep:
        op = raw.get("op")
        if op is None:
            raise self.fail(index, "missing required key", "op")
        if not isinstance(op, str) or (op not in _OP_FIELDS and op != "expect"):
            raise self.fail(index, f"unknown op {op!r} (known: {', '.join(m.OPS)})", "op")
        proc = raw.get("proc", m.MAIN)
        if not isinstance(proc, str) or not IDENT_RE.match(proc):
            raise self.fail(index, f"must be a process name ([A-Za-z0-9_-]+), got {proc!r}", "proc")
        if op == "expect":
            return self._expect(index, proc, raw)
        fields = _OP_FIELDS[op]
        for key in raw:
            if key not in fields and key not in ("op", "proc"):
                allowed = ", ".join(["op", "proc", *fields]) 
                raise self.fail(index, f"unknown field for op '{op}' (allowed: {allowed})", key)
        for key, required in fields.items():
            if required and key not in raw:
                raise self.fail(index, f"op '{op}' needs this field", key)
        if op not in ("scan", "unmerge_all"):
            self._need_proc(index, proc)
        return getattr(self, "_" + op)(index, proc, raw)

    # -- helpers ---------------------------------------------------------
    def _need_proc(self, index: int, proc: str) -> None:
        if proc not in self.procs:
            why = "has exited" if proc in self.ever_procs else "does not exist (create it with fork)"
            raise self.fail(index, f"process '{proc}' {why}", "proc")

    def _region(self, index: int, proc: str, raw: dict[str, Any]) -> tuple[str, int]:
        region = raw["region"]
        if not isinstance(region, str) or not IDENT_RE.match(region):
            raise self.fail(index, f"must be a region name ([A-Za-z0-9_-]+), got {region!r}", "region")
        pages = self.procs[proc].get(region)
        if pages is None:
            raise self.fail(index, f"region '{region}' is not mapped in process '{proc}'", "region")
        return region, pages

    def _set_pages(self, proc: str, region: str, pages: int) -> None:
        self.procs[proc][region] = pages
        self.all_regions[(proc, region)] = max(pages, self.all_regions.get((proc, region), 0))

    def _range(self, index: int, raw: dict[str, Any], pages: int) -> tuple[int, int]:
        if "range" not in raw:
            return 0, pages
        rng = raw["range"]
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(_is_type(v, int) for v in rng)):
            raise self.fail(index, f"must be [first, end] (two integers), got {rng!r}", "range")
        first, end = rng
        if not 0 <= first < end <= pages:
            raise self.fail(index, f"[{first}, {end}) is not a non-empty range "
                            f"within the region's {pages} pages", "range")
        return first, end

    def _typed(self, index: int, raw: dict[str, Any], key: str, want: type) -> Any:
        value = raw[key]
        if not _is_type(value, want):
            raise self.fail(index, f"must be {_type_word(want)}, got {value!r}", key)
        return value

    # -- ops -------------------------------------------------------------
    def _mmap(self, index, proc, raw):
        region = raw["region"]
        if not isinstance(region, str) or not IDENT_RE.match(region):
            raise self.fail(index, f"must be a region name ([A-Za-z0-9_-]+), got {region!r}", "region")
        if region in self.procs[proc]:
            raise self.fail(index, f"region '{region}' is already mapped in process '{proc}'", "region")
        pages = self._typed(index, raw, "pages", int)
        if pages < 1:
            raise self.fail(index, f"must be at least 1, got {pages}", "pages")
        if pages > MAX_REGION_PAGES:
            raise self.fail(index, f"{pages} pages is more than a 47-bit user address space "
                            f"holds (at most {MAX_REGION_PAGES})", "pages")
        thp = self._typed(index, raw, "thp", bool) if "thp" in raw else False
        self._set_pages(proc, region, pages)
        self.vmas[(proc, region)] = _Runs(pages)
        self.top[proc] = region
        return m.Mmap(index, proc, region, pages, thp)

    def _fill(self, index, proc, raw):
        region, pages = self._region(index, proc, raw)
        first, end = self._range(index, raw, pages)
        try:
            pattern = parse_pattern(raw["pattern"])
        except ValueError as exc:
            raise self.fail(index, str(exc), "pattern") from None
        self._need_access(index, proc, region, first, end, "read-write")
        return m.Fill(index, proc, region, first, end, pattern)

    def _read(self, index, proc, raw):
        region, pages = self._region(index, proc, raw)
        first, end = self._range(index, raw, pages)
        self._need_access(index, proc, region, first, end, "read")
        return m.Read(index, proc, region, first, end)

    def _madvise(self, index, proc, raw):
        region, pages = self._region(index, proc, raw)
        first, end = self._range(index, raw, pages)
        advice = raw["advice"]
        if advice not in m.ADVICES:
            raise self.fail(index, f"unknown advice {advice!r} (known: {', '.join(m.ADVICES)})", "advice")
        self._need_access(index, proc, region, first, end, None)
        if advice in ("dontfork", "wipeonfork"):
            self.vmas[(proc, region)].set(first, end, advice, True)
        elif advice in ("mergeable", "unmergeable"):
            self.vmas[(proc, region)].set(first, end, "mergeable", advice == "mergeable")
        return m.Madvise(index, proc, region, first, end, advice)

    def _prctl(self, index, proc, raw):
        merge = self._typed(index, raw, "merge", bool)
        for region, pages in self.procs[proc].items():  # vma-ops: every VMA changes
            self.vmas[(proc, region)].set(0, pages, "mergeable", merge)
        return m.Prctl(index, proc, merge)

    def _scan(self, index, proc, raw):
        count = self._typed(index, raw, "count", int)
        if count < 1:
            raise self.fail(index, f"must be at least 1, got {count}", "count")
        return m.Scan(index, proc, count)

    def _unmerge_all(self, index, proc, raw):
        return m.UnmergeAll(index, proc)

    def _fork(self, index, proc, raw):
        child = raw["child"]
        if not isinstance(child, str) or not IDENT_RE.match(child):
            raise self.fail(index, f"must be a process name ([A-Za-z0-9_-]+), got {child!r}", "child")
        if child in self.ever_procs:
            raise self.fail(index, f"process name '{child}' is already used in this scenario", "child")
        self.procs[child] = dict(self.procs[proc])
        self.ever_procs.add(child)
        self.top[child] = self.top[proc]
        for region in self.procs[child]:
            # dup_mmap() copies no VM_DONTCOPY VMA (MADV_DONTFORK)
            self.vmas[(child, region)] = self.vmas[(proc, region)].forked()
        for region, pages in self.procs[child].items():
            self.all_regions[(child, region)] = pages
        return m.Fork(index, proc, child)

    def _exit(self, index, proc, raw):
        del self.procs[proc]
        return m.Exit(index, proc)

    def _munmap(self, index, proc, raw):
        region, _ = self._region(index, proc, raw)
        del self.procs[proc][region]
        if self.top.get(proc) == region:
            self.top[proc] = None
        return m.Munmap(index, proc, region)

    # --- vma-ops: access checks ------------------------------------------------
    def _need_access(self, index: int, proc: str, region: str, first: int, end: int,
                     prot: str | None) -> None:
        """Refuse an op on pages the process cannot touch: pages a fork did not
        copy (MADV_DONTFORK), or, for ``prot``, pages whose protection lacks it
        (the agent would die of SIGSEGV)."""
        runs = self.vmas[(proc, region)]
        if runs.any(first, end, "absent", True):
            raise self.fail(index, f"pages of [{first}, {end}) are not mapped in process "
                            f"'{proc}' (MADV_DONTFORK kept them out of the fork)", "range")
        if prot == "read-write" and runs.any(first, end, "prot", "none", "read"):
            raise self.fail(index, f"pages of [{first}, {end}) are not writable (mprotect); "
                            "write_byte writes through /proc/self/mem, fill cannot", "range")
        if prot == "read" and runs.any(first, end, "prot", "none"):
            raise self.fail(index, f"pages of [{first}, {end}) are PROT_NONE (mprotect)", "range")

    # --- vma-ops: mprotect -----------------------------------------------------
    def _mprotect(self, index, proc, raw):
        region, pages = self._region(index, proc, raw)
        first, end = self._range(index, raw, pages)
        prot = raw["prot"]
        if prot not in m.PROTS:
            raise self.fail(index, f"unknown prot {prot!r} (known: {', '.join(m.PROTS)})", "prot")
        self._need_access(index, proc, region, first, end, None)
        self.vmas[(proc, region)].set(first, end, "prot", prot)
        return m.Mprotect(index, proc, region, first, end, prot)
    # --- end mprotect ----------------------------------------------------------

    # --- vma-ops: mremap -------------------------------------------------------
    def _mremap(self, index, proc, raw):
        region, old = self._region(index, proc, raw)
        pages = self._typed(index, raw, "pages", int)
        move = self._typed(index, raw, "move", bool) if "move" in raw else False
        if not 1 <= pages <= MAX_REGION_PAGES:
            raise self.fail(index, f"must be between 1 and {MAX_REGION_PAGES}, got {pages}", "pages")
        runs = self.vmas[(proc, region)]
        if (move or pages > old) and not runs.uniform():
            # vma_to_resize()/mremap_to(): the old range must be one VMA
            raise self.fail(index, f"region '{region}' is split into several VMAs (mprotect or "
                            "madvise on part of it); mremap can only move or grow one VMA", "region")
        if pages > old and not move and self.top.get(proc) != region:
            raise self.fail(index, f"region '{region}' cannot grow in place: a later region "
                            "follows it; use move = true", "pages")
        if move:
            runs = _Runs(pages, runs.runs[0][2])
            self.top[proc] = region
        else:
            runs = runs.resized(pages)
        self.vmas[(proc, region)] = runs
        self._set_pages(proc, region, pages)
        return m.Mremap(index, proc, region, pages, move)
    # --- end mremap ------------------------------------------------------------

    # --- vma-ops: write_byte ---------------------------------------------------
    def _write_byte(self, index, proc, raw):
        region, pages = self._region(index, proc, raw)
        first, end = self._range(index, raw, pages)
        try:
            pattern = parse_pattern(raw["pattern"])
            write_byte_values(pattern, 0)
        except ValueError as exc:
            raise self.fail(index, str(exc), "pattern") from None
        # through /proc/self/mem (FOLL_FORCE): any protection will do
        self._need_access(index, proc, region, first, end, None)
        return m.WriteByte(index, proc, region, first, end, pattern)
    # --- end write_byte --------------------------------------------------------

    def _expect(self, index, proc, raw):
        table: dict[str, Any] = {}
        for key, value in raw.items():
            if key in ("op", "proc"):
                continue
            if key in ("values", "metrics") and isinstance(value, dict):
                _flatten(value, "", table)
            elif isinstance(value, dict):
                _flatten(value, key + ".", table)
            else:
                table[key] = value
        if not table:
            raise self.fail(index, "op 'expect' needs at least one metric = value", "op")
        values: list[tuple[str, int | None]] = []
        for metric, value in table.items():
            try:
                parsed = parse_metric(metric)
            except ValueError as exc:
                raise self.fail(index, str(exc), metric) from None
            if parsed.proc is not None and parsed.proc not in self.procs:
                raise self.fail(index, f"process '{parsed.proc}' is not running at this step", metric)
            if parsed.region is not None and parsed.region not in self.procs[parsed.proc]:
                raise self.fail(index, f"region '{parsed.region}' is not mapped in "
                                f"process '{parsed.proc}' at this step", metric)
            if isinstance(value, str) and value.lower() in ABSENT_WORDS:
                values.append((metric, None))
            elif _is_type(value, int):
                values.append((metric, value))
            elif isinstance(value, bool):
                values.append((metric, int(value)))
            else:
                raise self.fail(index, f"expected value must be an integer or \"none\", got {value!r}",
                                metric)
        return m.Expect(index, proc, tuple(values))


# --- vma-ops: page attributes per region -----------------------------------------
class _Runs:
    """A region's pages as runs [first, end) of equal attributes (prot,
    dontfork, wipeonfork, absent, and VM_MERGEABLE as madvise and prctl set
    it: each splits VMAs); regions can be far too large for a list per page."""

    DEFAULT = (("prot", "read-write"), ("dontfork", False), ("wipeonfork", False),
               ("absent", False), ("mergeable", False))

    def __init__(self, pages: int, attrs: tuple = DEFAULT):
        self.runs: list[list] = [[0, pages, attrs]]

    def _split(self, at: int) -> None:
        for i, (lo, hi, attrs) in enumerate(self.runs):
            if lo < at < hi:
                self.runs[i:i + 1] = [[lo, at, attrs], [at, hi, attrs]]
                return

    def set(self, first: int, end: int, key: str, value) -> None:
        self._split(first)
        self._split(end)
        for run in self.runs:
            if first <= run[0] and run[1] <= end:
                run[2] = tuple((k, value if k == key else v) for k, v in run[2])

    def any(self, first: int, end: int, key: str, *values) -> bool:
        return any(dict(attrs)[key] in values for lo, hi, attrs in self.runs
                   if lo < end and first < hi)

    def uniform(self) -> bool:
        return len({attrs for _, _, attrs in self.runs}) == 1

    def forked(self) -> "_Runs":
        out = _Runs(0)
        out.runs = [[lo, hi, tuple((k, v or dict(attrs)["dontfork"]) if k == "absent" else (k, v)
                                   for k, v in attrs)] for lo, hi, attrs in self.runs]
        return out

    def resized(self, pages: int) -> "_Runs":
        """mremap in place: shrinking drops the tail, growing extends the last run."""
        out = _Runs(0)
        out.runs = [[lo, min(hi, pages), attrs] for lo, hi, attrs in self.runs if lo < pages]
        out.runs[-1][1] = pages
        return out
# --- end page attributes ---------------------------------------------------------


def _flatten(table: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[prefix + key] = value
