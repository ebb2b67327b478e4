"""Attention backend interface; names and lazy imports live in ``registry.py``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dspark_sglang.core.forward_batch import ForwardBatch
from dspark_sglang.layers.attention.registry import attention_backend_class
from dspark_sglang.mem_cache.kv_pool import KVPool


class AttentionBackend(ABC):
    """Computes attention of a ForwardBatch's new tokens over the paged KV pool.

    ``init_forward_metadata`` runs once per forward (before layer 0) and stores whatever the
    backend needs in ``fb.attn_metadata``; ``forward`` runs once per layer, stores the new tokens'
    K/V at ``fb.out_cache_loc`` into ``kv_pool`` and returns the attention output.
    """

    @abstractmethod
    def init_forward_metadata(self, fb: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        """q [num_tokens, heads, d]; k, v [num_tokens, kv_heads, d] -> [num_tokens, heads, d]."""


def create_attention_backend(name: str, **kwargs: object) -> AttentionBackend:
    """Build the backend registered as ``name`` (layers/attention/registry.py)."""
    return attention_backend_class(name)(**kwargs)
