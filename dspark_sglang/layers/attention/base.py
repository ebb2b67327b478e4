"""Attention backend interface and registry (lazy imports: no triton/flashinfer on CPU installs)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch

from dspark_sglang.core.forward_batch import ForwardBatch
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


_BACKENDS = {
    "torch_native": "dspark_sglang.layers.attention.torch_native:TorchNativeAttnBackend",
    "cpu": "dspark_sglang.layers.attention.cpu_paged:CpuPagedAttnBackend",
    "triton": "dspark_sglang.layers.attention.triton_backend:TritonAttnBackend",
    "flashinfer": "dspark_sglang.layers.attention.flashinfer_backend:FlashInferAttnBackend",
}


def create_attention_backend(name: str, **kwargs: object) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
