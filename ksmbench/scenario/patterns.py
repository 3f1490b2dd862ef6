"""Page-content patterns: from a pattern name to page bytes, and to content keys.

The same pattern must give the same bytes on every backend, so both the real
kernel runner and the emulator derive page content from here:

* ``zero``: all bytes zero.
* ``tag:<name>``: SHAKE-256 of ``ksmbench/v1/tag/<name>``, one page long.
  Depends on the name only, so the same tag in any region, process or
  scenario gives the same bytes.
* ``unique``: a fixed random page whose first two 64-bit words are replaced by
  a fill identifier (scenario and step) and the page's index within the fill.
  Every page of a run differs from every other, and none is all-zero.
* ``cycle:<name>:<k>``: page i of the range has the content of
  ``tag:<name>#(i mod k)``.

A *content key* is a small hashable value that stands for a page's bytes; the
emulator works with keys and only materialises bytes when it needs them.
"""

from __future__ import annotations

import hashlib
import mmap as _mmap
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PAGE_SIZE = _mmap.PAGESIZE

#: content key of an all-zero page
ZERO_KEY: tuple = ("zero",)

#: every form the grammar below accepts, as the README's "Scenario format"
#: section lists them (a test keeps the two in step)
PATTERN_FORMS: tuple[str, ...] = ("zero", "unique", "tag:<name>", "cycle:<name>:<k>")

_TAG_NAME = r"[^\s:]+"
_PATTERN_RE = re.compile(
    rf"(?P<zero>zero)\Z|(?P<unique>unique)\Z|tag:(?P<tag>{_TAG_NAME})\Z"
    rf"|cycle:(?P<cname>{_TAG_NAME}):(?P<k>[0-9]+)\Z"
)


@dataclass(frozen=True)
class Pattern:
    kind: str  # "zero" | "tag" | "unique" | "cycle"
    name: str = ""
    k: int = 0

    def __str__(self) -> str:
        if self.kind in ("zero", "unique"):
            return self.kind
        if self.kind == "tag":
            return f"tag:{self.name}"
        return f"cycle:{self.name}:{self.k}"


def parse_pattern(text: str) -> Pattern:
    """Parse a pattern string; ``ValueError`` explains what is accepted."""
    m = _PATTERN_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"unknown pattern {text!r} "
                         f"(expected {', '.join(PATTERN_FORMS[:-1])} or {PATTERN_FORMS[-1]})")
    if m["zero"]:
        return Pattern("zero")
    if m["unique"]:
        return Pattern("unique")
    if m["tag"] is not None:
        return Pattern("tag", m["tag"])
    k = int(m["k"])
    if k < 1:
        raise ValueError(f"pattern {text!r}: k must be at least 1")
    return Pattern("cycle", m["cname"], k)


@dataclass(frozen=True)
class FillId:
    """Identifies one fill, so that ``unique`` pages differ across fills."""

    scenario: str
    step: int


def content_keys(pattern: Pattern, npages: int, fill: FillId) -> list[tuple]:
    """Content key of each of ``npages`` pages written by one fill."""
    if pattern.kind == "zero":
        return [ZERO_KEY] * npages
    if pattern.kind == "tag":
        return [("tag", pattern.name)] * npages
    if pattern.kind == "cycle":
        keys = [("tag", f"{pattern.name}#{j}") for j in range(min(pattern.k, npages))]
        return [keys[i % pattern.k] for i in range(npages)]
    return [("unique", fill.scenario, fill.step, i) for i in range(npages)]


@lru_cache(maxsize=4096)
def _tag_page(name: str, page_size: int) -> bytes:
    data = hashlib.shake_256(b"ksmbench/v1/tag/" + name.encode()).digest(page_size)
    if not any(data):  # cannot happen in practice; the format promises never all-zero
        data = b"\x01" + data[1:]
    return data


@lru_cache(maxsize=16)
def _unique_base(page_size: int) -> np.ndarray:
    base = hashlib.shake_256(b"ksmbench/v1/unique").digest(page_size)
    arr = np.frombuffer(base, dtype=np.uint64).copy()
    arr.setflags(write=False)
    return arr


def _fill_word(scenario: str, step: int) -> np.uint64:
    digest = hashlib.blake2b(f"{scenario}/{step}".encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=np.uint64)[0]


def key_bytes(key: tuple, page_size: int = PAGE_SIZE) -> bytes:
    """The bytes of one page with content ``key``."""
    kind = key[0]
    if kind == "zero":
        return bytes(page_size)
    if kind == "tag":
        return _tag_page(key[1], page_size)
    if kind == "unique":
        _, scenario, step, index = key
        page = _unique_base(page_size).copy()
        page[0] = _fill_word(scenario, step)
        page[1] = np.uint64(index + 1)
        return page.tobytes()
    raise ValueError(f"unknown content key {key!r}")


def fill_pages(pattern: Pattern, npages: int, fill: FillId, *, offset: int = 0,
               page_size: int = PAGE_SIZE) -> np.ndarray:
    """Bytes of pages ``offset .. offset+npages`` of one fill, as (npages, page_size) uint8.

    ``offset`` counts from the start of the fill's range, so a large fill can
    be produced in chunks.  Vectorised: a 1 GiB fill is built in well under a
    second.
    """
    words = page_size // 8
    if pattern.kind == "zero":
        return np.zeros((npages, page_size), dtype=np.uint8)
    if pattern.kind == "tag":
        page = np.frombuffer(_tag_page(pattern.name, page_size), dtype=np.uint8)
        return np.broadcast_to(page, (npages, page_size))
    if pattern.kind == "cycle":
        k = min(pattern.k, offset + npages)
        distinct = np.stack([np.frombuffer(_tag_page(f"{pattern.name}#{j}", page_size),
                                           dtype=np.uint8) for j in range(k)])
        return distinct[(np.arange(npages) + offset) % pattern.k % k]
    out = np.empty((npages, words), dtype=np.uint64)
    out[:] = _unique_base(page_size)
    out[:, 0] = _fill_word(fill.scenario, fill.step)
    out[:, 1] = np.arange(offset + 1, offset + npages + 1, dtype=np.uint64)
    return out.view(np.uint8)


# --- write_byte -----------------------------------------------------
#: the byte ``write_byte`` stores at offset 0 of each page
WRITE_BYTE_OFFSET = 0


@lru_cache(maxsize=4096)
def _byte_of(name: str) -> int:
    return hashlib.shake_256(b"ksmbench/v1/byte/" + name.encode()).digest(1)[0]


def write_byte_values(pattern: Pattern, npages: int, *, offset: int = 0) -> np.ndarray:
    """The byte ``write_byte`` stores in each of ``npages`` pages (uint8), page i
    counted from ``offset`` within the step's range: 0 for ``zero``, one byte
    derived from the name for ``tag:<name>``, the byte of ``<name>#(i mod k)``
    for ``cycle:<name>:<k>``.  ``unique`` is refused: one byte cannot make more
    than 256 pages differ."""
    if pattern.kind == "zero":
        return np.zeros(npages, dtype=np.uint8)
    if pattern.kind == "tag":
        return np.full(npages, _byte_of(pattern.name), dtype=np.uint8)
    if pattern.kind == "cycle":
        table = np.array([_byte_of(f"{pattern.name}#{j}") for j in range(pattern.k)], dtype=np.uint8)
        return table[(np.arange(npages) + offset) % pattern.k]
    raise ValueError("write_byte takes zero, tag:<name> or cycle:<name>:<k> "
                     "(one byte cannot make every page unique)")
# --- end write_byte ----------------------------------------------------------
