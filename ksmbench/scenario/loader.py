"""Loading and validating v1 scenario files.

Every problem becomes one :class:`~ksmbench.errors.ScenarioError` naming the
file, the 0-based step index and the field.  Validation also walks the steps
in order, tracking which processes and regions exist, so that a step using a
region that was never mapped (or a process that already exited) is refused
before anything runs.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from ..metrics import parse_metric
from . import model as m
from .patterns import parse_pattern

NAME_RE = re.compile(r"[a-z0-9-]+\Z")
IDENT_RE = re.compile(r"[A-Za-z0-9_-]+\Z")

#: the ``[ksm]`` tunables and their types (from the defaults of KsmSettings)
_KSM_FIELDS: dict[str, type] = {f.name: type(f.default) for f in dataclasses.fields(m.KsmSettings)}
_TOP_FIELDS = {"name", "description", "swap", "ksm", "step"}
MAX_REGION_PAGES = m.MAX_REGION_PAGES
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
    swap = data.get("swap", False)
    if not isinstance(swap, bool):
        raise ScenarioError(source, "must be true or false", field="swap")
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
    if ksm.advisor:
        for step in steps:
            if isinstance(step, m.Scan) and step.pages is not None:
                raise ScenarioError(source, "a partial batch writes pages_to_scan, which belongs "
                                    "to the advisor (advisor_mode = \"scan-time\"): use "
                                    "count = N", step=step.index, field="pages")
    for step in steps:
        if isinstance(step, m.Reclaim) and not swap:
            raise ScenarioError(source, "op 'reclaim' needs swap = true at the top level "
                                "(without swap nothing anonymous can be reclaimed)",
                                step=step.index, field="op")
    return m.Scenario(name=name, description=description, ksm=ksm, steps=steps, swap=swap,
                      source=source, region_pages=dict(validator.all_regions))


def op_keys(cls: type) -> dict[str, bool]:
    """The TOML keys an op accepts besides ``op`` and ``proc`` (from the op
    table in model.py): key -> required?"""
    return {m.toml_key(attr, decl): decl.required for attr, decl in m.toml_fields(cls)
            if decl.kind != "metrics"}


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
    for f in dataclasses.fields(m.KsmSettings):
        least = f.metadata.get("minimum")
        if least is not None and values.get(f.name, f.default) < least:
            raise ScenarioError(source, f"must be at least {least} ({f.metadata['why']})",
                                field=f"ksm.{f.name}")
    prune = values.get("stable_node_chains_prune_millisecs", 0)
    if prune < 0 or m.prune_regime(prune) is None:
        low, high = m.PRUNE_PER_BATCH_MS
        raise ScenarioError(source, f"{prune} ms has no deterministic model: use 0 (prune on "
                            f"every walk), {low}..{high} (at most once per ksmd batch) or at "
                            f"least {m.PRUNE_NEVER_MS} (never within a scenario)",
                            field="ksm.stable_node_chains_prune_millisecs")
    mode = values.get("advisor_mode", "none")
    if mode not in m.ADVISOR_MODES:
        raise ScenarioError(source, f"must be one of {', '.join(map(repr, m.ADVISOR_MODES))}, "
                            f"got {mode!r}", field="ksm.advisor_mode")
    if mode == "scan-time" and m.prune_regime(prune) == "per-batch":
        raise ScenarioError(source, "the per-batch prune clock waits before every ksmd batch, "
                            "which would make the advisor's scans take seconds: use 0 or at "
                            f"least {m.PRUNE_NEVER_MS} with advisor_mode = \"scan-time\"",
                            field="ksm.stable_node_chains_prune_millisecs")
    return m.KsmSettings(**values)


def _is_type(value: Any, want: type) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _type_word(want: type) -> str:
    return {bool: "true or false", int: "an integer", str: "a string"}[want]


class _StepValidator:
    """Checks steps in order against the processes and regions that exist.

    Generic over the op table (model.py): each op field is parsed by the
    parser of its declared kind (:data:`_PARSERS`), then the step updates the
    :class:`~ksmbench.scenario.model.World` (``Step.track``).
    """

    def __init__(self, source: str):
        self.source = source
        self.world = m.World()

    @property
    def all_regions(self) -> dict[tuple[str, str], int]:
        return self.world.all_regions

    def fail(self, index: int, message: str, fieldname: str | None = None) -> ScenarioError:
        return ScenarioError(self.source, message, step=index, field=fieldname)

    def step(self, index: int, raw: dict[str, Any]) -> m.AnyStep:
        op = raw.get("op")
        if op is None:
            raise self.fail(index, "missing required key", "op")
        if not isinstance(op, str) or op not in m.OPS:
            raise self.fail(index, f"unknown op {op!r} (known: {', '.join(m.OPS)})", "op")
        proc = raw.get("proc", m.MAIN)
        if not isinstance(proc, str) or not IDENT_RE.match(proc):
            raise self.fail(index, f"must be a process name ([A-Za-z0-9_-]+), got {proc!r}", "proc")
        cls = m.OPS[op]
        decls = m.toml_fields(cls)
        if not any(decl.kind == "metrics" for _, decl in decls):  # expect's keys are metrics
            fields = op_keys(cls)
            for key in raw:
                if key not in fields and key not in ("op", "proc"):
                    allowed = ", ".join(["op", "proc", *fields])
                    raise self.fail(index, f"unknown field for op '{op}' (allowed: {allowed})", key)
            for key, required in fields.items():
                if required and key not in raw:
                    raise self.fail(index, f"op '{op}' needs this field", key)
        if cls.exclusive is not None:
            keys, message = cls.exclusive
            present = [key for key in keys if key in raw]
            if len(present) > 1:
                raise self.fail(index, message, present[0])
        if cls.needs_proc:
            self._need_proc(index, proc)
        values: dict[str, Any] = {}
        for attr, decl in decls:
            key = m.toml_key(attr, decl)
            if decl.kind == "range_end" or (key not in raw and decl.kind in _ABSENT_MEANS_DEFAULT):
                continue  # set with its range / the dataclass default
            values[attr] = _PARSERS[decl.kind](self, index, proc, raw, key, decl, values)
        for (attr, decl), (next_attr, _) in zip(decls, decls[1:]):
            if decl.kind == "range":
                values[attr], values[next_attr] = values[attr]
        step = cls(index, proc, **values)
        problem = step.problem(self.world)
        if problem is not None:
            raise self.fail(index, problem[1], problem[0])
        step.track(self.world)
        return step

    # -- helpers ---------------------------------------------------------
    def _need_proc(self, index: int, proc: str) -> None:
        if proc not in self.world.procs:
            why = ("has exited" if proc in self.world.ever_procs
                   else "does not exist (create it with fork)")
            raise self.fail(index, f"process '{proc}' {why}", "proc")

    def _name(self, index: int, raw: dict[str, Any], key: str, what: str) -> str:
        name = raw[key]
        if not isinstance(name, str) or not IDENT_RE.match(name):
            raise self.fail(index, f"must be a {what} name ([A-Za-z0-9_-]+), got {name!r}", key)
        return name

    # -- one parser per field kind (model.Kind) ----------------------------
    def _int(self, index, proc, raw, key, decl, values):
        value = raw[key]
        if not _is_type(value, int):
            raise self.fail(index, f"must be {_type_word(int)}, got {value!r}", key)
        if decl.minimum is not None and value < decl.minimum:
            raise self.fail(index, f"must be at least {decl.minimum}, got {value}", key)
        if decl.maximum is not None and value > decl.maximum:
            raise self.fail(index, decl.too_big.format(value=value, maximum=decl.maximum), key)
        return value

    def _bool(self, index, proc, raw, key, decl, values):
        value = raw[key]
        if not _is_type(value, bool):
            raise self.fail(index, f"must be {_type_word(bool)}, got {value!r}", key)
        return value

    def _choice(self, index, proc, raw, key, decl, values):
        value = raw[key]
        if value not in decl.choices:
            raise self.fail(index, f"unknown {decl.what} {value!r} "
                            f"(known: {', '.join(decl.choices)})", key)
        return value

    def _pattern(self, index, proc, raw, key, decl, values):
        try:
            return parse_pattern(raw[key])
        except ValueError as exc:
            raise self.fail(index, str(exc), key) from None

    def _region(self, index, proc, raw, key, decl, values):
        region = self._name(index, raw, key, "region")
        if region not in self.world.procs[proc]:
            raise self.fail(index, f"region '{region}' is not mapped in process '{proc}'", key)
        return region

    def _new_region(self, index, proc, raw, key, decl, values):
        region = self._name(index, raw, key, "region")
        if region in self.world.procs[proc]:
            raise self.fail(index, f"region '{region}' is already mapped in process '{proc}'", key)
        return region

    def _range(self, index, proc, raw, key, decl, values) -> tuple[int, int]:
        pages = self.world.procs[proc][values["region"]]
        if key not in raw:
            return 0, pages
        rng = raw[key]
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(_is_type(v, int) for v in rng)):
            raise self.fail(index, f"must be [first, end] (two integers), got {rng!r}", key)
        first, end = rng
        if not 0 <= first < end <= pages:
            raise self.fail(index, f"[{first}, {end}) is not a non-empty range "
                            f"within the region's {pages} pages", key)
        return first, end

    def _new_proc(self, index, proc, raw, key, decl, values):
        child = self._name(index, raw, key, "process")
        if child in self.world.ever_procs:
            raise self.fail(index, f"process name '{child}' is already used in this scenario", key)
        return child

    def _tunable(self, index, proc, raw, key, decl, values):
        tunable = raw[key]
        if not isinstance(tunable, str):
            raise self.fail(index, f"must be a tunable name, got {tunable!r}", key)
        why = m.SET_REFUSED.get(tunable) or (
            "is held for the whole scenario: set it in [ksm]" if tunable.startswith("advisor_")
            else None)
        if why:
            raise self.fail(index, f"tunable '{tunable}' cannot be set by a step: it {why}", key)
        if tunable not in m.SET_TUNABLES:
            raise self.fail(index, f"unknown tunable {tunable!r} (a step may set: "
                            f"{', '.join(m.SET_TUNABLES)})", key)
        return tunable

    def _tunable_value(self, index, proc, raw, key, decl, values):
        """The value of the ``tunable`` parsed just before, typed by that tunable."""
        tunable = values["tunable"]
        want = m.SET_TUNABLES[tunable]
        value = raw[key]
        if not _is_type(value, want):
            raise self.fail(index, f"must be {_type_word(want)}, got {value!r}", key)
        if tunable == "max_page_sharing" and value < 2:
            raise self.fail(index, "must be at least 2 (the kernel refuses smaller values "
                            "with EINVAL)", key)
        return int(value)

    def _metrics(self, index, proc, raw, key, decl, values):
        table: dict[str, Any] = {}
        for name, value in raw.items():
            if name in ("op", "proc"):
                continue
            if name in ("values", "metrics") and isinstance(value, dict):
                _flatten(value, "", table)
            elif isinstance(value, dict):
                _flatten(value, name + ".", table)
            else:
                table[name] = value
        if not table:
            raise self.fail(index, "op 'expect' needs at least one metric = value", "op")
        procs = self.world.procs
        out: list[tuple[str, int | None]] = []
        for metric, value in table.items():
            try:
                parsed = parse_metric(metric)
            except ValueError as exc:
                raise self.fail(index, str(exc), metric) from None
            if parsed.proc is not None and parsed.proc not in procs:
                raise self.fail(index, f"process '{parsed.proc}' is not running at this step", metric)
            if parsed.region is not None and parsed.region not in procs[parsed.proc]:
                raise self.fail(index, f"region '{parsed.region}' is not mapped in "
                                f"process '{parsed.proc}' at this step", metric)
            if isinstance(value, str) and value.lower() in ABSENT_WORDS:
                out.append((metric, None))
            elif _is_type(value, int):
                out.append((metric, value))
            elif isinstance(value, bool):
                out.append((metric, int(value)))
            else:
                raise self.fail(index, f"expected value must be an integer or \"none\", got {value!r}",
                                metric)
        return tuple(out)


#: how each field kind of the op table (model.Kind) is read from a step
_PARSERS = {
    "int": _StepValidator._int,
    "bool": _StepValidator._bool,
    "choice": _StepValidator._choice,
    "pattern": _StepValidator._pattern,
    "region": _StepValidator._region,
    "new_region": _StepValidator._new_region,
    "range": _StepValidator._range,
    "new_proc": _StepValidator._new_proc,
    "metrics": _StepValidator._metrics,
    "tunable": _StepValidator._tunable,
    "tunable_value": _StepValidator._tunable_value,
}
#: kinds whose absent key leaves the dataclass default (a missing range is the
#: whole region, and expect's metrics are not one key: both are always parsed)
_ABSENT_MEANS_DEFAULT = frozenset(_PARSERS) - {"range", "metrics"}


def _flatten(table: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[prefix + key] = value
