"""The KSM model: processes, page tables, frames, rmap items, the two trees.

This is a scan-granular re-implementation of mm/ksm.c (6.1 .. 7.3) plus the
few mm paths KSM interacts with (fault, CoW, zap, fork, exit), driven by
scenario operations.  Where versions differ, the behaviour follows the
profile's flags (see :mod:`.profiles`); every such place cites the commit.

State, and where it lives in the kernel:

* **Frames** (struct folio): content id, mapcount, and the stable node of a
  KSM page (``folio->mapping`` with PAGE_MAPPING_KSM).  Frame 0 is the shared
  zero page.  A KSM page whose mapcount drops to 0 is freed; its stable node
  is then *stale* and is pruned when ksmd next touches it (ksm_get_folio()).
* **Segments**: one per scenario region (a run of VMAs), per process: the PTE
  of each page (-1 none, 0 zero page, >0 anon frame), the KSM-zero mark
  (pte_dirty on a zero PTE, 79271476b336, 6.6), VM_MERGEABLE, whether the VMA
  has an anon_vma, and the rmap item at that address (exists, tree state,
  stable node, oldchecksum as a content id, age, remaining_skips).  A region
  that is unmapped keeps its rmap items (as a *ghost* segment) until ksmd's
  next pass over the mm frees them, as in the kernel.
* **MMs** (mm_struct + ksm_mm_slot): per-mm counters ksm_rmap_items,
  ksm_merging_pages, ksm_zero_pages, MMF_VM_MERGEABLE (has a slot),
  MMF_VM_MERGE_ANY, exiting.  ``slots`` is ksmd's mm list in order.
* **Stable tree**: :class:`~.rbtree.RBRoot` of :class:`SNode`; chains hold
  their dups in hlist order (head first).  **Unstable tree**: per scan, a
  dict content -> rmap item (see :meth:`Ksm._unstable_search_insert` for why
  a dict gives the same answers as the kernel's rbtree during one scan).

The per-visit path here (:meth:`Ksm.scan_mm_slow`) is the reference;
:mod:`.fastscan` processes long runs of visits with numpy and is checked
against it; :func:`.scan.full_scan` runs one full scan by either path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .advisor import Advisor
from .content import ZERO, ContentTable
from .profiles import Profile
from .rbtree import RBNode, RBRoot

# Segment.prot values
PROT_NONE, PROT_READ, PROT_RW = 0, 1, 2
PROT_CODES = {"none": PROT_NONE, "read": PROT_READ, "read-write": PROT_RW}

# rmap item tree state (the STABLE_FLAG / UNSTABLE_FLAG bits of rmap_item->address)
NONE, UNSTABLE, STABLE = 0, 1, 2
#: sizeof(struct ksm_rmap_item) on 64-bit (ksm.rst; the 6.7 age/remaining_skips
#: u8 fields fit into padding, so 64 still holds)
RMAP_ITEM_SIZE = 64
PAGE_SIZE = 4096
#: pages in a PMD-mapped transparent huge page (x86-64: 2 MiB of 4 KiB pages)
HPAGE_PMD_NR = 512
#: rmap_item->oldchecksum starts at 0 (kmem_cache_zalloc); no ksmbench page
#: content has checksum 0, so "never checksummed" is its own value
NO_CHECKSUM = -1
U8_MAX = 255


def rb_child(c: int, node: RBNode) -> tuple[bool, Optional[RBNode]]:
    """One step down an rbtree for a memcmp() result ``c`` (not 0): (went
    left, the child)."""
    return (True, node.rb_left) if c < 0 else (False, node.rb_right)


def skip_age(age: int) -> int:
    """mm/ksm.c skip_age() (6.7, 5e924ff54d08)."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


class Frames:
    """struct folio, reduced to what KSM looks at."""

    def __init__(self) -> None:
        self.content = np.zeros(1024, dtype=np.int64)
        self.mapcount = np.zeros(1024, dtype=np.int64)
        self.node = np.full(1024, -1, dtype=np.int64)
        #: MADV_FREE made the folio lazy-free and clean; the value is
        #: its stable node then (-1: not a KSM page), -2 when not lazy-free
        self.lazy = np.full(1024, -2, dtype=np.int64)
        #: the NUMA node the folio lives on (page_to_nid()): the node its
        #: region is bound to (op mmap, node), else node 0, where every guest
        #: CPU is (the default local policy; backends/vm/boot.py)
        self.numa = np.zeros(1024, dtype=np.int64)
        #: the THP a frame is a subpage of (the id of its first frame), -1 for
        #: a small folio; a split makes every subpage a small folio
        self.folio = np.full(1024, -1, dtype=np.int64)
        self.n = 1  # frame 0 is the shared zero page

    def alloc(self, contents: np.ndarray, numa: int = 0) -> np.ndarray:
        k = int(contents.size)
        first = self.n
        need = first + k
        if need > self.content.size:
            size = max(need, self.content.size * 2)
            self.content = np.resize(self.content, size)
            self.mapcount = np.resize(self.mapcount, size)
            grow = size - self.node.size
            self.node = np.concatenate([self.node, np.full(grow, -1, dtype=np.int64)])
            self.lazy = np.concatenate([self.lazy, np.full(grow, -2, dtype=np.int64)])
            self.numa = np.resize(self.numa, size)
            self.folio = np.concatenate([self.folio, np.full(grow, -1, dtype=np.int64)])
        self.content[first:need] = contents
        self.mapcount[first:need] = 1
        self.node[first:need] = -1
        self.lazy[first:need] = -2
        self.numa[first:need] = numa
        self.folio[first:need] = -1
        self.n = need
        return np.arange(first, need, dtype=np.int64)

    def alloc_thp(self, numa: int = 0) -> np.ndarray:
        """One zero-filled anonymous THP: HPAGE_PMD_NR frames of one folio."""
        frames = self.alloc(np.full(HPAGE_PMD_NR, ZERO, dtype=np.int64), numa)
        self.folio[frames] = frames[0]
        return frames

    def unmap(self, frames: np.ndarray) -> None:
        """Drop one mapping of each frame in ``frames`` (repeats allowed)."""
        if frames.size:
            np.subtract.at(self.mapcount, frames, 1)

    def map(self, frames: np.ndarray) -> None:
        if frames.size:
            np.add.at(self.mapcount, frames, 1)


class Segment:
    """A region's pages and rmap items in one process (address order = creation order)."""

    _ids = 0

    def __init__(self, mm: "MM", name: str, start: int, npages: int, thp: bool):
        Segment._ids += 1
        self.sid = Segment._ids
        self.mm = mm
        self.name = name
        self.start = start
        self.n = npages
        self.thp = thp
        #: the node of the VMA's MPOL_BIND policy (op mmap, node), 0 without one:
        #: where its faults (first touch, CoW, unshare) allocate
        self.numa = 0
        self.mapped = True
        self.pte = np.full(npages, -1, dtype=np.int64)
        self.zdirty = np.zeros(npages, dtype=bool)
        self.merge = np.zeros(npages, dtype=bool)
        self.anon = np.zeros(npages, dtype=bool)
        self.item = np.zeros(npages, dtype=bool)
        self.ist = np.zeros(npages, dtype=np.int8)
        self.inode = np.full(npages, -1, dtype=np.int64)
        self.ick = np.full(npages, NO_CHECKSUM, dtype=np.int64)
        self.iage = np.zeros(npages, dtype=np.uint8)
        self.iskip = np.zeros(npages, dtype=np.uint8)
        # op uffd_wp: VM_UFFD_WP on the page's VMA, and the frame
        # each PTE mapped when UFFDIO_WRITEPROTECT set its uffd-wp bit.  The
        # bit lives as long as that PTE: replace_page() (a merge into another
        # KSM page, or the zero page) and a zap build a new PTE without it,
        # while a page that becomes the KSM page in place keeps it.  Frames
        # are never reused, so "the PTE still maps wp_frame" is "the bit is set"
        self.uffd = np.zeros(npages, dtype=bool)
        self.wp_frame = np.full(npages, -1, dtype=np.int64)
        #: swap entries (scenarios with swap = true): the swap slot a
        #: non-present PTE holds (Ksm.slot_*), -1 where the PTE holds none
        self.swp = np.full(npages, -1, dtype=np.int64)
        #: the anon_vma root of the region's VMA (its first segment; a fork's
        #: copy and a moved region keep it) and the page offset of page 0
        #: (vm_pgoff: a moved region keeps it): what ksm_might_need_to_copy()
        #: compares with a swap-cache folio's anon_vma and index
        self.av_root = self.sid
        self.pgoff = start
        # VMA attributes per page (mprotect, MADV_DONTFORK/WIPEONFORK)
        self.prot = np.full(npages, PROT_RW, dtype=np.int8)
        self.dontcopy = np.zeros(npages, dtype=bool)
        self.wipe = np.zeros(npages, dtype=bool)
        #: pages the VMA covers (mremap may shrink it below the arrays' length)
        self.vma_end = npages

    def copy_for_fork(self, child: "MM") -> "Segment":
        seg = Segment(child, self.name, self.start, self.n, self.thp)
        seg.numa = self.numa  # dup_mmap() -> vma_dup_policy()
        seg.av_root, seg.pgoff = self.av_root, self.pgoff  # anon_vma_fork(): same root
        # copy_page_range() skips VMAs without an anon_vma (their zero-page
        # PTEs from read faults are simply faulted again in the child)
        seg.pte[:] = np.where(self.anon, self.pte, -1)
        # copy_nonpresent_pte(): a swap entry is copied (swap_duplicate())
        seg.swp[:] = np.where(self.anon, self.swp, -1)
        # copy_present_pte() keeps the dirty bit of a private zero PTE: the
        # child's KSM zero pages are KSM zero pages too (docs/emulator.md, fork)
        seg.zdirty[:] = self.zdirty & self.anon
        seg.merge[:] = self.merge
        seg.anon[:] = self.anon
        seg.prot[:] = self.prot
        seg.dontcopy[:] = self.dontcopy
        seg.wipe[:] = self.wipe
        seg.vma_end = self.vma_end
        # dup_mmap() skips VM_DONTCOPY VMAs (MADV_DONTFORK): the child
        # has nothing there; a VM_WIPEONFORK VMA is copied without its pages
        # and without an anon_vma ("a clean slate in the child")
        gone = self.dontcopy | self.wipe
        seg.pte[gone] = -1
        seg.swp[gone] = -1
        seg.zdirty[gone] = False
        seg.anon[gone] = False
        seg.merge[self.dontcopy] = False
        return seg

    def grow(self, npages: int) -> None:
        """mremap grows the region in place (arrays only)."""
        extra = npages - self.n
        fills = {"pte": -1, "inode": -1, "ick": NO_CHECKSUM, "prot": PROT_RW, "wp_frame": -1,
                 "swp": -1}
        for name in ("pte", "zdirty", "merge", "anon", "item", "ist", "inode", "ick", "iage",
                     "iskip", "uffd", "wp_frame", "prot", "dontcopy", "wipe", "swp"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.full(extra, fills.get(name, 0),
                                                             dtype=arr.dtype)]))
        self.n = npages

    def vma_runs(self) -> list[tuple[int, int]]:
        """[start, end) page runs of equal VM_MERGEABLE: the VMAs madvise left."""
        if self.n == 0:
            return []
        change = np.flatnonzero((self.merge[1:] != self.merge[:-1])
                                | (self.uffd[1:] != self.uffd[:-1])
                                | (self.prot[1:] != self.prot[:-1])
                                | (self.dontcopy[1:] != self.dontcopy[:-1])
                                | (self.wipe[1:] != self.wipe[:-1])) + 1
        bounds = [0, *change.tolist(), self.n]
        return list(zip(bounds[:-1], bounds[1:]))

    def mark_anon_vma(self, written: np.ndarray) -> None:
        """A write fault gives its VMA an anon_vma (anon_vma_prepare())."""
        if not written.any():
            return
        for lo, hi in self.vma_runs():
            if written[lo:hi].any():
                self.anon[lo:hi] = True


class MM:
    def __init__(self, name: str, order: int):
        self.name = name
        self.order = order
        self.segments: list[Segment] = []  # address order, ghosts included
        self.regions: dict[str, Segment] = {}  # mapped regions, creation order
        self.next_addr = 0
        self.rmap_items = 0
        self.merging_pages = 0
        self.zero_pages = 0
        self.registered = False  # MMF_VM_MERGEABLE: has a ksm_mm_slot
        self.merge_any = False   # MMF_VM_MERGE_ANY
        self.exiting = False
        self.alive = True

    def has_items(self) -> bool:
        return any(seg.item.any() for seg in self.segments)

    def anon_pages(self) -> int:
        return sum(int(np.count_nonzero(seg.pte > 0)) for seg in self.regions.values())


class SNode(RBNode):
    """struct ksm_stable_node: a regular node, a dup in a chain, or a chain."""

    __slots__ = ("nid", "cid", "is_chain", "chain", "kpfn", "len", "dups", "alive",
                 "prune_batch", "tree")

    def __init__(self, nid: int, cid: int, *, kpfn: int = -1, is_chain: bool = False,
                 tree: int = 0):
        super().__init__()
        self.nid = nid
        #: which root_stable_tree[] holds it (stable_node->nid, DO_NUMA):
        #: get_kpfn_nid() of its page when it was inserted
        self.tree = tree
        self.cid = cid
        self.is_chain = is_chain
        self.chain: Optional[SNode] = None  # the chain holding this dup
        self.kpfn = kpfn
        self.len = 0  # rmap_hlist_len
        self.dups: list[SNode] = []  # chain only, hlist order (head first)
        self.alive = True
        #: chain only: the ksmd batch of its last prune or its creation
        #: (chain_prune_time on the modelled clock, see Ksm._prune_due)
        self.prune_batch = 0


#: errno of a tunable write the kernel refuses while KSM pages exist
EBUSY = 16


class UNode(RBNode):
    """an rmap item in the unstable tree, kept as a real rbtree only
    where the path of a search matters (see Ksm.unstable_rb)."""

    __slots__ = ("cid", "seg", "idx", "tree")

    def __init__(self, cid: int, seg: "Segment", idx: int, tree: int = 0):
        super().__init__()
        self.cid = cid
        self.tree = tree  # rmap_item->nid: its root_unstable_tree[]
        self.seg = seg
        self.idx = idx


@dataclass
class Settings:
    use_zero_pages: bool = False
    max_page_sharing: int = 256
    smart_scan: bool = True
    merge_across_nodes: bool = True
    #: how stable_node_chains_prune_millisecs is modelled (scenario.model.prune_regime):
    #: "always" (0 ms), "per-batch" or "never"
    prune: str = "always"
    #: a swap device is on (scenario ``swap = true``): MADV_PAGEOUT swaps out
    swap: bool = False


class Ksm:
    """Global KSM state plus the processes of one scenario."""

    def __init__(self, profile: Profile, settings: Settings, contents: ContentTable | None = None):
        self.profile = profile
        self.settings = settings
        self.contents = contents or ContentTable()
        self.frames = Frames()
        self.mms: dict[str, MM] = {}
        self.slots: list[MM] = []  # ksmd's mm list (the sentinel, always first, is implicit)
        #: root_stable_tree[nid]: one tree while merge_across_nodes=1 (every
        #: page's get_kpfn_nid() is 0), one per NUMA node while it is 0
        #: (90bd6fd31c80, 3.9); created as pages need them
        self.roots: dict[int, RBRoot] = {0: RBRoot()}
        self.nodes: list[SNode] = []
        # counters (mm/ksm.c statics)
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.rmap_items = 0
        self.zero_pages = 0
        self.chains = 0
        self.dups = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.full_scans = 0
        # ksmd's cursor (ksm_scan): the mm slot and the page address where the
        # next batch goes on; None while it rests at the list head (between
        # full scans).  Only a partial batch (scan with pages = N) leaves it
        # inside the list.
        self.cursor: Optional[MM] = None
        self.cursor_addr = 0
        #: ksmd batches run so far: the modelled clock of chain pruning
        self.batches = 0
        #: the scan-time advisor (6.8) when the scenario turns it on; it then
        #: owns pages_to_scan, the size of every batch (:func:`.scan.full_scan`)
        self.advisor: Optional[Advisor] = None
        # this scan's unstable tree: content -> (segment, index)
        self.unstable: dict[int, tuple[Segment, int]] = {}
        self._unstable_key: dict[tuple[int, int], int] = {}
        #: this scan's unstable tree as an rbtree, when a search can
        #: fail on the way (a PROT_NONE tree page before protnone_follow), so
        #: that which pages a search passes matters; else None (the dict is exact)
        self.unstable_rb: Optional[RBRoot] = None
        #: root_unstable_tree[nid] of the other NUMA nodes, as rbtrees (the
        #: dict keys their items by (node, content), see _unstable_search_insert)
        self._unstable_rbs: dict[int, RBRoot] = {}
        #: a region was bound to a NUMA node other than 0 (op mmap, node):
        #: full scans then take the per-visit path, which models the trees per node
        self.numa_used = False
        self._unstable_nodes: dict[tuple[int, int], UNode] = {}
        self.tracking = profile.has("zero_page_tracking")
        self.checksum_first = profile.has("checksum_first")
        self.smart = profile.has("smart_scan") and settings.smart_scan
        self.count_scanned = profile.has("pages_scanned_fix")
        self.stable_reset = profile.has("stable_item_reset")
        #: follow_page() finds PROT_NONE pages (d74943a2f3cd, 6.5)
        self.protnone_follow = profile.has("protnone_follow")
        # swap (settings.swap): one slot per swap entry written; its content,
        # the PTEs that hold it (the swap count), and the folio in the swap
        # cache for it (-1: none).  frame_slot: frames in the swap cache
        self.slot_content: list[int] = []
        self.slot_refs: list[int] = []
        self.slot_cache: list[int] = []
        self.frame_slot: dict[int, int] = {}
        #: (anon_vma root, page index) a swap-cache folio was first mapped at
        self.frame_rmap: dict[int, tuple[int, int]] = {}
        #: a THP split maps zero-filled subpages to the zero page (b1f202060afe, 6.12)
        self.zero_remap = profile.has("thp_split_zero_remap")
        #: the THPs not yet split: folio id -> (segment, first page of its chunk)
        self.thps: dict[int, tuple[Segment, int]] = {}

    # -- helpers ---------------------------------------------------------------------
    @property
    def root(self) -> RBRoot:
        """root_stable_tree[0]: the only tree while merge_across_nodes=1
        (the numpy path, :mod:`.fastscan`, runs only where it is the only one)."""
        return self.roots[0]

    def tree_of(self, frame: int) -> int:
        """get_kpfn_nid(): the tree (stable and unstable) a page belongs to:
        0 while merge_across_nodes=1, else the page's NUMA node."""
        if self.settings.merge_across_nodes:
            return 0
        return int(self.frames.numa[frame])

    def _stable_root(self, tree: int) -> RBRoot:
        root = self.roots.get(tree)
        if root is None:
            root = self.roots[tree] = RBRoot()
        return root

    def _unstable_root(self, tree: int) -> RBRoot:
        if tree == 0:
            return self.unstable_rb
        root = self._unstable_rbs.get(tree)
        if root is None:
            root = self._unstable_rbs[tree] = RBRoot()
        return root

    @staticmethod
    def _unstable_dict_key(tree: int, cid: int):
        """The unstable dict's key: the content on tree 0 (what the numpy
        path uses), (tree, content) on the other nodes' trees."""
        return cid if tree == 0 else (tree, cid)

    def stale(self, node: SNode) -> bool:
        return self.frames.mapcount[node.kpfn] <= 0

    def candidate(self, node: SNode, offset: int = 0) -> bool:
        """__is_page_sharing_candidate()."""
        return node.len > 0 and node.len + offset < self.settings.max_page_sharing

    def _new_node(self, cid: int, *, kpfn: int = -1, is_chain: bool = False,
                  tree: int = 0) -> SNode:
        node = SNode(len(self.nodes), cid, kpfn=kpfn, is_chain=is_chain, tree=tree)
        self.nodes.append(node)
        return node

    def all_segments(self) -> Iterator[Segment]:
        for mm in self.mms.values():
            yield from mm.segments

    # -- processes ---------------------------------------------------------------------
    def spawn(self, name: str) -> MM:
        mm = MM(name, len(self.mms))
        self.mms[name] = mm
        return mm

    def _ksm_enter(self, mm: MM) -> None:
        """__ksm_enter(): a new slot goes just behind the cursor, which rests at
        the list head between scans, i.e. at the tail."""
        if not mm.registered:
            mm.registered = True
            # list_add_tail(..., &ksm_scan.mm_slot->slot.mm_node): just before
            # the cursor's slot, which at the head means at the tail
            if self.cursor is None:
                self.slots.append(mm)
            else:
                self.slots.insert(self.slots.index(self.cursor), mm)

    def mmap(self, mm: MM, region: str, npages: int, thp: bool, numa: int = 0) -> None:
        # the agent places regions in creation order, one guard page apart,
        # THP regions on a 512-page boundary (backends/agent.py)
        start = mm.next_addr
        if thp:
            start = -(-start // 512) * 512
        seg = Segment(mm, region, start, npages, thp)
        seg.numa = numa
        self.numa_used = self.numa_used or numa != 0
        mm.next_addr = start + npages + 1
        mm.segments.append(seg)
        mm.regions[region] = seg
        if mm.merge_any:
            # ksm_add_vma()/ksm_vma_flags(): new VMAs of a MERGE_ANY mm are mergeable
            seg.merge[:] = True
            if not mm.registered and self.profile.has("merge_any_kept"):
                # 590c03ca6a3f (6.18): re-enter if ksmd dropped the slot
                self._ksm_enter(mm)

    def fill(self, mm: MM, region: str, first: int, end: int, contents: np.ndarray) -> None:
        seg = mm.regions[region]
        self._swap_in(seg, first, end)  # do_swap_page(), then the write (below)
        if seg.thp:
            self._thp_faults(seg, first, end)
        pte = seg.pte[first:end]
        fr = self.frames
        anon = pte > 0
        old = pte[anon]
        cow = np.zeros(pte.size, dtype=bool)
        if old.size:
            # do_wp_page(): KSM folios are never reused; a folio mapped more
            # than once (fork) is copied; an exclusive one is written in place
            cow[anon] = (fr.node[old] >= 0) | (fr.mapcount[old] > 1)
            if self.frame_slot:
                # wp_can_reuse_anon_folio(): a folio in the swap cache is reused
                # only when folio_free_swap() can drop it, i.e. no other PTE
                # still holds its swap entry; else it is copied and stays cached
                cow[anon] |= np.array([self._cached_for_others(int(f)) for f in old], dtype=bool)
        fresh = (pte <= 0) | cow
        inplace = anon & ~cow
        if inplace.any():
            fr.content[pte[inplace]] = contents[inplace]
            fr.lazy[pte[inplace]] = -2  # a write dirties a lazy-free folio again
            for f in pte[inplace].tolist():
                self._uncache(f)  # folio_free_swap(): no longer in the swap cache
        zero = pte == 0
        if zero.any():
            self._drop_zero_ptes(seg, first + np.flatnonzero(zero))
        if cow.any():
            fr.unmap(pte[cow])
        if fresh.any():
            pte[fresh] = fr.alloc(contents[fresh], seg.numa)
        written = np.zeros(seg.n, dtype=bool)
        written[first:end] = True
        seg.mark_anon_vma(written)

    # -- THP regions --------------------------------------------------------------------
    def _thp_faults(self, seg: Segment, first: int, end: int) -> None:
        """A write to a THP region: do_huge_pmd_anonymous_page() maps a whole
        zero-filled huge page at the first write fault in a 2 MiB chunk whose
        PMD is still empty (no page of the chunk ever present) and which one
        VMA covers whole (thp_vma_suitable_order()).  The region starts on a
        2 MiB boundary (agent.op_mmap), so chunks are runs of HPAGE_PMD_NR
        pages from its start.  That the allocation succeeded is checked by
        the agent, which makes the scenario not applicable where it did not."""
        bounds = {b for run in seg.vma_runs() for b in run}
        lo = first - first % HPAGE_PMD_NR
        for c in range(lo, end, HPAGE_PMD_NR):
            ce = c + HPAGE_PMD_NR
            if ce > seg.vma_end or (seg.pte[c:ce] != -1).any():
                continue
            if any(c < b < ce for b in bounds):
                continue
            frames = self.frames.alloc_thp(seg.numa)  # the region's mbind() node
            seg.pte[c:ce] = frames
            self.thps[int(frames[0])] = (seg, c)

    def _split_thp(self, folio: int) -> None:
        """split_huge_page(): every subpage becomes a small folio, mapped by a
        PTE where the PMD mapped it.  Since b1f202060afe (6.12) remap_page()
        maps each zero-filled subpage to the shared zero page instead, with a
        clean PTE (pte_mkspecial, no mkdirty): not a KSM zero page, and the
        subpage's frame is freed."""
        seg, c = self.thps.pop(folio)
        fr = self.frames
        frames = np.arange(folio, folio + HPAGE_PMD_NR, dtype=np.int64)
        fr.folio[frames] = -1
        if not self.zero_remap or not seg.mapped:
            return
        pte = seg.pte[c:c + HPAGE_PMD_NR]
        mapped = (pte >= folio) & (pte < folio + HPAGE_PMD_NR)
        zero = mapped & (fr.content[np.maximum(pte, 0)] == ZERO)
        if zero.any():
            fr.unmap(pte[zero])
            pte[zero] = 0
            seg.zdirty[c:c + HPAGE_PMD_NR][zero] = False

    def _split_to_merge(self, seg: Segment, idx: int, frame: int, partner: int = -1) -> bool:
        """try_to_merge_one_page() up to write_protect_page(): a subpage of a
        THP is split out first.  False when the merge cannot go on: the split
        fails because ksmd holds a second reference to the same THP (its
        ``partner`` page, the unstable tree page), or the page is no longer
        mapped there (the split mapped it to the zero page, so
        write_protect_page() does not find it)."""
        if int(seg.pte[idx]) != frame:
            return False
        folio = int(self.frames.folio[frame])
        if folio < 0:
            return True
        if partner > 0 and int(self.frames.folio[partner]) == folio:
            return False
        self._split_thp(folio)
        return int(seg.pte[idx]) == frame

    def _break_cow(self, seg: Segment, idx: int, frame: int) -> None:
        """break_cow() on a page try_to_merge_two_pages() had just made a KSM
        page when the tree page's merge failed: it is unshared (copied), so
        it is an ordinary anonymous page again.  Since 7.3 break_cow() also
        zeroes the item's linear_page_index, and with it the oldchecksum, age
        and remaining_skips it overlays (stable_item_reset), although the
        item was never on the stable tree: the page needs two more visits."""
        self.frames.unmap(np.array([frame], dtype=np.int64))
        seg.pte[idx] = self.frames.alloc(self.frames.content[[frame]])[0]
        self._left_stable_tree(seg, idx)

    def thp_pages(self, seg: Segment) -> int:
        """Pages of the segment mapped from a THP not yet split (KPF_THP)."""
        anon = seg.pte[seg.pte > 0]
        return int(np.count_nonzero(self.frames.folio[anon] >= 0)) if anon.size else 0
    # -- end of THP regions ---------------------------------------------------------------

    def _drop_zero_ptes(self, seg: Segment, idx: np.ndarray) -> None:
        """A zero PTE goes away (zap, write fault, unshare): KSM-placed ones
        are uncounted at once (ksm_might_unmap_zero_page(), e2942062e01d)."""
        dirty = int(np.count_nonzero(seg.zdirty[idx]))
        if dirty and self.tracking:
            self.zero_pages -= dirty
            seg.mm.zero_pages -= dirty
        seg.zdirty[idx] = False

    def read(self, mm: MM, region: str, first: int, end: int) -> None:
        # do_anonymous_page() read fault: the shared zero page, clean, no anon_vma
        seg = mm.regions[region]
        self._swap_in(seg, first, end)
        pte = seg.pte[first:end]
        pte[pte < 0] = 0

    # -- swap (scenarios with swap = true; README "Swap") -------------------------
    def _new_slot(self, content: int) -> int:
        self.slot_content.append(content)
        self.slot_refs.append(0)
        self.slot_cache.append(-1)
        return len(self.slot_content) - 1

    def _cached_for_others(self, frame: int) -> bool:
        slot = self.frame_slot.get(frame)
        return slot is not None and self.slot_refs[slot] > 0

    def _uncache(self, frame: int) -> None:
        slot = self.frame_slot.pop(frame, None)
        if slot is not None:
            self.slot_cache[slot] = -1

    def _put_slot(self, slot: int) -> None:
        """One PTE lets go of a swap entry (swap_free(), free_swap_and_cache())."""
        self.slot_refs[slot] -= 1
        cached = self.slot_cache[slot]
        if self.slot_refs[slot] == 0 and cached >= 0 and self.frames.mapcount[cached] <= 0:
            self._uncache(cached)  # nothing maps or will map the cached folio

    def _swap_out(self, seg: Segment, idx: np.ndarray) -> None:
        """shrink_folio_list() on folios mapped once: add_to_swap() (a folio
        already in the swap cache keeps its slot), try_to_unmap() puts the swap
        entry in the PTE (rmap_walk_ksm() for a KSM folio), pageout() writes
        it.  zram completes the write at once, so the folio is freed in the
        same call (__remove_mapping()); a KSM page's stable node is stale then."""
        fr = self.frames
        fr.unmap(seg.pte[idx])
        for i in idx.tolist():
            frame = int(seg.pte[i])
            slot = self.frame_slot.pop(frame, None)
            if slot is None:
                slot = self._new_slot(int(fr.content[frame]))
            self.slot_cache[slot] = -1
            self.slot_refs[slot] += 1
            seg.swp[i] = slot
            seg.pte[i] = -1

    def reclaim_all(self) -> None:
        """op "reclaim": memory.reclaim on the scenario's cgroup until nothing
        more can go.  shrink_folio_list() takes every folio on the LRU, however
        many PTEs map it: try_to_unmap() (rmap_walk_ksm() for a KSM page)
        turns each PTE into the same swap entry, and the folio is freed, so
        a KSM page's stable node goes stale.  A clean lazy-free folio is
        discarded; a folio already in the swap cache keeps its slot; the
        zero page is on no LRU and stays."""
        fr = self.frames
        slot_of: dict[int, int] = {}
        for mm in self.mms.values():
            if not mm.alive:
                continue
            for seg in mm.regions.values():
                idx = np.flatnonzero(seg.pte > 0)
                fr.unmap(seg.pte[idx])
                for i in idx.tolist():
                    frame = int(seg.pte[i])
                    slot = slot_of.get(frame)
                    if slot is None:
                        lazy = fr.lazy[frame] != -2 and fr.lazy[frame] == fr.node[frame]
                        slot = -1 if lazy else self.frame_slot.pop(frame, None)
                        if slot is None:
                            slot = self._new_slot(int(fr.content[frame]))
                        if slot >= 0:
                            self.slot_cache[slot] = -1
                        slot_of[frame] = slot
                    if slot >= 0:
                        self.slot_refs[slot] += 1
                        seg.swp[i] = slot
                    seg.pte[i] = -1
        for frame in list(self.frame_slot):
            self._uncache(frame)  # unmapped folios in the swap cache are reclaimed too

    def _swap_in(self, seg: Segment, first: int, end: int) -> None:
        """do_swap_page() on every swap entry in [first, end).  On zram
        (SWP_SYNCHRONOUS_IO) an entry held by this PTE alone is read into a
        new folio without the swap cache; one a fork shares goes through the
        swap cache (swapin_readahead()), where the folio stays after a read
        fault (should_try_to_free_swap()), so the other holders map that same
        folio when they fault.  The content comes back; the folio is an
        ordinary anonymous page (not a KSM page: the KSM folio was freed)."""
        swapped = np.flatnonzero(seg.swp[first:end] >= 0) + first
        fr = self.frames
        for i in swapped.tolist():
            slot = int(seg.swp[i])
            frame = self.slot_cache[slot]
            here = (seg.av_root, seg.pgoff + i)
            if frame >= 0 and self.frame_rmap.get(frame, here) == here:
                fr.map(np.asarray([frame], dtype=np.int64))
            elif frame >= 0:
                # ksm_might_need_to_copy(): the swap-cache folio already has an
                # anon_vma and an index, and this PTE is at another index or
                # under another anon_vma root (the entry was a KSM page's,
                # mapped at several addresses; PageKsm was lost at swap-out):
                # the fault gets a copy, and the folio stays in the swap cache
                frame = int(fr.alloc(np.asarray([fr.content[frame]], dtype=np.int64))[0])
            else:
                frame = int(fr.alloc(np.asarray([self.slot_content[slot]], dtype=np.int64))[0])
                if self.slot_refs[slot] > 1:
                    self.slot_cache[slot] = frame
                    self.frame_slot[frame] = slot
                    self.frame_rmap[frame] = here
            seg.pte[i] = frame
            seg.swp[i] = -1
            self._put_slot(slot)

    def zap(self, seg: Segment, first: int, end: int) -> None:
        """zap_pte_range(): MADV_DONTNEED, munmap, exit_mmap."""
        pte = seg.pte[first:end]
        anon = pte > 0
        self.frames.unmap(pte[anon])
        swp = seg.swp[first:end]
        for slot in swp[swp >= 0].tolist():
            self._put_slot(slot)
        swp[:] = -1
        if self.frame_slot:
            for f in pte[anon].tolist():
                slot = self.frame_slot.get(f)
                if slot is not None and self.slot_refs[slot] == 0 and self.frames.mapcount[f] <= 0:
                    self._uncache(f)
        zero = np.flatnonzero(pte == 0) + first
        if zero.size:
            self._drop_zero_ptes(seg, zero)
        pte[:] = -1

    def _unshare(self, seg: Segment, first: int, end: int) -> None:
        """unmerge_ksm_pages() over [first, end): break_ksm() on KSM pages and,
        since 6.6 (79271476b336), on KSM zero pages; each gets a private copy."""
        pte = seg.pte[first:end]
        fr = self.frames
        ksm = np.zeros(pte.size, dtype=bool)
        anon = pte > 0
        if anon.any():
            ksm[anon] = fr.node[pte[anon]] >= 0
        if ksm.any() and not self.profile.has("uffd_wp_unshare"):
            # before 6cce3314b928 (6.2) break_ksm() took a fake write fault,
            # which userfaultfd-wp answers with VM_FAULT_SIGBUS for a PTE that
            # has the uffd-wp bit; break_ksm() then returned 0, page still merged
            ksm &= ~(seg.uffd[first:end] & (seg.wp_frame[first:end] == pte))
        if not self.protnone_follow:
            # before d74943a2f3cd (6.5) break_ksm()'s follow_page() treats a
            # PROT_NONE PTE as absent (pte_protnone, 474098edac26): not unshared
            ksm &= seg.prot[first:end] != PROT_NONE
        if ksm.any():
            old = pte[ksm]
            fr.unmap(old)
            pte[ksm] = fr.alloc(fr.content[old], seg.numa)
        if self.tracking:
            zero = seg.zdirty[first:end] & (pte == 0)
            if zero.any():
                idx = np.flatnonzero(zero) + first
                self._drop_zero_ptes(seg, idx)
                seg.pte[idx] = fr.alloc(np.zeros(idx.size, dtype=np.int64), seg.numa)

    def _unmerge_range(self, seg: Segment, first: int, end: int) -> None:
        """ksm_madvise(MADV_UNMERGEABLE) / __ksm_del_vma() on part of a segment:
        only VMAs that are VM_MERGEABLE (and have an anon_vma) are unshared."""
        for lo, hi in seg.vma_runs():
            lo, hi = max(lo, first), min(hi, end)
            if lo >= hi or not seg.merge[lo] or not seg.anon[lo]:
                continue
            self._unshare(seg, lo, hi)
        seg.merge[first:end] = False

    def madvise(self, mm: MM, region: str, first: int, end: int, advice: str) -> None:
        seg = mm.regions[region]
        if advice == "mergeable":
            if not seg.merge[first:end].all():
                self._ksm_enter(mm)
                seg.merge[first:end] = True
        elif advice == "unmergeable":
            self._unmerge_range(seg, first, end)
        elif advice == "dontneed":
            self.zap(seg, first, end)
        elif advice in ("free", "cold", "pageout", "dontfork", "wipeonfork"):
            self._madvise_vma_ops(seg, first, end, advice)
        else:  # pragma: no cover - the loader validates advice
            raise ValueError(advice)

    # --- the VMA ops: mprotect, mremap, write_byte, madvise advices ---------------
    def _madvise_vma_ops(self, seg: Segment, first: int, end: int, advice: str) -> None:
        fr = self.frames
        if advice == "dontfork":
            seg.dontcopy[first:end] = True  # VM_DONTCOPY, read by dup_mmap()
        elif advice == "wipeonfork":
            seg.wipe[first:end] = True  # VM_WIPEONFORK
        elif advice == "free":
            # madvise_free_pte_range(): a folio mapped once is made clean and
            # lazy-free (folio_mark_lazyfree()); a shared one (KSM, fork) and the
            # zero page are skipped.  Nothing is freed until reclaim
            pte = seg.pte[first:end]
            frames = pte[pte > 0]
            once = frames[fr.mapcount[frames] == 1]
            if self.frame_slot:
                # a folio in the swap cache is made lazy-free only if
                # folio_free_swap() can drop its swap entry (no other PTE holds it)
                once = np.asarray([f for f in once.tolist() if not self._cached_for_others(f)],
                                  dtype=np.int64)
                for f in once.tolist():
                    self._uncache(f)
            fr.lazy[once] = fr.node[once]
            # ... and a swap entry is dropped (free_swap_and_cache(),
            # pte_clear_not_present_full()): the page reads back empty
            swp = seg.swp[first:end]
            for slot in swp[swp >= 0].tolist():
                self._put_slot(slot)
            swp[:] = -1
        elif advice == "pageout":
            # madvise_cold_or_pageout_pte_range() + reclaim_pages(): folios
            # mapped once are reclaimed (a KSM page mapped by several PTEs, a
            # page still shared after fork and the zero page, KSM zero pages
            # too, are skipped).  A clean lazy-free one is discarded
            # (try_to_unmap_one()).  A folio made a KSM page after MADV_FREE
            # was dirtied by the merge (try_to_merge_one_page()), so it is
            # not.  Without swap no other anonymous folio can be reclaimed
            # (add_to_swap() fails, it stays mapped); with swap the others
            # go to swap (_swap_out)
            pte = seg.pte[first:end]
            idx = np.flatnonzero(pte > 0)
            frames = pte[idx]
            once = fr.mapcount[frames] == 1
            gone = once & (fr.lazy[frames] == fr.node[frames])
            gone &= fr.lazy[frames] != -2
            if gone.any():
                fr.unmap(frames[gone])
                pte[idx[gone]] = -1
            if self.settings.swap:
                out = once & ~gone
                if out.any():
                    self._swap_out(seg, first + idx[out])
        # "cold" only deactivates: nothing a scenario observes changes

    def mprotect(self, mm: MM, region: str, first: int, end: int, prot: str) -> None:
        """mprotect(): the VMA's protection (the range becomes its own VMA).
        change_pte_range() keeps every PTE, its dirty bit (a KSM zero page
        stays one) and a KSM page's write protection."""
        mm.regions[region].prot[first:end] = PROT_CODES[prot]

    def write_byte(self, mm: MM, region: str, first: int, end: int, values: np.ndarray) -> None:
        """A FOLL_FORCE write of one byte per page (/proc/self/mem): the same
        faults as ``fill`` (do_anonymous_page(), do_wp_page(): a KSM page or a
        zero page is copied), the page keeping its other bytes."""
        seg = mm.regions[region]
        self._swap_in(seg, first, end)  # the write fault reads a swapped page back first
        pte = seg.pte[first:end]
        old = np.where(pte > 0, self.frames.content[np.maximum(pte, 0)], ZERO)
        self.fill(mm, region, first, end, self.contents.with_first_byte(old, values))

    def mremap(self, mm: MM, region: str, pages: int, move: bool) -> None:
        seg = mm.regions[region]
        old = self._vma_pages(seg)
        if pages < old:
            # the tail is unmapped (do_vmi_munmap()); its rmap items wait for ksmd
            self.zap(seg, pages, old)
            seg.merge[pages:old] = False
            seg.anon[pages:old] = False
        if not move:
            if pages > seg.n:
                seg.grow(pages)
            if pages > old:
                # vma_expand(): the new pages are part of the same VMA (VM_UFFD_WP
                # too; an empty PTE there has no uffd-wp bit, so writes go through)
                for arr in (seg.merge, seg.anon, seg.uffd, seg.prot, seg.dontcopy, seg.wipe):
                    arr[old:pages] = arr[old - 1]
            if mm.next_addr == seg.start + old + 1:
                # the agent places the next region just after the top one, as
                # it is now, shrunk or grown (agent.op_mremap): found by the
                # differential test, a region mapped after a shrink lay behind
                # ksmd's cursor
                mm.next_addr = seg.start + pages + 1
            seg.vma_end = pages
            return
        # move_vma(): ksm_madvise(MADV_UNMERGEABLE) on the old range first, with
        # a copy of vm_flags, so the VMA stays VM_MERGEABLE: every KSM page (and
        # since 6.6 KSM zero page) is unshared; then the page tables move
        keep = min(pages, old)
        if seg.merge[0] and seg.anon[0]:
            self._unshare(seg, 0, keep)
        new = Segment(mm, region, mm.next_addr, pages, seg.thp)
        new.numa = seg.numa  # the policy moves with the VMA; pages are not migrated
        new.av_root, new.pgoff = seg.av_root, seg.pgoff  # move_vma() keeps both
        mm.next_addr = new.start + pages + 1
        for name in ("pte", "zdirty", "merge", "anon", "prot", "dontcopy", "wipe", "swp"):
            src = getattr(seg, name)
            dst = getattr(new, name)
            dst[:keep] = src[:keep]
            if name not in ("pte", "zdirty", "swp"):
                dst[keep:] = src[0]  # one VMA: uniform (the loader checks)
        seg.pte[:] = -1
        seg.swp[:] = -1  # move_ptes() moves swap entries with the rest
        seg.zdirty[:] = False
        mm.segments.append(new)
        mm.regions[region] = new
        self._unmap_segment(mm, seg)

    @staticmethod
    def _vma_pages(seg: Segment) -> int:
        return seg.vma_end

    def needs_page_walks(self) -> bool:
        """True when the scan must go page by page: before protnone_follow a
        PROT_NONE page in the unstable tree makes searches fail, which the
        windows of fastscan do not model."""
        if any(seg.mapped for seg, _ in self.thps.values()):
            # a THP split can map an unstable tree page to the zero page
            # mid-scan; searches that meet it fail (get_mergeable_page())
            return True
        return not self.protnone_follow and any(
            (seg.prot == PROT_NONE).any() for seg in self.all_segments() if seg.mapped)
    # --- end of the VMA ops -------------------------------------------------------

    def prctl(self, mm: MM, merge: bool) -> None:
        if merge:
            # ksm_enable_merge_any() (6.4, d7597f59d1d3)
            if mm.merge_any:
                return
            self._ksm_enter(mm)
            mm.merge_any = True
            for seg in mm.regions.values():
                seg.merge[:] = True
        else:
            # ksm_disable_merge_any(): a no-op unless MERGE_ANY is set
            if not mm.merge_any:
                return
            for seg in mm.regions.values():
                self._unmerge_range(seg, 0, seg.n)
            mm.merge_any = False

    def munmap(self, mm: MM, region: str) -> None:
        seg = mm.regions.pop(region)
        self.zap(seg, 0, seg.n)
        self._unmap_segment(mm, seg)

    def _unmap_segment(self, mm: MM, seg: Segment) -> None:
        seg.mapped = False
        seg.merge[:] = False
        if not seg.item.any():
            mm.segments.remove(seg)

    def fork(self, parent: MM, child_name: str) -> MM:
        child = self.spawn(child_name)
        child.next_addr = parent.next_addr
        child.merge_any = parent.merge_any  # inherited (6.4; MMF_INIT_MASK since 6.7)
        for name, seg in parent.regions.items():
            copy = seg.copy_for_fork(child)
            child.segments.append(copy)
            child.regions[name] = copy
            self.frames.map(copy.pte[copy.pte > 0])
            for slot in copy.swp[copy.swp >= 0].tolist():
                self.slot_refs[slot] += 1
        # dup_mm() copies the whole mm_struct, KSM counters included
        child.rmap_items = parent.rmap_items
        child.merging_pages = parent.merging_pages
        child.zero_pages = parent.zero_pages if self.tracking else 0
        if parent.registered:
            if self.profile.has("fork_counter_fix"):
                # ksm_fork() since 4d6fc29f3634 (6.18, stable 6.6+)
                child.merging_pages = 0
                child.rmap_items = 0
                self.zero_pages += child.zero_pages
            self._ksm_enter(child)
        return child

    def exit(self, mm: MM) -> None:
        # __mmput(): ksm_exit() first, then exit_mmap() zaps everything
        if mm.registered and mm is not self.cursor:
            # __ksm_exit(); a slot at the cursor is left alone for ksmd
            self.slots.remove(mm)
            if mm.has_items():
                # "leave the mm_slot on the list for ksmd to free", moved
                # right after the cursor (the head between scans)
                at = 0 if self.cursor is None else self.slots.index(self.cursor) + 1
                self.slots.insert(at, mm)
            else:
                mm.registered = False
                mm.merge_any = False
        mm.exiting = True
        mm.alive = False
        for name, seg in list(mm.regions.items()):
            self.zap(seg, 0, seg.n)
            del mm.regions[name]
            self._unmap_segment(mm, seg)

    # -- op "exec" ----------------------------------------------------------------
    def exec(self, mm: MM) -> MM:
        """execve(): bprm_mm_init() builds a new mm, which takes the old one's
        MMF_INIT_MASK flags, then exec_mmap() drops the old mm (__mmput():
        ksm_exit(), exit_mmap()).  The process keeps its name; the old mm is
        kept aside (not alive) until ksmd has freed its rmap items."""
        new = MM(mm.name, mm.order)
        if mm.merge_any and self.profile.has("merge_any_exec"):
            # MMF_VM_MERGE_ANY joined MMF_INIT_MASK in 3c6f33b7273a (6.7)
            new.merge_any = True
            if self.profile.has("ksm_execve"):
                # ksm_execve() (3a9e567ca45f, 6.10): __ksm_enter() at exec; before
                # it the new mm had the flag but no slot, and was never scanned
                self._ksm_enter(new)
        self.exit(mm)
        self.mms[f"{mm.name}#before-exec-{len(self.mms)}"] = mm
        self.mms[mm.name] = new  # same key: same place in creation order
        return new

    # -- op "uffd_wp" -------------------------------------------------------------
    def uffd_wp(self, mm: MM, region: str, first: int, end: int) -> None:
        """UFFDIO_REGISTER_MODE_WP (sets VM_UFFD_WP, splitting the VMA) and
        UFFDIO_WRITEPROTECT (the uffd-wp bit on every present PTE; an empty
        anonymous PTE gets none without UFFD_FEATURE_WP_UNPOPULATED)."""
        seg = mm.regions[region]
        seg.uffd[first:end] = True
        pte = seg.pte[first:end]
        seg.wp_frame[first:end] = np.where(pte >= 0, pte, seg.wp_frame[first:end])
    # -- end of exec and uffd_wp ------------------------------------------------------------

    # -- run=2 ---------------------------------------------------------------------------
    def unmerge_all(self) -> None:
        """unmerge_and_remove_all_rmap_items()."""
        for mm in list(self.slots):
            if not mm.exiting:
                for seg in list(mm.segments):
                    if not seg.mapped:
                        continue
                    for lo, hi in seg.vma_runs():
                        if seg.merge[lo] and seg.anon[lo]:
                            self._unshare(seg, lo, hi)
            for seg in list(mm.segments):
                for idx in np.flatnonzero(seg.item).tolist():
                    self._free_item(seg, idx)
            self._drop_empty_ghosts(mm)
            if mm.exiting:
                self.slots.remove(mm)
                mm.registered = False
                mm.merge_any = False
        self._remove_all_stable_nodes()
        self.unstable.clear()
        self._unstable_key.clear()
        self.cursor = None  # the walk above leaves ksm_scan.mm_slot at the head

    def _remove_all_stable_nodes(self) -> bool:
        """remove_all_stable_nodes(): a node whose page is still mapped is busy
        (-EBUSY) and stops the walk of the trees (root_stable_tree[nid], node
        by node); False when one was busy."""
        for tree in sorted(self.roots):
            root = self.roots[tree]
            while root.node is not None:
                node = root.node
                if node.is_chain:
                    for dup in list(node.dups):
                        if not self._remove_stable_node(dup):
                            return False
                    root.erase(node)
                    node.alive = False
                    self.chains -= 1
                elif not self._remove_stable_node(node):
                    return False
        return True

    # -- op "set": one tunable written between steps ------------------------------------
    def set_tunable(self, name: str, value: int) -> tuple[Optional[int], Optional[int]]:
        """A write to /sys/kernel/mm/ksm/<name>: (errno, value now in force),
        both None where the profile's kernel lacks the tunable.

        use_zero_pages and smart_scan only change what later visits do: KSM
        zero pages already mapped stay mapped, marked and counted, and smart
        scan's per-item age and remaining_skips are kept (should_skip_rmap_item()
        returns before touching them while it is off, 5e924ff54d08).
        max_page_sharing_store() and merge_across_nodes_store() refuse a new
        value with -EBUSY while pages_shared is not 0 or remove_all_stable_nodes()
        finds a node still mapped; otherwise that call has emptied the stable
        tree (stale nodes, chains and all) before the value changes.  From then
        on merge_across_nodes decides which tree a page's searches and inserts
        use (:meth:`tree_of`); on one NUMA node it changes nothing else.  The
        unstable items of the scan under way stay in the tree they were put in
        (rmap_item->nid), as in merge_across_nodes_store() (90bd6fd31c80 and
        "ksm: allocate roots when needed", both 3.9: root_unstable_tree[0]
        keeps the one tree's items).
        """
        st = self.settings
        if name == "smart_scan":
            if not self.profile.has("smart_scan"):
                return None, None
            st.smart_scan = bool(value)
            self.smart = st.smart_scan
            return 0, int(st.smart_scan)
        if name == "use_zero_pages":
            st.use_zero_pages = bool(value)
            return 0, int(st.use_zero_pages)
        current = int(getattr(st, name))
        if value != current:
            if self.pages_shared or not self._remove_all_stable_nodes():
                return EBUSY, current
            setattr(st, name, bool(value) if name == "merge_across_nodes" else value)
        return 0, int(getattr(st, name))

    def _remove_stable_node(self, node: SNode) -> bool:
        if self.frames.mapcount[node.kpfn] > 0:
            return False
        self._remove_node_from_stable_tree(node)
        return True

    # -- the stable tree ---------------------------------------------------------------
    def _node_items(self, node: SNode) -> list[tuple[Segment, np.ndarray]]:
        out = []
        for seg in self.all_segments():
            idx = np.flatnonzero((seg.ist == STABLE) & (seg.inode == node.nid))
            if idx.size:
                out.append((seg, idx))
        return out

    def _remove_node_from_stable_tree(self, node: SNode) -> None:
        total = 0
        for seg, idx in self._node_items(node):
            seg.ist[idx] = NONE
            seg.inode[idx] = -1
            self._left_stable_tree(seg, idx)
            seg.mm.merging_pages -= int(idx.size)
            total += int(idx.size)
        assert total == node.len, "stable node length out of step with its items"
        if total:
            # the hlist's last item counted in pages_shared, the others in pages_sharing
            self.pages_shared -= 1
            self.pages_sharing -= total - 1
        node.len = 0
        if node.chain is not None:
            node.chain.dups.remove(node)
            node.chain = None
            self.dups -= 1
        else:
            self.roots[node.tree].erase(node)
        node.alive = False

    def _get_folio(self, node: SNode) -> Optional[int]:
        """ksm_get_folio(): the KSM page, or None after pruning a stale node."""
        if self.stale(node):
            self._remove_node_from_stable_tree(node)
            return None
        return node.kpfn

    def _chain(self, node: SNode, prune: bool) -> tuple[Optional[int], Optional[SNode], SNode]:
        """__stable_node_chain(): (tree page, dup, node now at this tree position).

        Whether a chain_prune() walk really prunes is stable_node_dup()'s
        clock test, see :meth:`_prune_due`.
        """
        if not node.is_chain:
            kpfn = self._get_folio(node)
            return kpfn, node, node
        if prune:
            prune = self._prune_due(node)
        best = self.profile.has("chain_best_dup")
        found: Optional[SNode] = None
        found_len = 0
        live = 0
        for dup in list(node.dups):
            if self._get_folio(dup) is None:
                continue
            live += 1
            if best:
                # a0b856b617c5 (6.11): the best dup, a full one if none has room
                better = found is None or (self.candidate(dup) and (
                    not self.candidate(found) or dup.len > found_len))
            else:
                # before it: only a dup with room
                better = self.candidate(dup) and (found is None or dup.len > found_len)
            if better:
                found = dup
                found_len = dup.len
                if not prune and self.candidate(found):
                    break
        if found is None:
            if node.dups and not best:
                # before a0b856b617c5 every dup is full here (the walk went
                # through all of them): stable_node_dup_any() continues the
                # walk with the first dup's page, and no dup takes a merge
                return node.dups[0].kpfn, None, node
            # free_stable_node_chain(): its hlist must be empty
            self.roots[node.tree].erase(node)
            node.alive = False
            self.chains -= 1
            return None, None, node
        if (len(node.dups) == 1) if best else (prune and live == 1):
            # hlist_is_singular_node() since a0b856b617c5; before it
            # "prune_stale_stable_nodes && nr == 1"
            # one dup left: drop the chain, the dup takes its place in the tree
            self.roots[node.tree].replace(node, found)
            found.chain = None
            node.dups = []
            node.alive = False
            self.chains -= 1
            self.dups -= 1
            return found.kpfn, found, found
        if node.dups[0] is not found and self.candidate(found, 1):
            node.dups.remove(found)
            node.dups.insert(0, found)
        return found.kpfn, found, node

    def _prune_due(self, chain: SNode) -> bool:
        """stable_node_dup(): prune unless time_before(jiffies, chain_prune_time +
        stable_node_chains_prune_millisecs); a prune resets chain_prune_time.
        On the modelled clock (docs/stepping.md): 0 ms always prunes; the
        per-batch range prunes once per ksmd batch, the first walk of a batch
        after the one that created or last pruned the chain; "never" does not
        prune within a scenario."""
        if self.settings.prune == "always":
            return True
        if self.settings.prune == "never" or chain.prune_batch >= self.batches:
            return False
        chain.prune_batch = self.batches
        return True

    def _stable_tree_search(self, frame: int) -> Optional[int]:
        """stable_tree_search(): the KSM page to merge with, or None."""
        fr = self.frames
        if fr.node[frame] >= 0:
            return frame  # "ksm page forked"
        cid = int(fr.content[frame])
        compare = self.contents.compare
        # root_stable_tree + get_kpfn_nid(): never a page of another node's tree
        root = self._stable_root(self.tree_of(frame))
        while True:  # "again:"
            node = root.node
            restart = False
            while node is not None:
                tree_page, dup, node = self._chain(node, prune=True)
                if tree_page is None:
                    restart = True
                    break
                c = compare(cid, node.cid)
                if c < 0:
                    node = node.rb_left
                elif c > 0:
                    node = node.rb_right
                else:
                    if dup is None or not self.candidate(dup):
                        return None  # every dup of the chain is full
                    return dup.kpfn
            if not restart:
                return None

    def _stable_tree_insert(self, kframe: int, *, quiet: bool = False) -> SNode:
        """stable_tree_insert().  ``quiet``: the caller knows no walk can change
        the tree (see fastscan), so the chain() calls on the way are skipped."""
        cid = int(self.frames.content[kframe])
        compare = self.contents.compare
        tree = self.tree_of(kframe)
        root = self._stable_root(tree)
        while True:
            parent: Optional[SNode] = None
            left = False
            node = root.node
            need_chain = False
            restart = False
            while node is not None:
                if not quiet:
                    tree_page, _dup, node = self._chain(node, prune=False)
                    if tree_page is None:
                        restart = True
                        break
                c = compare(cid, node.cid)
                parent = node
                if c == 0:
                    need_chain = True
                    break
                left, node = rb_child(c, node)
            if not restart:
                break
        dup = self._new_node(cid, kpfn=kframe, tree=tree)
        if not need_chain:
            root.link(dup, parent, left)
        else:
            chain = parent
            if not chain.is_chain:
                # alloc_stable_node_chain(): the chain takes the node's place
                orig = chain
                chain = self._new_node(cid, is_chain=True, tree=tree)
                chain.prune_batch = self.batches  # alloc_stable_node_chain(): jiffies
                root.replace(orig, chain)
                self.chains += 1
                orig.chain = chain
                chain.dups.insert(0, orig)
                self.dups += 1
            dup.chain = chain
            chain.dups.insert(0, dup)
            self.dups += 1
        self.frames.node[kframe] = dup.nid
        return dup

    def _append(self, seg: Segment, idx: int, node: SNode) -> None:
        """stable_tree_append()."""
        node.len += 1
        seg.ist[idx] = STABLE
        seg.inode[idx] = node.nid
        if node.len > 1:
            self.pages_sharing += 1
        else:
            self.pages_shared += 1
        seg.mm.merging_pages += 1

    def _remove_from_tree(self, seg: Segment, idx: int) -> None:
        """remove_rmap_item_from_tree()."""
        st = seg.ist[idx]
        if st == STABLE:
            node = self.nodes[int(seg.inode[idx])]
            if self._get_folio(node) is None:
                return  # the stale node went, taking this item with it
            node.len -= 1
            if node.len > 0:
                self.pages_sharing -= 1
            else:
                self.pages_shared -= 1
            seg.mm.merging_pages -= 1
            seg.ist[idx] = NONE
            seg.inode[idx] = -1
            self._left_stable_tree(seg, idx)
        elif st == UNSTABLE:
            self.pages_unshared -= 1
            seg.ist[idx] = NONE
            key = self._unstable_key.pop((seg.sid, idx), None)
            if key is not None and self.unstable.get(key) == (seg, idx):
                del self.unstable[key]  # inserted by this scan: rb_erase()
            # the rbtree holds exactly this scan's insertions (its content key
            # may have been taken over by a node whose tree page changed)
            unode = self._unstable_nodes.pop((seg.sid, idx), None)
            if unode is not None:
                self._unstable_root(unode.tree).erase(unode)

    def _left_stable_tree(self, seg: Segment, idx) -> None:
        """An rmap item (or items) just left the stable tree.  Since 7.3
        (stable_item_reset) oldchecksum/age/remaining_skips share a union with
        linear_page_index, which is zeroed here: the item starts over (checksum
        0 matches no page, age 0).  Before, the values from its unstable days
        were kept."""
        if self.stable_reset:
            seg.ick[idx] = NO_CHECKSUM
            seg.iage[idx] = 0
            seg.iskip[idx] = 0

    def _free_item(self, seg: Segment, idx: int) -> None:
        """remove_rmap_item_from_tree() + free_rmap_item()."""
        self._remove_from_tree(seg, idx)
        seg.item[idx] = False
        self.rmap_items -= 1
        seg.mm.rmap_items -= 1

    # -- merging ---------------------------------------------------------------------------
    def _replace(self, seg: Segment, idx: int, kframe: int) -> None:
        """replace_page(): the PTE now maps the KSM page."""
        old = int(seg.pte[idx])
        if old == kframe:  # try_to_merge_one_page(): "ksm page forked"
            return
        self.frames.mapcount[old] -= 1
        self.frames.mapcount[kframe] += 1
        seg.pte[idx] = kframe

    def _checksum_or_zero_ends_visit(self, seg: Segment, idx: int, frame: int) -> bool:
        """cmp_and_merge_page()'s checksum test, then the use_zero_pages merge:
        True when either ends the visit (a changed checksum is only recorded;
        a zero page is replaced by the zero page).  Where in the visit this
        runs depends on the kernel (before or after the stable tree, 6.11)."""
        cid = int(self.frames.content[frame])
        if seg.ick[idx] != cid:
            seg.ick[idx] = cid
            return True
        if self.settings.use_zero_pages and cid == ZERO:
            if not self._split_to_merge(seg, idx, frame):
                # the THP split mapped the page to the zero page: the merge
                # fails and the visit goes on (try_to_merge_with_zero_page())
                return False
            self._zero_merge(seg, idx)
            return True
        return False

    def _zero_merge(self, seg: Segment, idx: int) -> None:
        """replace_page() with the zero page (use_zero_pages, 4.11)."""
        old = int(seg.pte[idx])
        self.frames.mapcount[old] -= 1
        seg.pte[idx] = 0
        if self.tracking:
            # pte_mkdirty marks it (79271476b336) and it is counted (e2942062e01d,
            # 6080d19f0704); dec_mm_counter(MM_ANONPAGES) is implied by the PTE
            seg.zdirty[idx] = True
            self.zero_pages += 1
            seg.mm.zero_pages += 1

    def _unstable_search_insert(self, seg: Segment, idx: int, frame: int):
        """unstable_tree_search_insert().

        The unstable tree is rebuilt every scan and, within one batch, ksmd
        alone changes page tables (the scenario's processes are blocked), so
        in a scan run as one batch every node keeps a valid page and its
        content: a search then fails only at a node with the same content
        (same page: "don't substitute a ksm page for a forked page"), and the
        path taken cannot change the answer.  A dict keyed by content is
        therefore exact.  A scan begun by a partial batch may see steps
        between its batches change tree pages: it walks the rbtree
        (:meth:`_unstable_walk`).
        """
        cid = int(self.frames.content[frame])
        # root_unstable_tree + get_kpfn_nid(): per node while merge_across_nodes=0
        tree = self.tree_of(frame)
        if self.unstable_rb is not None:
            return self._unstable_walk(seg, idx, frame, cid, tree)
        key = self._unstable_dict_key(tree, cid)
        hit = self.unstable.get(key)
        if hit is None:
            seg.ist[idx] = UNSTABLE
            self.pages_unshared += 1
            self.unstable[key] = (seg, idx)
            self._unstable_key[(seg.sid, idx)] = key
            return None
        tseg, tidx = hit
        tframe = int(tseg.pte[tidx])
        if tframe == frame or self._tree_page_elsewhere(tframe, tree):
            return None
        return tseg, tidx, tframe

    def _tree_page_elsewhere(self, tframe: int, tree: int) -> bool:
        """unstable_tree_search_insert() on an equal page: with
        merge_across_nodes=0 a tree page on another node than this tree's
        is not merged with (nor is the page inserted): the tree was built
        under merge_across_nodes=1 earlier in this scan (a set step between
        batches; migration, the case the kernel's comment names, is not
        modelled)."""
        return (not self.settings.merge_across_nodes
                and int(self.frames.numa[tframe]) != tree)

    def _unstable_walk(self, seg: Segment, idx: int, frame: int, cid: int, tree: int = 0):
        """unstable_tree_search_insert() node by node.  Where
        get_mergeable_page() finds no page for a node (:meth:`_tree_page`)
        the search returns NULL: no merge, and this page is not inserted.
        Each node is compared with what its page holds now."""
        root = self._unstable_root(tree)
        node = root.node
        parent: Optional[UNode] = None
        left = False
        compare = self.contents.compare
        while node is not None:
            tframe = self._tree_page(node.seg, node.idx)
            if tframe is None:
                return None
            if tframe == frame:
                return None  # "don't substitute a ksm page for a forked page"
            c = compare(cid, int(self.frames.content[tframe]))
            if c == 0:
                if self._tree_page_elsewhere(tframe, tree):
                    return None
                return node.seg, node.idx, tframe
            parent = node
            left, node = rb_child(c, node)
        unode = UNode(cid, seg, idx, tree)
        root.link(unode, parent, left)
        seg.ist[idx] = UNSTABLE
        self.pages_unshared += 1
        key = self._unstable_dict_key(tree, cid)
        self.unstable[key] = (seg, idx)
        self._unstable_key[(seg.sid, idx)] = key
        self._unstable_nodes[(seg.sid, idx)] = unode
        return None

    def _tree_page(self, seg: Segment, idx: int) -> Optional[int]:
        """get_mergeable_page() for an unstable tree item: the frame mapped
        at its address now, or None where find_mergeable_vma() finds no VMA
        (mm exiting, unmapped, not VM_MERGEABLE, no anon_vma) or the walk no
        anonymous page (none, the zero page, or before protnone_follow,
        d74943a2f3cd (6.5), PROT_NONE).  Between the batches of a scan begun
        by ``scan pages = N`` any step can make this so (found by the
        differential test: madvise unmergeable between batches)."""
        mm = seg.mm
        if (mm.exiting or not mm.alive or not seg.mapped or idx >= seg.vma_end
                or not (seg.merge[idx] and seg.anon[idx])):
            return None
        frame = int(seg.pte[idx])
        if frame <= 0 or (not self.protnone_follow and seg.prot[idx] == PROT_NONE):
            return None
        return frame

    def _cmp_and_merge_page(self, seg: Segment, idx: int, frame: int) -> None:
        fr = self.frames
        page_node = int(fr.node[frame])
        if page_node >= 0:
            node = self.nodes[page_node]
            if seg.ist[idx] == STABLE and seg.inode[idx] == page_node:
                return
            # a KSM fork: allowed over max_page_sharing (the bypass only
            # silences a warning)
        elif self.checksum_first:
            # 6.11+ (ac90c56bbd73 and friends): checksum, then zero page,
            # then the stable tree
            self._remove_from_tree(seg, idx)
            if self._checksum_or_zero_ends_visit(seg, idx, frame):
                return
        kframe = self._stable_tree_search(frame)
        self._remove_from_tree(seg, idx)
        if kframe is not None:
            # try_to_merge_with_ksm_page() + stable_tree_append()
            if not self._split_to_merge(seg, idx, frame):
                return
            self._replace(seg, idx, kframe)
            self._append(seg, idx, self.nodes[int(fr.node[kframe])])
            return
        if not self.checksum_first and page_node < 0:
            # before 6.11: the checksum test comes after the stable tree
            if self._checksum_or_zero_ends_visit(seg, idx, frame):
                return
        if page_node >= 0:  # pragma: no cover - a KSM page always finds its own node
            return
        hit = self._unstable_search_insert(seg, idx, frame)
        if hit is None:
            return
        tseg, tidx, tframe = hit
        # try_to_merge_two_pages(): this page becomes the KSM page, the tree
        # page is replaced by it; the tree item leaves the unstable tree
        if not self._split_to_merge(seg, idx, frame, partner=tframe):
            folio = int(self.frames.folio[frame])
            if folio >= 0 and folio == int(self.frames.folio[tframe]):
                # cmp_and_merge_page(): both pages were of one THP, so the
                # split failed; with the tree page's reference dropped it is
                # split now, and nothing merges in this visit
                self._split_thp(folio)
            return
        if not self._split_to_merge(tseg, tidx, tframe):
            self._break_cow(seg, idx, frame)
            return
        self._remove_from_tree(tseg, tidx)
        self._replace(tseg, tidx, frame)
        node = self._stable_tree_insert(frame)
        self._append(tseg, tidx, node)
        self._append(seg, idx, node)

    # -- the scan ------------------------------------------------------------------------------
    def _alloc_item(self, seg: Segment, idx: int) -> None:
        seg.item[idx] = True
        seg.ist[idx] = NONE
        seg.inode[idx] = -1
        seg.ick[idx] = NO_CHECKSUM
        seg.iage[idx] = 0
        seg.iskip[idx] = 0
        self.rmap_items += 1
        seg.mm.rmap_items += 1

    def visit(self, seg: Segment, idx: int) -> bool:
        """One present anon page in a VM_MERGEABLE VMA, as scan_get_next_rmap_item()
        hands it to cmp_and_merge_page(); False when smart scan skips it (a
        skipped page is not handed on, so it does not count in a batch)."""
        frame = int(seg.pte[idx])
        if not seg.item[idx]:
            self._alloc_item(seg, idx)
        if self.smart and self.frames.node[frame] < 0 and not (
                self.stable_reset and seg.ist[idx] == STABLE):
            # should_skip_rmap_item() (6.7, 5e924ff54d08); KSM pages are never
            # skipped, and since 7.3 (stable_item_reset) neither is an item still
            # on the stable tree (a CoW-broken page): it has no age to read
            age = int(seg.iage[idx])
            if age != U8_MAX:
                seg.iage[idx] = age + 1
            if age >= 3:
                if seg.iskip[idx] == 0:
                    seg.iskip[idx] = skip_age(age)
                else:
                    self.pages_skipped += 1
                    seg.iskip[idx] -= 1
                    self._remove_from_tree(seg, idx)
                    return False
        if self.count_scanned:
            self.pages_scanned += 1
        self._cmp_and_merge_page(seg, idx, frame)
        return True

    def adopt_items(self, mm: MM, start: int = 0) -> None:
        """get_next_rmap_item() keeps the rmap item it finds at the address of
        the page it visits: when a region now lies where another one's items
        still wait for ksmd (an unmapped region, or the tail an in-place mremap
        shrink left, with a region moved or mapped over it), the page takes
        that item over, with its checksum, tree state, age and skips.  Found by
        the differential test (host, seed 700239: a region moved onto a
        shrunk tail inherited its skip schedule)."""
        segs = mm.segments
        if len(segs) < 2:
            return
        for seg in segs:
            if not seg.mapped:
                continue
            visit = seg.merge & (seg.pte > 0) & ~seg.item
            visit[seg.vma_end:] = False
            if not visit.any():
                continue
            for old in segs:
                if old is seg or not old.item.any():
                    continue
                lo, hi = max(seg.start, old.start), min(seg.start + seg.n, old.start + old.n)
                if lo >= hi or hi <= start:
                    continue
                lo = max(lo, start)
                oi = np.arange(lo - old.start, hi - old.start)
                # items the old segment no longer has a page to hand on for
                stale = old.item[oi] & ~(old.mapped & (np.arange(old.n)[oi] < old.vma_end)
                                         & old.merge[oi] & (old.pte[oi] > 0))
                take = stale & visit[oi + old.start - seg.start]
                for o in oi[take].tolist():
                    self._move_item(old, o, seg, o + old.start - seg.start)

    def _move_item(self, src: Segment, i: int, dst: Segment, j: int) -> None:
        for name in ("item", "ist", "inode", "ick", "iage", "iskip"):
            getattr(dst, name)[j] = getattr(src, name)[i]
        src.item[i] = False
        src.ist[i] = NONE
        src.inode[i] = -1
        for table in (self._unstable_key, self._unstable_nodes):
            if (src.sid, i) in table:
                table[(dst.sid, j)] = table.pop((src.sid, i))
        unode = self._unstable_nodes.get((dst.sid, j))
        if unode is not None:
            unode.seg, unode.idx = dst, j
        key = self._unstable_key.get((dst.sid, j))
        if key is not None and self.unstable.get(key) == (src, i):
            self.unstable[key] = (dst, j)
        if src.mm is not dst.mm:  # pragma: no cover - one mm's address space
            raise AssertionError("rmap items move only within an mm")

    def _drop_empty_ghosts(self, mm: MM) -> None:
        mm.segments = [s for s in mm.segments if s.mapped or s.item.any()]

    def scan_mm_slow(self, mm: MM) -> bool:
        """One mm's part of a full scan; False when its slot is to be freed."""
        return self._walk_mm(mm, 0, None)[2]

    def _walk_mm(self, mm: MM, start: int, budget: Optional[int]) -> tuple[int, bool, bool]:
        """scan_get_next_rmap_item() in one mm from page address ``start`` on,
        until ``budget`` pages have been handed on (None: no limit).  Returns
        (pages handed on, whether the walk reached the mm's end, whether the
        slot stays).  A walk that resumes inside the mm (start > 0) keeps the
        slot: ksm_scan.address is no longer 0 (the kernel drops a slot only
        when a walk from address 0 met no VM_MERGEABLE VMA)."""
        if mm.exiting:
            # ksm_test_exit(): address 0, every rmap item freed, slot dropped
            for seg in list(mm.segments):
                for idx in np.flatnonzero(seg.item).tolist():
                    self._free_item(seg, idx)
            self._drop_empty_ghosts(mm)
            return 0, True, False
        found_mergeable = start > 0
        handed = 0
        self.adopt_items(mm, start)
        for seg in list(mm.segments):
            first = max(0, start - seg.start)
            if first >= seg.n:
                continue
            if seg.mapped and seg.merge.any():
                found_mergeable = True
            visit = seg.merge & (seg.pte > 0) if seg.mapped else np.zeros(seg.n, dtype=bool)
            for idx in (np.flatnonzero((visit | seg.item)[first:]) + first).tolist():
                if visit[idx] and seg.pte[idx] <= 0:
                    # a THP split earlier in this walk mapped the page to the
                    # zero page: no anon page here now
                    if not seg.item[idx]:
                        continue
                    visit[idx] = False
                if visit[idx]:
                    if self.visit(seg, idx):
                        handed += 1
                        if handed == budget:
                            # ksm_do_scan() stops right after this page: the
                            # items the walk would pass next stay until then
                            self.cursor_addr = seg.start + idx + 1
                            self._drop_empty_ghosts(mm)
                            return handed, False, True
                else:
                    # get_next_rmap_item() frees items the scan passed over;
                    # remove_trailing_rmap_items() those after the last page
                    self._free_item(seg, idx)
        self._drop_empty_ghosts(mm)
        return handed, True, found_mergeable

    def batch(self, npages: Optional[int]) -> bool:
        """One ksmd batch, ksm_do_scan(npages), by the per-page path: from the
        cursor until ``npages`` pages have been handed to cmp_and_merge_page()
        or the full scan under way completes (None: until it completes, what a
        stepped full scan is).  True when a full scan completed.

        Which pages count: only those handed on; pages smart scan skips, items
        freed on the way and mms dropped do not.  After the N-th page the batch
        ends at once, even at the last page of the list: the full scan then
        completes at the start of the next batch, which hands on nothing.
        """
        self.batches += 1
        if self.cursor is None:
            # steps may come between the batches of this scan: its searches
            # walk the rbtree, where a changed tree page matters
            self.start_scan(walks=npages is not None)
            i, start = 0, 0
        else:
            i, start = self.slots.index(self.cursor), self.cursor_addr
        handed = 0
        while i < len(self.slots):
            mm = self.slots[i]
            n, reached_end, keep = self._walk_mm(
                mm, start, None if npages is None else npages - handed)
            handed += n
            if not reached_end:
                self.cursor = mm
                self._count_batch(npages, completed=False)
                return False
            if keep:
                i += 1
            else:
                self._drop_slot(mm, i)
            start = 0
        self.cursor = None
        self.cursor_addr = 0
        self.full_scans += 1  # ksm_scan.seqnr++
        self._count_batch(npages, completed=True)
        return True

    def _count_batch(self, npages: Optional[int], *, completed: bool) -> None:
        """pages_scanned before 730cdc2c72c6 (6.6 to 6.9): ksm_do_scan() added
        ``scan_npages - npages`` after its loop ``while (npages-- && ...)``.
        A loop that ran out of pages leaves the unsigned npages wrapped to
        UINT_MAX, so the batch adds N + 1; a batch that completed a full scan
        returned from inside the loop and added nothing."""
        if (npages is not None and not completed and not self.count_scanned
                and self.profile.has("pages_scanned")):
            self.pages_scanned += npages + 1

    def start_scan(self, walks: bool = False) -> None:
        """What a full scan starts with: an empty unstable tree
        (root_unstable_tree[nid] = RB_ROOT), searched node by node when
        ``walks`` or :meth:`needs_page_walks`.  The scan itself:
        :func:`.scan.full_scan`."""
        self.unstable.clear()
        self._unstable_key.clear()
        self._unstable_nodes.clear()
        self._unstable_rbs = {}
        self.unstable_rb = RBRoot() if walks or self.needs_page_walks() else None

    def scan_slots(self, scan_mm) -> None:
        """Visit the mm slots in list order; ``scan_mm(mm)`` False means the
        mm has no mergeable VMA left and ksmd drops its slot (which shifts
        the list, so the same index is visited next)."""
        i = 0
        while i < len(self.slots):
            mm = self.slots[i]
            if scan_mm(mm):
                i += 1
            else:
                self._drop_slot(mm, i)

    def _drop_slot(self, mm: MM, i: int) -> None:
        del self.slots[i]
        mm.registered = False
        if not self.profile.has("merge_any_kept"):
            mm.merge_any = False  # cleared with the slot before 590c03ca6a3f (6.18)

    # -- observation --------------------------------------------------------------------------
    def global_values(self) -> dict[str, Optional[int]]:
        p = self.profile
        volatile = self.rmap_items - self.pages_shared - self.pages_sharing - self.pages_unshared
        saved = self.pages_sharing + (self.zero_pages if self.tracking else 0)
        return {
            "pages_shared": self.pages_shared,
            "pages_sharing": self.pages_sharing,
            "pages_unshared": self.pages_unshared,
            "pages_volatile": max(0, volatile),
            "ksm_zero_pages": self.zero_pages if self.tracking else None,
            # general_profit (d21077fbc2fc, 6.4; zero pages since 1a8e84305783, 6.6)
            "general_profit": (saved * PAGE_SIZE - self.rmap_items * RMAP_ITEM_SIZE
                               if p.has("ksm_profit") else None),
            "stable_node_chains": self.chains,
            "stable_node_dups": self.dups,
            "full_scans": self.full_scans,
            "pages_scanned": self.pages_scanned if p.has("pages_scanned") else None,
            "pages_skipped": self.pages_skipped if p.has("smart_scan") else None,
        }

    def proc_values(self, mm: MM) -> dict[str, Optional[int]]:
        p = self.profile
        has_stat = p.has("ksm_stat")
        profit = p.has("ksm_profit") and has_stat
        involvement = p.has("ksm_stat_involvement") and has_stat
        saved = mm.merging_pages + (mm.zero_pages if self.tracking else 0)
        mergeable = any(seg.merge.any() for seg in mm.regions.values())
        return {
            "ksm_rmap_items": mm.rmap_items if has_stat else None,
            "ksm_zero_pages": mm.zero_pages if (self.tracking and has_stat) else None,
            "ksm_merging_pages": mm.merging_pages if profit else None,
            "ksm_process_profit": (saved * PAGE_SIZE - mm.rmap_items * RMAP_ITEM_SIZE
                                   if profit else None),
            "ksm_merge_any": int(mm.merge_any) if involvement else None,
            "ksm_mergeable": int(mergeable) if involvement else None,
            # RssAnon includes the interpreter: never predictable
            "rss_anon_pages": None,
            # MM_ANONPAGES as moved by the regions: exact only where /proc sums
            # the per-cpu counters (82241a83cd15)
            "rss_anon_scenario_pages": mm.anon_pages() if p.has("rss_exact") else None,
        }

    def region_values(self, seg: Segment) -> dict[str, int]:
        pte = seg.pte
        present = pte >= 0
        anon = pte[pte > 0]
        if self.profile.has("kpf_ksm_all_anon"):
            ksm = int(anon.size)  # dee3d0bef2b0: KPF_KSM on every anon folio
        else:
            ksm = int(np.count_nonzero(self.frames.node[anon] >= 0)) if anon.size else 0
        out = {
            "present": int(np.count_nonzero(present)),
            "zero_pfn": int(np.count_nonzero(pte == 0)),
            "ksm": ksm,
            "distinct_frames": int(np.unique(anon).size),
        }
        if seg.thp:
            out["thp"] = self.thp_pages(seg)
        return out

    # -- invariants (tests) ----------------------------------------------------------------
    def check(self) -> None:
        """Assert the kernel's own invariants; used by the tests."""
        items = sum(int(np.count_nonzero(s.item)) for s in self.all_segments())
        assert items == self.rmap_items, (items, self.rmap_items)
        stable = sum(int(np.count_nonzero(s.ist == STABLE)) for s in self.all_segments())
        assert stable == self.pages_shared + self.pages_sharing
        unstable = sum(int(np.count_nonzero(s.ist == UNSTABLE)) for s in self.all_segments())
        assert unstable == self.pages_unshared
        for root in self.roots.values():
            root.check()
        nodes = [n for n in self.nodes if n.alive]
        assert sum(1 for n in nodes if n.is_chain) == self.chains
        assert sum(1 for n in nodes if n.chain is not None) == self.dups
        live = [n for n in nodes if not n.is_chain]
        assert sum(1 for n in live if n.len > 0) == self.pages_shared
        assert sum(n.len for n in live) == self.pages_shared + self.pages_sharing
        for s in self.all_segments():
            assert not (s.ist[~s.item] != NONE).any()
            if not s.mapped:
                assert (s.pte < 0).all()
