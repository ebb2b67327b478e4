"""Cache manager: the only owner of the slot allocator, req_to_token rows and the prefix cache.

Every allocation has a free path here: ``release_req`` (finish, abort, retraction) and
``free_slots`` (rejected draft tokens). ``check_integrity`` asserts that free + cached + in-use
slots add up to the pool size.
"""

from __future__ import annotations

import torch

from dspark_sglang.core.req import Req
from dspark_sglang.mem_cache.allocator import ReqToTokenPool, SlotAllocator
from dspark_sglang.mem_cache.radix_cache import NoPrefixCache, PrefixCache, RadixCache


class CacheManager:
    def __init__(self, num_slots: int, max_reqs: int, max_context_len: int,
                 disable_radix_cache: bool) -> None:
        self.allocator = SlotAllocator(num_slots)
        self.req_to_token_pool = ReqToTokenPool(max_reqs, max_context_len + 64)
        self.tree: PrefixCache = (NoPrefixCache(self.allocator) if disable_radix_cache
                                  else RadixCache(self.allocator))
        self.disable_radix_cache = disable_radix_cache
        self.live_reqs: dict[str, Req] = {}  # rid -> req holding a row
        # statistics
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token

    # ---- admission -------------------------------------------------------------------------
    def match(self, req: Req, max_len: int) -> tuple[torch.Tensor, object]:
        slots, node = self.tree.match_prefix(req.fill_ids[:max_len])
        return slots, node

    def available(self) -> int:
        return self.allocator.available_size() + self.tree.evictable_size()

    def alloc_slots(self, n: int) -> torch.Tensor | None:
        """``n`` slots, evicting cached prefixes if needed; None when the pool is exhausted."""
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        short = n - self.allocator.available_size()
        if short > 0:
            self.tree.evict(short)
        return self.allocator.alloc(n)

    def admit(self, req: Req, prefix_slots: torch.Tensor, node: object) -> bool:
        """Give ``req`` a req_to_token row holding its matched prefix (locked)."""
        row = self.req_to_token_pool.alloc()
        if row is None:
            return False
        req.req_pool_idx = row
        self.tree.inc_lock_ref(node)
        req.last_node = node
        n = prefix_slots.numel()
        self.req_to_token_pool.write(row, 0, prefix_slots)
        req.prefix_len = req.kv_len = n
        req.cached_tokens = max(req.cached_tokens, n)
        self.hit_tokens += n
        self.query_tokens += req.prefill_target_len()
        self.live_reqs[req.rid] = req
        return True

    def free_slots(self, slots: torch.Tensor) -> None:
        self.allocator.free(slots)

    # ---- caching / release -----------------------------------------------------------------
    def cache_unfinished(self, req: Req) -> None:
        """After a prefill chunk: share the computed prefix through the tree and re-lock it."""
        if self.disable_radix_cache:
            return
        row = req.req_pool_idx
        tokens = req.fill_ids[: req.kv_len]
        slots = self.req_to_token[row, : req.kv_len].clone()
        already = self.tree.insert(tokens, slots)
        if already > req.prefix_len:
            self.allocator.free(slots[req.prefix_len:already])
        new_slots, node = self.tree.match_prefix(tokens)
        assert new_slots.numel() == req.kv_len
        self.req_to_token_pool.write(row, 0, new_slots)
        self.tree.dec_lock_ref(req.last_node)
        self.tree.inc_lock_ref(node)
        req.last_node = node
        req.prefix_len = req.kv_len

    def release_req(self, req: Req, cache: bool = True) -> None:
        """Give back everything ``req`` holds. With ``cache``, its computed tokens enter the tree.

        Slots past the valid tokens (e.g. KV of draft tokens after a stop inside an accepted
        run) are freed, never cached.
        """
        row = req.req_pool_idx
        if row is None:
            return
        kv_len = req.kv_len
        slots = self.req_to_token[row, :kv_len].clone()
        valid = min(kv_len, req.seqlen)
        if cache and not self.disable_radix_cache:
            already = self.tree.insert(req.fill_ids[:valid], slots[:valid])
            if already > req.prefix_len:
                self.allocator.free(slots[req.prefix_len:already])
            self.allocator.free(slots[valid:])
        else:
            self.allocator.free(slots[req.prefix_len:])
        self.tree.dec_lock_ref(req.last_node)
        req.last_node = None
        self.req_to_token_pool.free(row)
        req.req_pool_idx = None
        req.prefix_len = req.kv_len = 0
        self.live_reqs.pop(req.rid, None)

    def flush(self) -> bool:
        """Drop the whole prefix cache; refused (False) while requests hold slots."""
        if self.live_reqs:
            return False
        self.tree.reset()
        return True

    def in_use(self) -> int:
        total = 0
        for req in self.live_reqs.values():
            total += req.kv_len - req.prefix_len
        return total

    def check_integrity(self, extra_in_flight: int = 0) -> None:
        free = self.allocator.available_size()
        cached = self.tree.total_size()
        used = self.in_use() + extra_in_flight
        size = self.allocator.size
        if free + cached + used != size:
            raise AssertionError(
                f"KV slot leak: free {free} + cached {cached} + in-use {used} != pool {size}")
        free_t = self.allocator._free
        if free_t.unique().numel() != free_t.numel():
            raise AssertionError("KV slot double free")
