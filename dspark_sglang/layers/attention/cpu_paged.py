"""CPU attention backend: decode and short verify chains read the KV pool in place.

DECODE and TARGET_VERIFY forwards with at most ``MAX_VERIFY_TOKENS`` new tokens per request run
``dspark_kernels.cpu_ops.paged_attention`` (C++, threads over requests x kv heads, online
softmax, GQA-aware, slots read through ``req_to_token`` without a gather or padding; custom
masks of trees as in the torch backend). A verified token's keys are visited in the order and
key tiles of decoding it alone (prefix, then the new tokens its mask shows), so its output is
bitwise the decoded token's: speculative greedy output equals plain greedy output even where
Q8 activations (``--quantization gguf``) turn a last-bit difference into a different logit.
With ``extend_on_kernel`` (set when the model runs on GGUF blocks) EXTEND prefill runs on it
too, in work items of at most 16 new tokens, each token's keys again in the order and tiles of
decoding it alone: a token's output no longer depends on how prompts are batched or chunked.
Everything else (EXTEND otherwise, non-float32 pools, or a machine where the extension cannot
be built) goes to the torch-native SDPA backend, which is also the reference the kernel is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode
from dspark_sglang.layers.attention.torch_native import TorchNativeAttnBackend
from dspark_sglang.mem_cache.kv_pool import KVPool
from dspark_sglang.utils.env import env_on

# every verify block the flags allow (speculative_num_draft_tokens <= 64): decode and verify
# must share one kernel for a verified token to be bitwise the token decoded alone
MAX_VERIFY_TOKENS = 64
# the model's fused per-layer C++ ops on this backend's kernel path (DSPARK_FUSED_LAYERS=0: off)
FUSED_LAYERS = env_on("DSPARK_FUSED_LAYERS")


@dataclass
class PagedMetadata:
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int64
    ext_lens: torch.Tensor  # [bs] int64
    q_start: torch.Tensor  # [bs] int64, first row of each request in q
    mask_flat: torch.Tensor  # [sum of e*e over masked requests] uint8
    mask_offsets: torch.Tensor  # [bs] int64, offset into mask_flat or -1 (causal)


class CpuPagedAttnBackend(TorchNativeAttnBackend):
    """``attention_backend="cpu"``: paged C++ kernel for decode/verify, SDPA for the rest."""

    def __init__(self, device: str = "cpu", **kw: object) -> None:
        super().__init__(device=device, **kw)
        from dspark_kernels.cpu_ops import load_cpu_ops

        self.ops = load_cpu_ops() if device == "cpu" else None
        # EXTEND (prefill) on the kernel too: every token's output is then bitwise the same
        # however requests are batched or chunked (set with GGUF blocks, whose Q8 kernel is
        # row-independent as well, so a whole forward is; float32 GEMMs are not)
        self.extend_on_kernel = False

    def _kernel_applies(self, fb: ForwardBatch) -> bool:
        if self.ops is None:
            return False
        if fb.mode == ForwardMode.EXTEND:
            return self.extend_on_kernel and fb.custom_masks is None
        return (fb.mode in (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY)
                and max(fb.extend_lens_list) <= MAX_VERIFY_TOKENS)

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if not self._kernel_applies(fb):
            super().init_forward_metadata(fb)
            return
        ext = fb.extend_lens_list
        starts = [0] * len(ext)
        for i in range(1, len(ext)):
            starts[i] = starts[i - 1] + ext[i - 1]
        offsets = [-1] * len(ext)
        chunks: list[torch.Tensor] = []
        if fb.custom_masks is not None:
            pos = 0
            for i, cm in enumerate(fb.custom_masks):
                if cm is None:
                    continue
                assert cm.shape == (ext[i], ext[i]), (cm.shape, ext[i])
                offsets[i] = pos
                chunks.append(cm.reshape(-1).to(torch.uint8))
                pos += cm.numel()
        fb.attn_metadata = PagedMetadata(
            req_pool_indices=fb.req_pool_indices.to(torch.int64).contiguous(),
            seq_lens=torch.tensor(fb.seq_lens_list, dtype=torch.int64),
            ext_lens=torch.tensor(ext, dtype=torch.int64),
            q_start=torch.tensor(starts, dtype=torch.int64),
            mask_flat=torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8),
            mask_offsets=torch.tensor(offsets, dtype=torch.int64),
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        md = fb.attn_metadata
        if not isinstance(md, PagedMetadata) or kv_pool.dtype != torch.float32:
            if isinstance(md, PagedMetadata):  # non-float32 pool: rebuild the SDPA plan once
                super().init_forward_metadata(fb)
            return super().forward(q, k, v, layer_id, fb, kv_pool, sm_scale)
        kv_pool.store(layer_id, fb.out_cache_loc, k, v)
        return self.paged_forward(q.float(), layer_id, fb, kv_pool, sm_scale).to(q.dtype)

    def fused_layer_ops(self, fb: ForwardBatch, kv_pool: KVPool) -> object | None:
        """The compiled ops for a model's fused layer path (``rms_norm``, ``qkv_rope_store``,
        ``silu_mul``) when this forward runs on the paged kernel with a float32 pool, else None
        (the model then calls :meth:`forward` per layer). ``DSPARK_FUSED_LAYERS=0`` turns the
        fused path off (A/B measurements)."""
        if (isinstance(fb.attn_metadata, PagedMetadata) and kv_pool.dtype == torch.float32
                and FUSED_LAYERS):
            return self.ops
        return None

    def paged_forward(self, q: torch.Tensor, layer_id: int, fb: ForwardBatch, kv_pool: KVPool,
                      sm_scale: float) -> torch.Tensor:
        """The kernel over K/V already in the pool (this forward's new tokens stored): q
        [num_tokens, heads, d] float32 -> [num_tokens, heads, d]."""
        md = fb.attn_metadata
        assert isinstance(md, PagedMetadata)
        out = torch.empty(q.shape, dtype=torch.float32)
        self.ops.paged_attention(
            q.contiguous(), kv_pool.k_bufs[layer_id], kv_pool.v_bufs[layer_id],
            fb.req_to_token, md.req_pool_indices, md.seq_lens, md.ext_lens, md.q_start,
            md.mask_flat, md.mask_offsets, float(sm_scale), out)
        return out
