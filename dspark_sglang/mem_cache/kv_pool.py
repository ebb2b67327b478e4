"""Per-model KV pools indexed by the shared slot allocator."""

from __future__ import annotations

import torch


class KVPool:
    """K and V buffers ``[num_layers][num_slots + 1, num_kv_heads, head_dim]``.

    Only the model runner that owns the pool writes it (through ``store``); attention backends read.
    """

    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_bufs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_bufs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers = num_layers
        self.dtype = dtype

    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # loc: [n] int64; k, v: [n, num_kv_heads, head_dim]
        self.k_bufs[layer_id][loc] = k.to(self.dtype)
        self.v_bufs[layer_id][loc] = v.to(self.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k_bufs + self.v_bufs)
