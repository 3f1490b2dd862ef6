"""Reading /sys/kernel/mm/ksm: counters as signed ints, tunables as text.

The directory is injectable (like psutil's procfs root) so this module and
everything above it can be tested against a fake tree without root.

Writing is deliberately not public here: every tunable change goes through
:mod:`ksmbench.kernel.tunables`, the one undo mechanism.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KsmUnavailable, os_boundary
from ..metrics import GLOBAL_COUNTERS

DEFAULT_ROOT = "/sys/kernel/mm/ksm"

#: read-only counters (all printed with %lu or %ld by mm/ksm.c)
COUNTERS = GLOBAL_COUNTERS
#: tunables ksmbench may change, with the kernel version that added them
TUNABLES: dict[str, str] = {
    "run": "2.6.32",
    "pages_to_scan": "2.6.32",
    "sleep_millisecs": "2.6.32",
    "merge_across_nodes": "3.9 (NUMA only)",
    "use_zero_pages": "4.11",
    "max_page_sharing": "4.13",
    "stable_node_chains_prune_millisecs": "4.13",
    "smart_scan": "6.7 (5e924ff54d08)",
    "advisor_mode": "6.8 (4e5fa4f5eff6)",
    "advisor_max_cpu": "6.8",
    "advisor_min_pages_to_scan": "6.8",
    "advisor_max_pages_to_scan": "6.8",
    "advisor_target_scan_time": "6.8",
}


def parse_choice(text: str) -> str:
    """``"[none] scan-time"`` -> ``"none"`` (sysfs shows choices that way)."""
    text = text.strip()
    if "[" in text:
        return text[text.index("[") + 1:text.index("]")]
    return text


class KsmSysfs:
    """Read access to one KSM sysfs directory."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root)

    def available(self) -> bool:
        return (self.root / "run").exists()

    def require(self) -> None:
        if not self.available():
            raise KsmUnavailable(
                f"{self.root} does not exist: this kernel has no KSM",
                hint="boot a kernel built with CONFIG_KSM=y")

    def has(self, name: str) -> bool:
        return (self.root / name).exists()

    def read_text(self, name: str) -> str | None:
        """The file's content, or None when this kernel lacks the file."""
        path = self.root / name
        try:
            with os_boundary(f"reading {path}"):
                return path.read_text().strip()
        except KsmUnavailable:
            return None

    def read_int(self, name: str) -> int | None:
        """A counter as a signed int; None when the kernel lacks it.

        Counters are signed: general_profit and ksm_process_profit are
        negative while rmap items outweigh savings, and ksm_zero_pages has
        been seen at -1 on 6.6-6.9 (non-atomic counter, fixed by
        c2dc78b86e08 in 6.10).
        """
        text = self.read_text(name)
        if text is None:
            return None
        value = int(text)
        if value >= 1 << 63:  # an unsigned print of a negative long
            value -= 1 << 64
        return value

    def counters(self) -> dict[str, int | None]:
        return {name: self.read_int(name) for name in COUNTERS}

    def tunable(self, name: str) -> str | None:
        text = self.read_text(name)
        return None if text is None else parse_choice(text)

    def tunables(self) -> dict[str, str]:
        """Every tunable this kernel has, as the text one would write back."""
        out: dict[str, str] = {}
        for name in TUNABLES:
            value = self.tunable(name)
            if value is not None:
                out[name] = value
        return out
