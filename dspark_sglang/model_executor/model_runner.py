"""Model runner: owns one model, its KV pool and attention backend; runs ForwardBatches.

The runner never allocates slots: the scheduler's cache manager owns the allocator and
``req_to_token``; the runner only writes K/V at the slots a ForwardBatch names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput
from dspark_sglang.layers.attention.base import AttentionBackend, create_attention_backend
from dspark_sglang.layers.attention.registry import resolve_attention_backend
from dspark_sglang.layers.quantized_linear import float_weights
from dspark_sglang.mem_cache.kv_pool import KVPool


@dataclass
class BatchRequestSpec:
    """One request's part of a forward: new tokens at positions ``start_pos ..``."""

    req_pool_idx: int
    input_ids: list[int]
    start_pos: int  # = prefix length (tokens already in KV)
    out_cache_loc: torch.Tensor  # [len(input_ids)] int64
    custom_mask: torch.Tensor | None = None  # [len, len] bool
    positions: list[int] | None = None  # default start_pos + arange (trees use depth offsets)


def build_forward_batch(
    mode: ForwardMode, specs: list[BatchRequestSpec], req_to_token: torch.Tensor,
    logits_indices: torch.Tensor | None = None, capture_layer_ids: tuple[int, ...] = (),
    capture_final_hidden: bool = False,
) -> ForwardBatch:
    ids: list[int] = []
    pos: list[int] = []
    for s in specs:
        ids.extend(s.input_ids)
        if s.positions is not None:
            pos.extend(s.positions)
        else:
            pos.extend(range(s.start_pos, s.start_pos + len(s.input_ids)))
    ext = [len(s.input_ids) for s in specs]
    seq = [s.start_pos + e for s, e in zip(specs, ext)]
    custom = [s.custom_mask for s in specs]
    return ForwardBatch(
        mode=mode,
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.tensor(pos, dtype=torch.int64),
        out_cache_loc=torch.cat([s.out_cache_loc for s in specs]),
        req_pool_indices=torch.tensor([s.req_pool_idx for s in specs], dtype=torch.int64),
        seq_lens=torch.tensor(seq, dtype=torch.int64),
        extend_lens=torch.tensor(ext, dtype=torch.int64),
        req_to_token=req_to_token,
        custom_masks=custom if any(c is not None for c in custom) else None,
        logits_indices=logits_indices,
        capture_layer_ids=capture_layer_ids,
        capture_final_hidden=capture_final_hidden,
        seq_lens_list=seq,
        extend_lens_list=ext,
    )


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_slots: int, dtype: torch.dtype,
                 attention_backend: str = "auto", device: str = "cpu",
                 disable_cuda_graph: bool = False) -> None:
        cfg = model.config  # a model from models/registry.py
        self.model: Any = model
        self.config = cfg
        self.dtype = dtype
        self.device = device
        heads, kv_heads = model.local_head_counts()  # this rank's share under TP
        self.kv_pool = KVPool(cfg.num_hidden_layers, num_slots, kv_heads, cfg.head_dim, dtype,
                              device)
        attention_backend = resolve_attention_backend(attention_backend, device, dtype)
        self.attention_backend = attention_backend  # the resolved name (never "auto")
        self.attn: AttentionBackend = create_attention_backend(
            attention_backend, device=device, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=cfg.head_dim, dtype=dtype)
        # distributed.tp_driver.TPDriver on rank 0 of a tensor-parallel engine, else None
        self.tp_driver: Any = None
        self.quantization = "none"  # set by model setup: "gguf" when GGUF block kernels run
        # prefill on float32 GEMMs instead of the blocks (faster on long prompts, but a token's
        # result then depends on the prefill batch: DSPARK_FLOAT_PREFILL=1, off by default)
        self.float_prefill = False
        self.num_forward_tokens = 0  # computed (not cached) tokens, for tests and metrics
        self.graphs = None
        if device == "cuda" and attention_backend == "triton" and not disable_cuda_graph \
                and heads == cfg.num_attention_heads:
            from dspark_sglang.model_executor.cuda_graph import CudaGraphRunner

            self.graphs = CudaGraphRunner(self)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> ModelOutput:
        self.num_forward_tokens += fb.num_tokens
        if self.tp_driver is not None:
            self.tp_driver.send(fb)  # followers replay this forward on their shards
        if self.device != "cpu":
            fb.input_ids = fb.input_ids.to(self.device, non_blocking=True)
            fb.positions = fb.positions.to(self.device, non_blocking=True)
            fb.out_cache_loc = fb.out_cache_loc.to(self.device, non_blocking=True)
            if fb.logits_indices is not None:
                fb.logits_indices = fb.logits_indices.to(self.device, non_blocking=True)
            if self.graphs is not None and self.graphs.can_run(fb):
                return self.graphs.replay(fb)
        if fb.mode == ForwardMode.EXTEND and self.float_prefill:
            with float_weights():  # prefill: float32 GEMMs; decode/verify stay on the blocks
                return self.model(fb, self.attn, self.kv_pool)
        return self.model(fb, self.attn, self.kv_pool)
