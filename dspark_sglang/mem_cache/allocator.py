"""KV slot allocator shared by every model of an engine, and the req_to_token table.

One allocator serves the target KV pool, the draft context pool and any standalone draft model's
pool: slot ``i`` is the same token in all of them. Slot 0 is reserved as a padding slot (writes to
it are harmless, it is never handed out), so a pool of ``size`` usable slots has ``size + 1`` rows.
"""

from __future__ import annotations

import torch


class SlotAllocator:
    """Hands out KV slot indices. Not thread safe: only the scheduler thread calls it."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"KV pool size must be positive, got {size}")
        self.size = size
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64)

    def available_size(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """Return ``n`` free slots (int64 [n]) or None if fewer are free. Caller owns them."""
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Return slots to the pool. Each slot must be owned by the caller exactly once."""
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(torch.int64).flatten()])


class ReqToTokenPool:
    """``req_to_token[row, j]`` = KV slot of token ``j`` of the request holding ``row``."""

    def __init__(self, max_reqs: int, max_context_len: int) -> None:
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((max_reqs, max_context_len), dtype=torch.int64)
        self._free_rows = list(range(max_reqs))

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.req_to_token[row, start : start + slots.numel()] = slots
