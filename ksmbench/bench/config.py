"""What a benchmark run is asked to do: :class:`BenchConfig`, the one typed
configuration that ``ksmbench bench`` parses its arguments into and that the
library (:mod:`.runner`, :mod:`.crosscheck`) reads.

A guest kernel runs the same benchmarks from the same configuration: the host
derives the guest's with :meth:`BenchConfig.for_guest` and hands it over as
JSON (:meth:`BenchConfig.to_json`), so no argument list is rebuilt by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import UsageError

PARTS = ("timings", "savings", "crosscheck")
DEFAULT_SIZES_MIB: tuple[int, ...] = (16, 64, 256)
DEFAULT_SAVINGS_MIB = 64
#: ksm_tests -P's own default size (run_vmtests.sh runs it with -s 100)
DEFAULT_CROSSCHECK_MIB = 100
#: judged (ksm_tests, ksmbench) pairs: one sample spreads by +-25 %, see
#: :func:`~ksmbench.bench.crosscheck.run_crosscheck`
DEFAULT_CROSSCHECK_PAIRS = 21
#: defaults inside a VM: under TCG (nested KVM does not work here) everything
#: runs 10-20x slower than on the host, so the sizes are smaller
GUEST_SIZES_MIB: tuple[int, ...] = (4, 16)
GUEST_SAVINGS_MIB = 8
GUEST_CROSSCHECK_MIB = 32
#: TCG guests are slow, and their cross-check is not judged (reported only)
GUEST_CROSSCHECK_PAIRS = 5
#: how long a guest waits for KSM to be its own (nothing else runs in it)
GUEST_WAIT_SECONDS = 60.0


def parse_sizes(text: str) -> tuple[int, ...]:
    """``--sizes 16,64``: region sizes in MiB."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--sizes {text!r}: expected MiB values separated by commas") from None
    _refuse_bad_sizes(sizes, text)
    return sizes


def parse_parts(text: str) -> tuple[str, ...]:
    """``--only timings,savings``: the parts to run."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    _refuse_unknown_parts(parts, text)
    return parts


def _refuse_bad_sizes(sizes: tuple[int, ...], given: str) -> None:
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--sizes {given!r}: every size must be at least 1 MiB")


def _refuse_unknown_parts(parts: tuple[str, ...], given: str) -> None:
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UsageError(f"--only {given!r}: unknown part(s) {', '.join(bad) or '(none)'}",
                         hint=f"choose from {', '.join(PARTS)}")


@dataclass(frozen=True)
class FreeRunTunables:
    """Tunables held while ksmd runs freely (timed merges and the cross-check).

    The defaults are what ``ksm_tests -P`` runs with on a NUMA-capable kernel
    (main() writes run=2, sleep_millisecs=0, merge_across_nodes=1 and
    pages_to_scan=<-p page count>; the rest stay at the kernel defaults),
    except pages_to_scan: ksm_tests' default -p is 10 pages per batch, we
    default to 1000 and pass ``-p`` to ksm_tests so both use the same value.
    """

    pages_to_scan: int = 1000
    sleep_millisecs: int = 0
    #: kernel default (4.13, 2c653d0ee2ae); 0 would walk every dup of a chain
    #: on each stable-tree lookup, which slows merging of >256 equal pages
    stable_node_chains_prune_millisecs: int = 2000
    max_page_sharing: int = 256
    merge_across_nodes: int = 1
    smart_scan: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BenchConfig:
    """Every choice of one ``ksmbench bench`` run.  ``None`` means "the
    default for where it runs" (host or guest); the ``*_or_default``
    properties resolve it."""

    kernels: tuple[str, ...] = ("host",)
    out: str = "results"
    sizes_mib: tuple[int, ...] | None = None
    repeats: int = 5
    parts: tuple[str, ...] = PARTS
    pages_to_scan: int = 1000
    savings_procs: int = 4
    savings_mib: int | None = None
    savings_repeats: int = 3
    crosscheck_mib: int | None = None
    crosscheck_pairs: int | None = None
    tolerance: float = 0.05
    ksm_tests: str | None = None
    source_series: str | None = None
    wait: float = 0.0
    # VM kernels (ksmbench.backends.add_vm_options)
    memory: str = "2G"
    cpus: int = 2
    accel: str = "auto"
    modules: str | None = None
    guest_repeats: int | None = None
    guest_timeout: float = 3600.0
    # set by the host for the run inside a guest (for_guest)
    label: str | None = None
    run_id: str | None = None
    in_guest: bool = False

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise UsageError("--repeats must be at least 1")
        _refuse_unknown_parts(self.parts, ",".join(self.parts))
        if self.sizes_mib is not None:
            _refuse_bad_sizes(self.sizes_mib, ",".join(map(str, self.sizes_mib)))

    # -- resolved values ------------------------------------------------------------
    @property
    def sizes_or_default(self) -> tuple[int, ...]:
        return self.sizes_mib or DEFAULT_SIZES_MIB

    @property
    def savings_mib_or_default(self) -> int:
        return self.savings_mib or DEFAULT_SAVINGS_MIB

    @property
    def crosscheck_mib_or_default(self) -> int:
        return self.crosscheck_mib or DEFAULT_CROSSCHECK_MIB

    @property
    def crosscheck_pairs_or_default(self) -> int:
        return self.crosscheck_pairs or DEFAULT_CROSSCHECK_PAIRS

    def kernel_label(self, spec: str) -> str:
        """The name results of kernel ``spec`` are filed under."""
        return self.label or spec

    def for_guest(self, label: str, out: str, ksm_tests: str | None) -> "BenchConfig":
        """The configuration the same benchmarks run with inside a guest of
        kernel ``label``: smaller defaults (TCG is slow), the guest's own
        repeats, its run directory under ``out`` (shared with the host)."""
        repeats = self.guest_repeats or self.repeats
        return replace(
            self, kernels=("host",), in_guest=True, label=label, run_id="guest", out=out,
            sizes_mib=self.sizes_mib or GUEST_SIZES_MIB, repeats=repeats,
            savings_mib=self.savings_mib or GUEST_SAVINGS_MIB,
            savings_repeats=min(self.savings_repeats, self.guest_repeats or self.savings_repeats),
            crosscheck_mib=self.crosscheck_mib or GUEST_CROSSCHECK_MIB,
            crosscheck_pairs=self.crosscheck_pairs or GUEST_CROSSCHECK_PAIRS,
            wait=GUEST_WAIT_SECONDS, ksm_tests=ksm_tests)

    # -- serialised form (host -> guest) ------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BenchConfig":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"bench configuration: not valid JSON ({exc})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UsageError(f"bench configuration: unknown field(s) {', '.join(unknown)}",
                             hint="host and guest must run the same ksmbench")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}
        return cls(**values)
