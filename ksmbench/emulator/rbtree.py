"""A red-black tree that rebalances exactly as Linux's lib/rbtree.c does.

KSM's stable tree is an rbtree ordered by page content (memcmp).  Which
nodes a search passes over matters: every stable-tree walk prunes stale
nodes and stale chain dups on its path, collapses single-dup chains and
reorders chain dups (mm/ksm.c, stable_node_dup()).  To know the path the
emulator needs the same shape as the kernel, so insertion (``__rb_insert``),
erasure (``__rb_erase_augmented`` + ``____rb_erase_color``) and
``rb_replace_node`` follow the kernel's case analysis step by step (same
rotations, same choice of the in-order successor on erase).

Nodes are any objects with ``rb_left``, ``rb_right``, ``rb_parent`` and
``rb_red`` attributes (see :class:`RBNode`).
"""

from __future__ import annotations

from typing import Iterator, Optional


class RBNode:
    __slots__ = ("rb_left", "rb_right", "rb_parent", "rb_red")

    def __init__(self) -> None:
        self.rb_left: Optional[RBNode] = None
        self.rb_right: Optional[RBNode] = None
        self.rb_parent: Optional[RBNode] = None
        self.rb_red = False


class RBRoot:
    __slots__ = ("node",)

    def __init__(self) -> None:
        self.node: Optional[RBNode] = None

    # -- helpers mirroring include/linux/rbtree_augmented.h ----------------------
    def _change_child(self, old: RBNode, new: Optional[RBNode], parent: Optional[RBNode]) -> None:
        if parent is not None:
            if parent.rb_left is old:
                parent.rb_left = new
            else:
                parent.rb_right = new
        else:
            self.node = new

    def _rotate_set_parents(self, old: RBNode, new: RBNode, red: bool) -> None:
        parent = old.rb_parent
        new.rb_parent = parent
        new.rb_red = old.rb_red
        old.rb_parent = new
        old.rb_red = red
        self._change_child(old, new, parent)

    # -- public API ----------------------------------------------------------------
    def link(self, node: RBNode, parent: Optional[RBNode], left: bool) -> None:
        """rb_link_node() + rb_insert_color()."""
        node.rb_parent = parent
        node.rb_red = True
        node.rb_left = node.rb_right = None
        if parent is None:
            self.node = node
        elif left:
            parent.rb_left = node
        else:
            parent.rb_right = node
        self._insert_color(node)

    def _insert_color(self, node: RBNode) -> None:
        parent = node.rb_parent
        while True:
            if parent is None:  # the root is black
                node.rb_parent = None
                node.rb_red = False
                break
            if not parent.rb_red:
                break
            gparent = parent.rb_parent
            tmp = gparent.rb_right
            if parent is not tmp:  # parent == gparent->rb_left
                if tmp is not None and tmp.rb_red:
                    # Case 1: uncle red -> colour flips
                    tmp.rb_parent, tmp.rb_red = gparent, False
                    parent.rb_parent, parent.rb_red = gparent, False
                    node = gparent
                    parent = node.rb_parent
                    node.rb_red = True
                    continue
                tmp = parent.rb_right
                if node is tmp:
                    # Case 2: left rotate at parent
                    tmp = node.rb_left
                    parent.rb_right = tmp
                    node.rb_left = parent
                    if tmp is not None:
                        tmp.rb_parent, tmp.rb_red = parent, False
                    parent.rb_parent, parent.rb_red = node, True
                    parent = node
                    tmp = node.rb_right
                # Case 3: right rotate at gparent
                gparent.rb_left = tmp
                parent.rb_right = gparent
                if tmp is not None:
                    tmp.rb_parent, tmp.rb_red = gparent, False
                self._rotate_set_parents(gparent, parent, True)
                break
            else:
                tmp = gparent.rb_left
                if tmp is not None and tmp.rb_red:
                    tmp.rb_parent, tmp.rb_red = gparent, False
                    parent.rb_parent, parent.rb_red = gparent, False
                    node = gparent
                    parent = node.rb_parent
                    node.rb_red = True
                    continue
                tmp = parent.rb_left
                if node is tmp:
                    tmp = node.rb_right
                    parent.rb_left = tmp
                    node.rb_right = parent
                    if tmp is not None:
                        tmp.rb_parent, tmp.rb_red = parent, False
                    parent.rb_parent, parent.rb_red = node, True
                    parent = node
                    tmp = node.rb_left
                gparent.rb_right = tmp
                parent.rb_left = gparent
                if tmp is not None:
                    tmp.rb_parent, tmp.rb_red = gparent, False
                self._rotate_set_parents(gparent, parent, True)
                break

    def erase(self, node: RBNode) -> None:
        """rb_erase()."""
        rebalance = self._erase(node)
        if rebalance is not None:
            self._erase_color(rebalance)
        node.rb_left = node.rb_right = node.rb_parent = None

    def _erase(self, node: RBNode) -> Optional[RBNode]:
        child = node.rb_right
        tmp = node.rb_left
        if tmp is None:
            # Case 1: at most one child (the right one)
            parent = node.rb_parent
            was_red = node.rb_red
            self._change_child(node, child, parent)
            if child is not None:
                child.rb_parent, child.rb_red = parent, was_red
                return None
            return parent if not was_red else None
        if child is None:
            # Still case 1, the child is the left one
            parent = node.rb_parent
            tmp.rb_parent, tmp.rb_red = parent, node.rb_red
            self._change_child(node, tmp, parent)
            return None
        successor = child
        tmp = child.rb_left
        if tmp is None:
            # Case 2: the successor is the right child
            parent = successor
            child2 = successor.rb_right
        else:
            # Case 3: the successor is the leftmost node under the right child
            while True:
                parent = successor
                successor = tmp
                tmp = tmp.rb_left
                if tmp is None:
                    break
            child2 = successor.rb_right
            parent.rb_left = child2
            successor.rb_right = child
            child.rb_parent = successor
        tmp = node.rb_left
        successor.rb_left = tmp
        tmp.rb_parent = successor
        node_parent, node_red = node.rb_parent, node.rb_red
        self._change_child(node, successor, node_parent)
        if child2 is not None:
            child2.rb_parent, child2.rb_red = parent, False
            rebalance = None
        else:
            rebalance = parent if not successor.rb_red else None
        successor.rb_parent, successor.rb_red = node_parent, node_red
        return rebalance

    def _erase_color(self, parent: RBNode) -> None:
        # The two halves below mirror each other (left/right swapped), as in
        # ____rb_erase_color(): kept as two explicit halves, not folded into
        # one with a direction flag, so each line can be read against the C.
        node: Optional[RBNode] = None
        while True:
            sibling = parent.rb_right
            if node is not sibling:  # node == parent->rb_left
                if sibling.rb_red:
                    # Case 1: left rotate at parent
                    tmp1 = sibling.rb_left
                    parent.rb_right = tmp1
                    sibling.rb_left = parent
                    tmp1.rb_parent, tmp1.rb_red = parent, False
                    self._rotate_set_parents(parent, sibling, True)
                    sibling = tmp1
                tmp1 = sibling.rb_right
                if tmp1 is None or not tmp1.rb_red:
                    tmp2 = sibling.rb_left
                    if tmp2 is None or not tmp2.rb_red:
                        # Case 2: sibling colour flip
                        sibling.rb_parent, sibling.rb_red = parent, True
                        if parent.rb_red:
                            parent.rb_red = False
                        else:
                            node = parent
                            parent = node.rb_parent
                            if parent is not None:
                                continue
                        break
                    # Case 3: right rotate at sibling
                    tmp1 = tmp2.rb_right
                    sibling.rb_left = tmp1
                    tmp2.rb_right = sibling
                    parent.rb_right = tmp2
                    if tmp1 is not None:
                        tmp1.rb_parent, tmp1.rb_red = sibling, False
                    tmp1 = sibling
                    sibling = tmp2
                # Case 4: left rotate at parent + colour flips
                tmp2 = sibling.rb_left
                parent.rb_right = tmp2
                sibling.rb_left = parent
                tmp1.rb_parent, tmp1.rb_red = sibling, False
                if tmp2 is not None:
                    tmp2.rb_parent = parent
                self._rotate_set_parents(parent, sibling, False)
                break
            else:
                sibling = parent.rb_left
                if sibling.rb_red:
                    tmp1 = sibling.rb_right
                    parent.rb_left = tmp1
                    sibling.rb_right = parent
                    tmp1.rb_parent, tmp1.rb_red = parent, False
                    self._rotate_set_parents(parent, sibling, True)
                    sibling = tmp1
                tmp1 = sibling.rb_left
                if tmp1 is None or not tmp1.rb_red:
                    tmp2 = sibling.rb_right
                    if tmp2 is None or not tmp2.rb_red:
                        sibling.rb_parent, sibling.rb_red = parent, True
                        if parent.rb_red:
                            parent.rb_red = False
                        else:
                            node = parent
                            parent = node.rb_parent
                            if parent is not None:
                                continue
                        break
                    tmp1 = tmp2.rb_left
                    sibling.rb_right = tmp1
                    tmp2.rb_left = sibling
                    parent.rb_left = tmp2
                    if tmp1 is not None:
                        tmp1.rb_parent, tmp1.rb_red = sibling, False
                    tmp1 = sibling
                    sibling = tmp2
                tmp2 = sibling.rb_right
                parent.rb_left = tmp2
                sibling.rb_right = parent
                tmp1.rb_parent, tmp1.rb_red = sibling, False
                if tmp2 is not None:
                    tmp2.rb_parent = parent
                self._rotate_set_parents(parent, sibling, False)
                break

    def replace(self, victim: RBNode, new: RBNode) -> None:
        """rb_replace_node(): ``new`` takes ``victim``'s place, colour and children."""
        parent = victim.rb_parent
        new.rb_left, new.rb_right = victim.rb_left, victim.rb_right
        new.rb_parent, new.rb_red = parent, victim.rb_red
        if victim.rb_left is not None:
            victim.rb_left.rb_parent = new
        if victim.rb_right is not None:
            victim.rb_right.rb_parent = new
        self._change_child(victim, new, parent)
        victim.rb_left = victim.rb_right = victim.rb_parent = None

    # -- inspection (tests, debugging) -----------------------------------------------
    def inorder(self) -> Iterator[RBNode]:
        stack: list[RBNode] = []
        node = self.node
        while stack or node is not None:
            while node is not None:
                stack.append(node)
                node = node.rb_left
            node = stack.pop()
            yield node
            node = node.rb_right

    def check(self) -> int:
        """Verify the red-black invariants; return the black height."""

        def walk(node: Optional[RBNode], parent: Optional[RBNode]) -> int:
            if node is None:
                return 1
            assert node.rb_parent is parent, "broken parent pointer"
            if node.rb_red:
                assert parent is None or not parent.rb_red, "red node with red parent"
            left = walk(node.rb_left, node)
            right = walk(node.rb_right, node)
            assert left == right, "unequal black heights"
            return left + (0 if node.rb_red else 1)

        assert self.node is None or not self.node.rb_red, "red root"
        return walk(self.node, None)
