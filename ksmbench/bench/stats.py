"""Statistics over repeated measurements: median, spread, and stability checks.

The checks follow the ones pyperf prints under "WARNING: the benchmark result
may be unstable" (pyperf ``format_checks``), with the same thresholds:

* the standard deviation is 10 % of the mean or more;
* the minimum or the maximum is 50 % or more away from the mean;
* the shortest raw value of a time measurement is under 1 ms (too short for
  the clock and the scheduler to be negligible).

The median is the headline figure (robust against the occasional outlier a
shared 2-core machine produces); the mean, standard deviation, median absolute
deviation and the raw samples are kept beside it, so nothing is lost.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

#: relative standard deviation at or above which a result is called unstable
STDEV_LIMIT = 0.10
#: distance of min or max from the mean (relative) that marks an outlier
OUTLIER_LIMIT = 0.50
#: shortest time sample that the checks accept without a warning, in seconds
SHORTEST_TIME = 1e-3

TIME_UNITS = ("s",)


@dataclass(frozen=True)
class Summary:
    """Summary of one metric's samples; ``warnings`` empty means stable."""

    n: int
    median: float
    mean: float
    stdev: float
    mad: float
    minimum: float
    maximum: float
    unit: str = ""
    warnings: tuple[str, ...] = field(default=())

    @property
    def unstable(self) -> bool:
        return bool(self.warnings)

    @property
    def rel_stdev(self) -> float:
        """Standard deviation relative to the mean (0 for one sample)."""
        return self.stdev / abs(self.mean) if self.mean else 0.0

    @property
    def spread(self) -> float:
        """(max - min) / median: the whole range, relative."""
        return (self.maximum - self.minimum) / abs(self.median) if self.median else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        out["rel_stdev"] = self.rel_stdev
        out["unstable"] = self.unstable
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        """Read back what :meth:`to_dict` wrote (its derived keys are recomputed)."""
        return cls(d["n"], d["median"], d["mean"], d["stdev"], d["mad"], d["minimum"],
                   d["maximum"], d.get("unit", ""), tuple(d.get("warnings", ())))

    def describe(self) -> str:
        """``median ± MAD (n=…, sd …%)``, as printed in summaries."""
        text = (f"{format_value(self.median, self.unit)} ± {format_value(self.mad, self.unit)} "
                f"(n={self.n}, sd {self.rel_stdev * 100:.1f}%)")
        return text + (" UNSTABLE" if self.unstable else "")


def summarize(samples: Iterable[float], unit: str = "") -> Summary:
    """Summarise raw samples (at least one); None/NaN values are dropped."""
    values = [float(v) for v in samples if v is not None and not math.isnan(float(v))]
    if not values:
        raise ValueError("no samples to summarise")
    median = statistics.median(values)
    mean = statistics.fmean(values)
    stdev = statistics.stdev(values) if len(values) >= 2 else 0.0
    mad = statistics.median([abs(v - median) for v in values])
    summary = Summary(n=len(values), median=median, mean=mean, stdev=stdev, mad=mad,
                      minimum=min(values), maximum=max(values), unit=unit)
    return Summary(**{**summary.__dict__, "warnings": tuple(stability_warnings(values, unit))})


def stability_warnings(values: Sequence[float], unit: str = "") -> list[str]:
    """Why a set of samples may be unstable (empty list: no reason found)."""
    warnings: list[str] = []
    if not values:
        return warnings
    mean = statistics.fmean(values)
    if len(values) >= 2 and mean:
        stdev = statistics.stdev(values)
        if stdev / abs(mean) >= STDEV_LIMIT:
            warnings.append(f"the standard deviation ({format_value(stdev, unit)}) is "
                            f"{stdev / abs(mean) * 100:.0f}% of the mean ({format_value(mean, unit)})")
    if len(values) >= 2 and mean:
        for name, value in (("minimum", min(values)), ("maximum", max(values))):
            away = (value - mean) / abs(mean)
            if abs(away) >= OUTLIER_LIMIT:
                how = "greater" if away > 0 else "smaller"
                warnings.append(f"the {name} ({format_value(value, unit)}) is {abs(away) * 100:.0f}% "
                                f"{how} than the mean ({format_value(mean, unit)})")
    if unit in TIME_UNITS and min(values) < SHORTEST_TIME:
        warnings.append(f"the shortest raw value is only {format_value(min(values), unit)}")
    return warnings


def relative_difference(a: float, b: float) -> float:
    """|a - b| relative to their mean: symmetric, so neither side is 'the truth'."""
    mid = (abs(a) + abs(b)) / 2
    return abs(a - b) / mid if mid else 0.0


def format_value(value: float, unit: str = "") -> str:
    """Readable number with its unit; seconds get ms/us scaling."""
    if unit == "s":
        a = abs(value)
        if a >= 1:
            return f"{value:.3f} s"
        if a >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} us"
    if unit in ("MiB/s", "MiB"):
        return f"{value:.1f} {unit}"
    if unit in ("us", "ns", "ms"):
        return f"{value:.3g} {unit}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}" + (f" {unit}" if unit else "")
    return f"{int(value)}" + (f" {unit}" if unit else "")
