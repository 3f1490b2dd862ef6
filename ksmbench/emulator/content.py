"""Page contents as small integers, ordered as memcmp() orders the bytes.

The emulator never holds page bytes.  Every distinct page content gets an
integer id (``ZERO`` = 0 is the all-zero page); a page's frame stores the id.
KSM's trees compare pages with memcmp(), so each id also carries an order
key: the first 16 bytes of the page as two big-endian u64 (memcmp order on a
prefix is numeric order of its big-endian value).  All ksmbench contents
differ within their first 16 bytes (``unique`` pages carry the fill id and
page index there, ``tag`` pages are SHAKE-256 output); if two distinct
contents ever tie on the prefix, the full bytes decide.

Ids are assigned in blocks per fill, so a 1 GiB ``unique`` fill costs a few
numpy operations, not a Python loop.
"""

from __future__ import annotations

import numpy as np

from ..scenario.patterns import (PAGE_SIZE, FillId, Pattern, _fill_word, _tag_page, key_bytes)

ZERO = 0


def _be_pair(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[:8], "big"), int.from_bytes(data[8:16], "big")


class ContentTable:
    def __init__(self) -> None:
        self._hi = np.zeros(1024, dtype=np.uint64)
        self._lo = np.zeros(1024, dtype=np.uint64)
        self._n = 1  # id 0: the zero page, key (0, 0)
        #: key() of ids already asked for (ids never change once assigned)
        self._pykeys: list[tuple[int, int]] = []
        self._tags: dict[str, int] = {}
        #: id -> content key (patterns.key_bytes) for the rare full comparison
        self._unique_blocks: list[tuple[int, int, str, int]] = []  # (first id, count, scenario, step)
        #: write_byte: (root id, byte 0) -> id, and id -> (root id, byte 0)
        self._derived: dict[tuple[int, int], int] = {}
        self._root: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self._n

    def _reserve(self, extra: int) -> int:
        first = self._n
        need = first + extra
        if need > self._hi.size:
            size = max(need, self._hi.size * 2)
            self._hi = np.resize(self._hi, size)
            self._lo = np.resize(self._lo, size)
        self._n = need
        return first

    def tag(self, name: str) -> int:
        cid = self._tags.get(name)
        if cid is None:
            cid = self._reserve(1)
            hi, lo = _be_pair(_tag_page(name, PAGE_SIZE))
            self._hi[cid], self._lo[cid] = hi, lo
            self._tags[name] = cid
        return cid

    def fill(self, pattern: Pattern, npages: int, fill: FillId) -> np.ndarray:
        """Content id of each page written by one fill (int64 array)."""
        if pattern.kind == "zero":
            return np.zeros(npages, dtype=np.int64)
        if pattern.kind == "tag":
            return np.full(npages, self.tag(pattern.name), dtype=np.int64)
        if pattern.kind == "cycle":
            k = min(pattern.k, npages) if npages else 0
            ids = np.array([self.tag(f"{pattern.name}#{j}") for j in range(k)], dtype=np.int64)
            return ids[np.arange(npages) % pattern.k] if npages else ids
        # unique: word 0 is the fill word, word 1 is index+1, both little-endian
        first = self._reserve(npages)
        word0 = np.uint64(_fill_word(fill.scenario, fill.step))
        self._hi[first:first + npages] = word0.byteswap()
        self._lo[first:first + npages] = np.arange(1, npages + 1, dtype=np.uint64).byteswap()
        self._unique_blocks.append((first, npages, fill.scenario, fill.step))
        return np.arange(first, first + npages, dtype=np.int64)

    def add_keys(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """New contents known only by a 128-bit key each (``ksmbench savings``
        hashes real pages): ids for them, in the order given.  The key stands
        in for the page's first 16 bytes as its memcmp order; that order only
        shapes the trees, and two contents with the same key are one content
        (a 2^-128 event for xxh3-128 digests)."""
        first = self._reserve(int(hi.size))
        self._hi[first:first + hi.size] = hi
        self._lo[first:first + lo.size] = lo
        return np.arange(first, first + hi.size, dtype=np.int64)

    def with_first_byte(self, cids: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Content ids after ``write_byte`` stored ``values`` at byte 0 of pages
        holding ``cids``.  A page keeps its content when the byte is already
        there; pages that held one content and got the same byte hold one
        content again (they may merge).  Byte 0 is the top byte of the order
        key, so the new key is the old one with that byte replaced."""
        out = np.empty(cids.size, dtype=np.int64)
        pairs: dict[tuple[int, int], list[int]] = {}
        for i, (cid, v) in enumerate(zip(cids.tolist(), values.tolist())):
            pairs.setdefault((cid, v), []).append(i)
        for (cid, v), where in pairs.items():
            root = self._root.get(cid, (cid, -1))[0]
            new = self._derive(root, v)
            out[where] = new
        return out

    def _derive(self, root: int, v: int) -> int:
        hi, lo = self.key(root)
        if hi >> 56 == v:
            return root
        new = self._derived.get((root, v))
        if new is None:
            new = self._reserve(1)
            self._hi[new] = (hi & ((1 << 56) - 1)) | (v << 56)
            self._lo[new] = lo
            self._derived[(root, v)] = new
            self._root[new] = (root, v)
        return new

    # -- ordering --------------------------------------------------------------------
    def key(self, cid: int) -> tuple[int, int]:
        # Python ints, converted once per id: tree walks compare millions of
        # times, and a numpy scalar read costs several times a list index
        keys = self._pykeys
        if cid >= len(keys):
            done = len(keys)
            keys.extend(zip(self._hi[done:self._n].tolist(), self._lo[done:self._n].tolist()))
        return keys[cid]

    def keys(self, cids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._hi[cids], self._lo[cids]

    def compare(self, a: int, b: int) -> int:
        """memcmp(page a, page b) sign: -1, 0 or 1."""
        if a == b:
            return 0
        ka, kb = self.key(a), self.key(b)
        if ka != kb:
            return -1 if ka < kb else 1
        ba, bb = self._bytes(a), self._bytes(b)  # pragma: no cover - 2^-128 event
        return (ba > bb) - (ba < bb)

    def _bytes(self, cid: int) -> bytes:  # pragma: no cover - used only on prefix ties
        if cid in self._root:
            root, v = self._root[cid]
            return bytes([v]) + self._bytes(root)[1:]
        if cid == ZERO:
            return bytes(PAGE_SIZE)
        for name, tid in self._tags.items():
            if tid == cid:
                return key_bytes(("tag", name))
        for first, count, scenario, step in self._unique_blocks:
            if first <= cid < first + count:
                return key_bytes(("unique", scenario, step, cid - first))
        raise KeyError(cid)
