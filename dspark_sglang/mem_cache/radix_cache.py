"""Radix prefix cache over token ids (page size 1), shared by target and drafter.

Region map of one running request's ``req_to_token`` row::

    0 ............ prefix_len .............. kv_len ........ (kv_len + num_new)
    |  cached (tree-owned, |  request-owned slots  | slots allocated for the
    |  locked via last_node)| (computed, not yet    | current forward
    |                       |  inserted in the tree) |

A slot is inserted in the tree only after the target KV *and* the draft context K/V of its token
are written (both happen in the same target forward), so a prefix hit serves both models.
Lock counts protect a node and all its ancestors from eviction.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from dspark_sglang.mem_cache.allocator import SlotAllocator


@dataclass(eq=False)
class TreeNode:
    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: float = field(default_factory=time.monotonic)


class PrefixCache(ABC):
    """Interface the scheduler's cache manager uses. All calls come from the scheduler thread."""

    @abstractmethod
    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode | None]:
        """Longest cached prefix of ``key``: (slots [m], last node). Touches LRU time."""

    @abstractmethod
    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        """Insert ``key`` -> ``slots``; returns how many leading tokens were already cached.

        The caller still owns ``slots[:returned]`` and must free them (the tree keeps its own
        copies); ownership of ``slots[returned:]`` passes to the tree.
        """

    @abstractmethod
    def inc_lock_ref(self, node: TreeNode | None) -> None: ...

    @abstractmethod
    def dec_lock_ref(self, node: TreeNode | None) -> None: ...

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free up to ``num_tokens`` unlocked cached slots (LRU leaves first); returns count."""

    @abstractmethod
    def evictable_size(self) -> int: ...

    @abstractmethod
    def protected_size(self) -> int: ...

    @abstractmethod
    def reset(self) -> None:
        """Drop every node and free its slots. Only valid when nothing is locked."""

    def total_size(self) -> int:
        return self.evictable_size() + self.protected_size()


class NoPrefixCache(PrefixCache):
    """``--disable-radix-cache``: nothing is ever cached; inserted slots are freed at once."""

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode | None]:
        return torch.empty(0, dtype=torch.int64), None

    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        # report everything as "already cached" so the caller frees all of it
        return len(key)

    def inc_lock_ref(self, node: TreeNode | None) -> None:
        pass

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass


class RadixCache(PrefixCache):
    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self.reset_tree()

    def reset_tree(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    def reset(self) -> None:
        for node in self._all_nodes():
            if node is not self.root:
                self.allocator.free(node.value)
        self.reset_tree()

    # ---- queries -------------------------------------------------------------------------
    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode | None]:
        node, values, now = self.root, [], time.monotonic()
        node.last_access = now
        pos = 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_len(child.key, key, pos)
            child.last_access = now
            if n < len(child.key):
                child = self._split(child, n)
                values.append(child.value)
                node = child
                break
            values.append(child.value)
            node = child
            pos += n
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        assert len(key) == slots.numel(), (len(key), slots.numel())
        node, pos, now = self.root, 0, time.monotonic()
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                new = TreeNode(key=list(key[pos:]), value=slots[pos:].clone(), parent=node,
                               last_access=now)
                node.children[key[pos]] = new
                self._evictable += len(new.key)
                return pos
            n = _common_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node = child
            pos += n
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split ``child`` after its first ``n`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = TreeNode(key=child.key[:n], value=child.value[:n].clone(), parent=parent,
                         lock_ref=child.lock_ref, last_access=child.last_access)
        child.key, child.value = child.key[n:], child.value[n:].clone()
        child.parent = upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    # ---- locking / eviction ----------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, "unbalanced dec_lock_ref"
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        leaves = [n for n in self._all_nodes() if not n.children and n.lock_ref == 0
                  and n is not self.root]
        freed = 0
        while freed < num_tokens and leaves:
            leaves.sort(key=lambda n: n.last_access)
            victim = leaves.pop(0)
            self.allocator.free(victim.value)
            freed += len(victim.key)
            self._evictable -= len(victim.key)
            parent = victim.parent
            assert parent is not None
            del parent.children[victim.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                leaves.append(parent)
        return freed

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def _all_nodes(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def cached_slots(self) -> torch.Tensor:
        vals = [n.value for n in self._all_nodes() if n is not self.root]
        return torch.cat(vals) if vals else torch.empty(0, dtype=torch.int64)


def _common_len(a: list[int], b: list[int], b_start: int) -> int:
    n = min(len(a), len(b) - b_start)
    i = 0
    while i < n and a[i] == b[b_start + i]:
        i += 1
    return i
