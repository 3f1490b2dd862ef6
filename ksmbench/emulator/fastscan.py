"""A full scan with numpy: long runs of visits at once, exact by construction.

ksmd handles pages one by one (:meth:`Ksm.visit` does the same, per page).
Most visits in a scan are independent of each other: their effect is on
their own rmap item plus additive counters.  This module processes a
segment's events (visits and rmap-item frees, in address order) in
*windows*: maximal runs of events whose outcome provably does not depend on
their order, applied with array operations; the rare events that could
interact with others ("hard" events) go through the per-page reference path
one at a time, and the next window starts from the state they leave.

Why a window is exact (the kernel behaviour each condition rests on):

* A visit to a frame mapped only once that is not a KSM page keeps that
  state until its own visit: only ksmd changes page tables during a scan,
  and ksmd changes a PTE only when that PTE's own rmap item is merged, or
  when it is the unstable-tree page of a merge (visited earlier).  Shared
  frames (fork) and KSM frames whose item is not on their node are hard.
* smart_scan's skip decision and the checksum test depend only on the
  item's own age/remaining_skips/oldchecksum.
* A content with a single possible merge candidate in the whole scan and no
  stable node can only be inserted into the unstable tree; nothing can look
  it up again.  Contents with several candidates, or with a stable node,
  are *groups*: their candidates run through a small state machine that
  makes the same choices as stable_tree_search()/unstable tree/
  stable_tree_insert(), one block of appends at a time.
* Stable-tree walks have side effects (pruning stale nodes, collapsing or
  freeing chains, moving a dup to the chain head).  A window is only used
  while no walk can have any: no stale node or dup, no chain with fewer than
  two dups, and every chain has at most one dup that can take another
  mapping, already at its head.  Within a window only groups change the
  tree, and they keep this true (a new dup is created only when every dup
  is full, and goes to the head).  Otherwise walking visits are hard.
* Frees of stable items, and visits of items on the stable tree whose page
  is no longer the KSM page (CoW, unshare) change dup lengths and may prune
  stale nodes: hard.  They are also where 7.3's ``stable_item_reset`` acts
  (no smart_scan ageing of a STABLE item; checksum and age zeroed when it
  leaves the tree), so both paths share that code in :class:`Ksm`.
"""

from __future__ import annotations

import heapq
from collections import Counter

import numpy as np

from .content import ZERO
from .machine import NO_CHECKSUM, NONE, STABLE, UNSTABLE, U8_MAX, Ksm, MM, Segment, SNode

# event kinds within a segment
FREE, FREE_HARD, S1, HARD, SKIP, S2, S3, S4, GROUP = range(9)


def _skip_age(age: np.ndarray) -> np.ndarray:
    return np.select([age <= 3, age <= 5, age <= 8], [1, 2, 4], 8).astype(np.uint8)


class FastScan:
    def __init__(self, ksm: Ksm):
        self.k = ksm
        self.counts: Counter[int] = Counter()
        self._index: dict[int, SNode] | None = None
        #: the contents of ``index()`` as an array, for np.isin (None: stale)
        self._index_keys: np.ndarray | None = None
        self._count_keys = np.zeros(0, dtype=np.int64)
        #: tree_quiet() of the current tree: windows keep it (see the module
        #: doc), so only a hard event, which may change anything, drops it.
        #: Without the cache every segment walked the whole tree: quadratic
        #: for processes with hundreds of VMAs and many KSM pages
        self._quiet: bool | None = None

    # -- the whole scan ------------------------------------------------------------
    def run(self) -> None:
        self.counts = self._candidate_counts()
        self._count_keys = np.fromiter(self.counts, dtype=np.int64)
        self.k.scan_slots(self.scan_mm)

    def _candidate_counts(self) -> Counter[int]:
        """How many visits of this scan could reach the unstable tree, per content:
        all visits of frames that are not KSM pages (an upper bound)."""
        k = self.k
        fr = k.frames
        parts = []
        for mm in k.slots:
            if mm.exiting:
                continue
            for seg in mm.segments:
                if not seg.mapped:
                    continue
                f = seg.pte[seg.merge & (seg.pte > 0)]
                if f.size:
                    parts.append(fr.content[f[fr.node[f] < 0]])
        if not parts:
            return Counter()
        counts = np.bincount(np.concatenate(parts))  # content ids are small and dense
        many = np.flatnonzero(counts > 1)
        return Counter(dict(zip(many.tolist(), counts[many].tolist())))

    def scan_mm(self, mm: MM) -> bool:
        k = self.k
        found_mergeable = False
        if not mm.exiting:
            k.adopt_items(mm)
        for seg in list(mm.segments):
            if not mm.exiting and seg.mapped and seg.merge.any():
                found_mergeable = True
            self.scan_segment(seg, exiting=mm.exiting)
        k._drop_empty_ghosts(mm)
        return found_mergeable and not mm.exiting

    # -- the tree ------------------------------------------------------------------------
    def index(self) -> dict[int, SNode]:
        """content -> the stable tree node (regular or chain) holding it."""
        if self._index is None:
            self._index = {n.cid: n for n in self.k.root.inorder()}
            self._index_keys = None
        return self._index

    def index_keys(self) -> np.ndarray:
        index = self.index()
        if self._index_keys is None:
            self._index_keys = np.fromiter(index, dtype=np.int64, count=len(index))
        return self._index_keys

    def tree_quiet(self) -> bool:
        """True when no stable-tree walk can change anything (see module doc)."""
        k = self.k
        for node in k.root.inorder():
            if not node.is_chain:
                if k.stale(node):
                    return False
                continue
            if len(node.dups) < 2:
                return False
            cand = None
            for pos, dup in enumerate(node.dups):
                if k.stale(dup):
                    return False
                if k.candidate(dup):
                    if cand is not None:
                        return False
                    cand = pos
            if cand is not None and cand != 0 and k.candidate(node.dups[cand], 1):
                return False
        return True

    # -- one segment ---------------------------------------------------------------------
    def scan_segment(self, seg: Segment, *, exiting: bool) -> None:
        k = self.k
        fr = k.frames
        if exiting or not seg.mapped:
            visit = np.zeros(seg.n, dtype=bool)
        else:
            visit = seg.merge & (seg.pte > 0)
        ev = np.flatnonzero(visit | seg.item)
        if ev.size == 0:
            return
        sel = _Sel(ev)
        is_visit = sel.get(visit)
        exists = sel.get(seg.item)
        frame = np.where(is_visit, sel.get(seg.pte), 0)
        node_of = fr.node[frame]
        ksm = is_visit & (node_of >= 0)
        st = np.where(exists, sel.get(seg.ist), NONE)
        kind = np.full(ev.size, HARD, dtype=np.int8)
        kind[~is_visit & (st != STABLE)] = FREE
        kind[~is_visit & (st == STABLE)] = FREE_HARD
        own = ksm & (st == STABLE) & (sel.get(seg.inode) == node_of)
        kind[own] = S1
        plain = is_visit & ~ksm & (fr.mapcount[frame] == 1) & (st != STABLE)
        content = fr.content[frame]
        age = np.where(exists, sel.get(seg.iage), 0).astype(np.int64)
        skips = np.where(exists, sel.get(seg.iskip), 0)
        skip = np.zeros(ev.size, dtype=bool)
        if k.smart:
            skip = plain & (age >= 3) & (skips != 0)
        kind[plain & skip] = SKIP
        rest = plain & ~skip
        cksame = exists & (sel.get(seg.ick) == content)
        index = self.index()
        in_tree = np.zeros(ev.size, dtype=bool)
        if index and rest.any():
            in_tree[rest] = np.isin(content[rest], self.index_keys())
        multi = np.zeros(ev.size, dtype=bool)
        if self.counts and rest.any():
            keys = self._count_keys
            multi[rest] = np.isin(content[rest], keys)
        group = rest & (in_tree | multi)
        zero_merge = k.settings.use_zero_pages & (content == ZERO)
        if k.checksum_first:
            kind[rest & ~cksame] = S2
            kind[rest & cksame & zero_merge] = S3
            kind[rest & cksame & ~zero_merge & group] = GROUP
            kind[rest & cksame & ~zero_merge & ~group] = S4
            walks = (kind == GROUP) | (kind == S4)
        else:
            kind[rest & group] = GROUP
            kind[rest & ~group & ~cksame] = S2
            kind[rest & ~group & cksame & zero_merge] = S3
            kind[rest & ~group & cksame & ~zero_merge] = S4
            walks = rest
        hard_pos = np.flatnonzero((kind == HARD) | (kind == FREE_HARD))
        walk_pos = np.flatnonzero(walks)
        pos = 0
        n = ev.size
        while pos < n:
            if self._quiet is None:
                self._quiet = self.tree_quiet()
            quiet = self._quiet
            h = np.searchsorted(hard_pos, pos)
            q = int(hard_pos[h]) if h < hard_pos.size else n
            if not quiet:
                w = np.searchsorted(walk_pos, pos)
                if w < walk_pos.size:
                    q = min(q, int(walk_pos[w]))
            if q > pos:
                self.window(seg, sel.sub(pos, q), kind[pos:q], content[pos:q], frame[pos:q],
                            cksame[pos:q], age[pos:q], skips[pos:q])
            if q < n:
                idx = int(ev[q])
                if is_visit[q]:
                    k.visit(seg, idx)
                else:
                    k._free_item(seg, idx)
                self._index = None
                self._quiet = None
            pos = q + 1

    def window(self, seg: Segment, sel: "_Sel", kind: np.ndarray, content: np.ndarray,
               frame: np.ndarray, cksame: np.ndarray, age: np.ndarray, skips: np.ndarray) -> None:
        """Apply a run of events whose order does not matter (all arrays are
        per event; ``sel`` maps events to page indices of ``seg``)."""
        k = self.k
        fr = k.frames
        mm = seg.mm
        free = kind == FREE
        visits = ~free
        ist = sel.get(seg.ist).copy()
        item = sel.get(seg.item)
        # frees of items off the stable tree
        if free.any():
            k.pages_unshared -= int(np.count_nonzero(free & (ist == UNSTABLE)))
            nfree = int(np.count_nonzero(free))
            k.rmap_items -= nfree
            mm.rmap_items -= nfree
            ist[free] = NONE
            sel.put(seg.item, free, False)
        if not visits.any():
            sel.put(seg.ist, free, NONE)
            return
        # get_next_rmap_item(): new items
        new = visits & ~item
        if new.any():
            nnew = int(np.count_nonzero(new))
            sel.put(seg.item, new, True)
            sel.put(seg.inode, new, -1)
            sel.put(seg.ick, new, NO_CHECKSUM)
            sel.put(seg.iskip, new, 0)
            ist[new] = NONE
            k.rmap_items += nnew
            mm.rmap_items += nnew
        # should_skip_rmap_item() on non-KSM pages (KSM pages are S1 here)
        nonksm = visits & (kind != S1)
        if k.smart and nonksm.any():
            a = np.where(nonksm, age, 0)
            sel.put(seg.iage, nonksm, np.minimum(a + 1, U8_MAX).astype(np.uint8)[nonksm])
            old = nonksm & (a >= 3)
            reset = old & (skips == 0)
            if reset.any():
                sel.put(seg.iskip, reset, _skip_age(a[reset]))
            skipped = old & (skips != 0)
            if skipped.any():
                sel.put(seg.iskip, skipped, (skips[skipped] - 1).astype(np.uint8))
                k.pages_skipped += int(np.count_nonzero(skipped))
        # remove_rmap_item_from_tree() for items the last scan left in the
        # unstable tree (skipped ones too); stable items here are S1 (kept)
        leave = nonksm & (ist == UNSTABLE)
        if leave.any():
            k.pages_unshared -= int(np.count_nonzero(leave))
            ist[leave] = NONE
        if k.count_scanned:
            k.pages_scanned += int(np.count_nonzero(visits & (kind != SKIP)))
        # checksum changed: remember it (the page is volatile this scan)
        s2 = kind == S2
        if s2.any():
            sel.put(seg.ick, s2, content[s2])
        # zero page merge
        s3 = kind == S3
        if s3.any():
            fr.unmap(frame[s3])
            sel.put(seg.pte, s3, 0)
            if k.tracking:
                sel.put(seg.zdirty, s3, True)
                nz = int(np.count_nonzero(s3))
                k.zero_pages += nz
                mm.zero_pages += nz
        # unique contents into the unstable tree (nobody looks them up again)
        s4 = kind == S4
        if s4.any():
            ist[s4] = UNSTABLE
            k.pages_unshared += int(np.count_nonzero(s4))
        sel.put(seg.ist, np.ones(ist.size, dtype=bool), ist)
        g = kind == GROUP
        if g.any():
            self.groups(seg, sel.indices(g), content[g], frame[g], cksame[g])

    # -- groups ----------------------------------------------------------------------------
    def groups(self, seg: Segment, gi: np.ndarray, gcontent: np.ndarray, gframe: np.ndarray,
               gck: np.ndarray) -> None:
        """Candidates of contents that can merge in this scan, each content in
        address order.  Different contents do not interact (the tree is quiet),
        except through the tree's shape: dups are created in address order."""
        order = np.argsort(gcontent, kind="stable")
        cs = gcontent[order]
        bounds = np.flatnonzero(np.diff(cs)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [cs.size]))
        # run the groups interleaved by the position of their next tree change
        machines = []
        singles = (ends - starts) == 1
        if self.k.checksum_first and singles.any():
            # a content with one candidate here that needs no new dup: an
            # append to its node or an insert into the unstable tree, done
            # for all of them at once (real processes have many such contents)
            rest = self._singles(seg, gi[order[starts[singles]]], cs[starts[singles]],
                                 gframe[order[starts[singles]]])
            keep = np.ones(starts.size, dtype=bool)
            keep[np.flatnonzero(singles)[~rest]] = False
            starts, ends = starts[keep], ends[keep]
        for a, b in zip(starts.tolist(), ends.tolist()):
            sel = order[a:b]
            machines.append(_Group(self, seg, int(cs[a]), gi[sel], gframe[sel], gck[sel]))
        # advance every machine up to its next node creation, then create the
        # earliest one (tree shape = creation order).  A machine stopped at a
        # creation stays there until it creates, and machines of different
        # contents do not interact, so a heap of stopped machines keyed by
        # position gives the same order in O(log n) per creation (many
        # duplicated contents, as in real processes, made a linear pick
        # quadratic)
        heap: list[tuple[int, int, _Group]] = []
        for n, mach in enumerate(machines):
            mach.advance()
            if not mach.done():
                heap.append((mach.next_position(), n, mach))
        heapq.heapify(heap)
        while heap:
            _pos, n, first = heapq.heappop(heap)
            first.create()
            first.advance()
            if not first.done():
                heapq.heappush(heap, (first.next_position(), n, first))


    def _singles(self, seg: Segment, idx: np.ndarray, cids: np.ndarray,
                 frames: np.ndarray) -> np.ndarray:
        """_Group.advance() for contents with a single candidate in this window
        (6.11+ order: the checksum was unchanged and it is not a zero-page
        merge, else it would not be a group).  Handles an append to a regular
        node with room, and an insert into the unstable tree; returns True
        where the content still needs a machine (a chain, a full node, or a
        merge with an unstable-tree page, which creates a dup)."""
        k = self.k
        index = self.index()
        mps = k.settings.max_page_sharing
        rest = np.ones(idx.size, dtype=bool)
        app_i, app_node = [], []
        ins = []
        for j, (i, cid) in enumerate(zip(idx.tolist(), cids.tolist())):
            node = index.get(cid)
            if node is not None:
                if not node.is_chain and 0 < node.len < mps:
                    app_i.append(j)
                    app_node.append(node)
                    node.len += 1  # one candidate each: room for it
                    rest[j] = False
                continue
            if cid not in k.unstable:
                ins.append(j)
                rest[j] = False
        if app_i:
            sel = np.array(app_i, dtype=np.int64)
            pages = idx[sel]
            kpfn = np.fromiter((n.kpfn for n in app_node), dtype=np.int64, count=len(app_node))
            nid = np.fromiter((n.nid for n in app_node), dtype=np.int64, count=len(app_node))
            k.frames.unmap(seg.pte[pages])
            np.add.at(k.frames.mapcount, kpfn, 1)
            seg.pte[pages] = kpfn
            seg.ist[pages] = STABLE
            seg.inode[pages] = nid
            k.pages_sharing += len(app_i)  # each node already had a mapping
            seg.mm.merging_pages += len(app_i)
        if ins:
            sel = np.array(ins, dtype=np.int64)
            pages = idx[sel].tolist()
            seg.ist[idx[sel]] = UNSTABLE
            k.pages_unshared += len(ins)
            for i, cid in zip(pages, cids[sel].tolist()):
                k.unstable[cid] = (seg, i)
                k._unstable_key[(seg.sid, i)] = cid
        return rest


class _Group:
    """One content's merge candidates within a window (see FastScan.groups)."""

    def __init__(self, fs: FastScan, seg: Segment, cid: int, idx: np.ndarray, frames: np.ndarray,
                 ck: np.ndarray):
        self.fs = fs
        self.k = fs.k
        self.seg = seg
        self.cid = cid
        self.idx = idx
        self.frames = frames
        self.ck = ck
        self.p = 0  # next candidate
        self.target = self._find_target()

    def done(self) -> bool:
        return self.p >= self.idx.size

    def next_position(self) -> int:
        return int(self.idx[self.p])

    def _find_target(self) -> SNode | None:
        """The dup stable_tree_search() would merge into (tree quiet: at most
        one candidate dup, at the chain head unless it is one short of full).

        Kept in ``self.target`` afterwards: appends only fill it (then there
        is no candidate, the tree being quiet), and a created dup becomes it."""
        node = self.fs.index().get(self.cid)
        if node is None:
            return None
        if not node.is_chain:
            return node if self.k.candidate(node) else None
        for dup in node.dups:
            if self.k.candidate(dup):
                return dup
        return None

    def advance(self) -> None:
        """Process candidates until the next one would create a stable dup."""
        k = self.k
        seg = self.seg
        while not self.done():
            target = self.target
            if target is not None:
                room = k.settings.max_page_sharing - target.len
                take = self.idx[self.p:self.p + room]
                self._append_block(target, take)
                self.p += take.size
                if not k.candidate(target):
                    self.target = None
                continue
            i = int(self.idx[self.p])
            if not k.checksum_first and not self.ck[self.p]:
                seg.ick[i] = self.cid  # before 6.11: stable miss, checksum changed
                self.p += 1
                continue
            if not k.checksum_first and k.settings.use_zero_pages and self.cid == ZERO:
                k._zero_merge(seg, i)
                self.p += 1
                continue
            hit = k.unstable.get(self.cid)
            if hit is None:
                seg.ist[i] = UNSTABLE
                k.pages_unshared += 1
                k.unstable[self.cid] = (seg, i)
                k._unstable_key[(seg.sid, i)] = self.cid
                self.p += 1
                continue
            return  # a merge of two pages: creates a dup

    def create(self) -> None:
        """try_to_merge_two_pages() + stable_tree_insert() + two appends."""
        k = self.k
        seg = self.seg
        i = int(self.idx[self.p])
        frame = int(self.frames[self.p])
        tseg, tidx = k.unstable[self.cid]
        k._remove_from_tree(tseg, tidx)
        k._replace(tseg, tidx, frame)
        node = k._stable_tree_insert(frame, quiet=True)
        # the index follows the tree: the content now has this dup, or the
        # chain that took the place of its full node (stable_tree_insert())
        if self.fs._index is not None:
            self.fs._index[self.cid] = node.chain if node.chain is not None else node
            self.fs._index_keys = None
        k._append(tseg, tidx, node)
        k._append(seg, i, node)
        self.p += 1
        self.target = node if k.candidate(node) else None

    def _append_block(self, dup: SNode, take: np.ndarray) -> None:
        k = self.k
        seg = self.seg
        n = int(take.size)
        old = seg.pte[take]
        k.frames.unmap(old)
        k.frames.mapcount[dup.kpfn] += n
        seg.pte[take] = dup.kpfn
        seg.ist[take] = STABLE
        seg.inode[take] = dup.nid
        dup.len += n
        k.pages_sharing += n  # the dup already had a mapping
        seg.mm.merging_pages += n


class _Sel:
    """Events -> page indices: a slice when the events are contiguous pages
    (the common case: whole regions), else an index array."""

    def __init__(self, idx: np.ndarray, lo: int | None = None, hi: int | None = None):
        self.idx = idx
        if lo is None:
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if hi - lo != idx.size:
                lo = hi = -1
        self.lo, self.hi = lo, hi
        self.contiguous = lo >= 0

    def sub(self, a: int, b: int) -> "_Sel":
        if self.contiguous:
            return _Sel(self.idx[a:b], self.lo + a, self.lo + b)
        return _Sel(self.idx[a:b], -1, -1)

    def get(self, arr: np.ndarray) -> np.ndarray:
        return arr[self.lo:self.hi] if self.contiguous else arr[self.idx]

    def put(self, arr: np.ndarray, mask: np.ndarray, values) -> None:
        if self.contiguous:
            view = arr[self.lo:self.hi]
            if mask.all():
                view[...] = values
            else:
                view[mask] = values
        else:
            arr[self.idx[mask]] = values

    def indices(self, mask: np.ndarray) -> np.ndarray:
        return self.idx[mask]
