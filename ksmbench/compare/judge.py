"""One kernel's observations against another's, cell by cell.

A *cell* is one metric at one observation point of one scenario:
``(scenario, step, scan, metric)``.  Judging a variant (a patched kernel)
against its base (the same source without the patch) puts every cell in one
of three kinds:

* **equal**: the variant's value is the base's (both absent counts as equal);
* **explained**: it differs, and the emulator predicts that difference when
  the base's fitted profile (:func:`ksmbench.compare.identify.analyse`) has the flags
  of ``--expect`` switched: the variant's value is the prediction under the
  expected profile, or differs from the base's by exactly the predicted
  difference;
* **unexplained**: every other difference, including a cell present on one
  side only (a counter or a whole point the other kernel did not report), and
  an expected change that did not happen (the base matched the fitted
  prediction, the expected profile predicts another value, the variant kept
  the base's).

Not compared: ``proc.<p>.rss_anon_pages`` (it includes the Python
interpreter's own memory, which differs from boot to boot by hundreds of
pages: measured on two boots of the same 6.12 image), and
``rss_anon_scenario_pages`` when the base's profile lacks ``rss_exact``
(before 82241a83cd15 /proc/<pid>/status reads the per-cpu counters
approximately).  The counters KSM itself reports are all compared.

The flags a changed variant is blamed on come from fitting the variant's own
observations, starting from the base's fitted profile: the flags that fit
differently are the behaviours the patch changed, as far as the emulator's
flags can say.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from ..errors import UsageError
from ..metrics import metric_sort_key
from ..observation import ObservationPoint
from ..scenario import model as m

Observed = Mapping[str, Sequence[ObservationPoint]]
CellKey = tuple[str, int, "int | None", str]

#: a point or metric one side did not report at all (distinct from a None value)
MISSING = object()

EQUAL, EXPLAINED, UNEXPLAINED = "equal", "explained", "unexplained"


def parse_expect(text: str | None) -> dict[str, bool]:
    """``none`` or ``+flag,-flag,...`` -> {flag: on?}; unknown flags are a UsageError."""
    from ..emulator.profiles import FLAG_NAMES

    text = (text or "none").strip()
    if text in ("", "none"):
        return {}
    out: dict[str, bool] = {}
    for part in text.split(","):
        part = part.strip()
        if len(part) < 2 or part[0] not in "+-" or part[1:] not in FLAG_NAMES:
            raise UsageError(f"--expect {text}: '{part}' is not +flag or -flag",
                             hint="flags: " + ", ".join(FLAG_NAMES))
        if part[1:] in out:
            raise UsageError(f"--expect {text}: {part[1:]} named twice")
        out[part[1:]] = part[0] == "+"
    return out


def format_expect(expect: Mapping[str, bool]) -> str:
    return ",".join(("+" if on else "-") + name for name, on in sorted(expect.items())) or "none"


def with_flags(profile: str, flags: Mapping[str, bool]) -> str:
    """``profile`` with ``flags`` switched: a profile name the emulator accepts."""
    from ..emulator.profiles import get_profile
    from .identify import _with

    setting = {name: name in get_profile(profile).flags for name in _flag_names()}
    setting.update(flags)
    return _with(profile, setting)


def _flag_names() -> tuple[str, ...]:
    from ..emulator.profiles import FLAG_NAMES

    return FLAG_NAMES


def uncompared_fields(profile: str) -> tuple[str, ...]:
    """The metric fields left out of the comparison (see the module doc)."""
    from ..emulator.profiles import get_profile
    from ..metrics import RSS_ANON, RSS_ANON_SCENARIO

    if "rss_exact" in get_profile(profile).flags:
        return (RSS_ANON,)
    return (RSS_ANON, RSS_ANON_SCENARIO)


def cells(observed: Observed, skip: tuple[str, ...] = ()) -> dict[CellKey, object]:
    """Every cell of a kernel's observations (but metrics ending in ``skip``)."""
    out: dict[CellKey, object] = {}
    for scenario, points in observed.items():
        for p in points:
            for metric, value in p.values.items():
                if skip and metric.rsplit(".", 1)[-1] in skip:
                    continue
                out[(scenario, p.step, p.scan, metric)] = value
    return out


@dataclass(frozen=True)
class Cell:
    scenario: str
    step: int
    scan: int | None
    metric: str
    base: object
    variant: object
    #: predicted by the base's fitted profile / by it with the expected flags
    fitted: object = MISSING
    expected: object = MISSING
    kind: str = UNEXPLAINED

    def where(self) -> str:
        scan = f" scan {self.scan}" if self.scan else ""
        return f"{self.scenario} step {self.step}{scan} {self.metric}"

    def describe(self) -> str:
        text = f"{self.where()}: base {show(self.base)}, variant {show(self.variant)}"
        if self.expected is not MISSING and self.expected != self.fitted:
            text += f" (expected {show(self.expected)})"
        return text


def show(value: object) -> str:
    if value is MISSING:
        return "not reported"
    return "absent" if value is None else str(value)


@dataclass
class Judgement:
    variant: str
    base_profile: str
    expected_profile: str
    compared: int = 0
    changed: list[Cell] = field(default_factory=list)
    explained: list[Cell] = field(default_factory=list)
    unexplained: list[Cell] = field(default_factory=list)
    #: "+flag" / "-flag": what fitting the variant changed against the base
    flags_blamed: list[str] = field(default_factory=list)
    #: cells the variant's own fitted profile still gets wrong
    unmodelled: int = 0
    #: the variant's scenarios that failed (one line each)
    errors: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.errors:
            return "error"
        return "changed" if self.unexplained else "as-expected"

    def changed_by_scenario(self) -> dict[str, list[str]]:
        """scenario -> metrics with a changed cell (for the table and the report)."""
        out: dict[str, list[str]] = {}
        for c in self.changed:
            metrics = out.setdefault(c.scenario, [])
            if c.metric not in metrics:
                metrics.append(c.metric)
        return {s: sorted(ms, key=metric_sort_key) for s, ms in out.items()}


def _predictions(scenarios: Sequence[m.Scenario], profile: str, names: set[str]
                 ) -> dict[tuple[str, int, int | None], Mapping]:
    from .identify import _predicted

    out = {}
    for s in scenarios:
        if s.name not in names:
            continue
        for (step, scan), point in _predicted(s, profile).items():
            out[(s.name, step, scan)] = point.values
    return out


def _lookup(pred: Mapping, key: CellKey) -> object:
    values = pred.get(key[:3])
    if values is None:
        return MISSING
    return values.get(key[3], MISSING)


def judge(variant: str, base: Observed, observed: Observed, scenarios: Sequence[m.Scenario],
          base_profile: str, expect: Mapping[str, bool], *, blame: bool = True,
          errors: Sequence[str] = ()) -> Judgement:
    """Judge ``observed`` (the variant) against ``base`` cell by cell."""
    expected_profile = with_flags(base_profile, expect) if expect else base_profile
    j = Judgement(variant, base_profile, expected_profile, errors=list(errors))
    skip = uncompared_fields(base_profile)
    b_cells, v_cells = cells(base, skip), cells(observed, skip)
    # a metric missing from a point the kernel did report reads as absent (None),
    # as in observations.csv; a point not reported at all is MISSING
    b_points = {k[:3] for k in b_cells}
    v_points = {k[:3] for k in v_cells}
    names = set(base) | set(observed)
    fitted = _predictions(scenarios, base_profile, names)
    wanted = _predictions(scenarios, expected_profile, names) if expect else fitted
    for key in sorted(set(b_cells) | set(v_cells), key=_order_key):
        bv = b_cells.get(key, None if key[:3] in b_points else MISSING)
        vv = v_cells.get(key, None if key[:3] in v_points else MISSING)
        pf, pe = _lookup(fitted, key), _lookup(wanted, key)
        j.compared += 1
        if bv == vv and bv is not MISSING:
            if expect and pe != pf and bv == pf and pe is not MISSING:
                # the flags predict a change here and the variant did not make it
                j.unexplained.append(Cell(*key, bv, vv, pf, pe, UNEXPLAINED))
            continue
        cell = Cell(*key, bv, vv, pf, pe, UNEXPLAINED)
        if expect and pe != pf and vv is not MISSING and pe is not MISSING and (
                vv == pe or _same_delta(bv, vv, pf, pe)):
            cell = Cell(*key, bv, vv, pf, pe, EXPLAINED)
            j.explained.append(cell)
        else:
            j.unexplained.append(cell)
        j.changed.append(cell)
    if blame and (j.changed or j.unexplained):
        j.flags_blamed, j.unmodelled = blame_flags(observed, scenarios, base_profile)
    return j


def _same_delta(bv, vv, pf, pe) -> bool:
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (bv, vv, pf, pe))
    return ints and vv - bv == pe - pf


def _order_key(key: CellKey):
    scenario, step, scan, metric = key
    return (scenario, step, scan or 0, metric_sort_key(metric))


def blame_flags(observed: Observed, scenarios: Sequence[m.Scenario], base_profile: str
                ) -> tuple[list[str], int]:
    """Fit the variant's observations from the base's profile (identify's
    coordinate descent); the flags that fit differently, and the cells the
    variant's fitted profile still gets wrong."""
    from ..emulator.profiles import get_profile
    from .identify import analyse

    from ..metrics import RSS_ANON, RSS_ANON_SCENARIO

    known = [s for s in scenarios if s.name in observed]
    if not known:
        return [], 0
    # without the RssAnon cells: identify does not count a missing RssAnon
    # prediction against a profile, so switching rss_exact off would "explain"
    # any RssAnon change by predicting nothing
    skip = (RSS_ANON, RSS_ANON_SCENARIO)
    stripped = {name: [replace(p, values={k: v for k, v in p.values.items()
                                          if k.rsplit(".", 1)[-1] not in skip})
                       for p in points] for name, points in observed.items()}
    result = analyse(stripped, known, None, base=base_profile)
    before = get_profile(base_profile).flags
    after = get_profile(result.fitted).flags
    blamed = [("+" if name in after else "-") + name
              for name in _flag_names() if (name in before) != (name in after)]
    return blamed, result.fitted_score.bad


def fitted_profile(base: Observed, scenarios: Sequence[m.Scenario], release: str | None
                   ) -> tuple[str, int]:
    """The base kernel's fitted profile and how many cells it still gets wrong."""
    from .identify import analyse

    known = [s for s in scenarios if s.name in base]
    result = analyse(base, known, release)
    return result.fitted, result.fitted_score.bad
