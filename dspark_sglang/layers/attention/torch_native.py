"""Torch-native attention backend: the CPU path and the oracle for the GPU backends.

Plan once per forward: requests are padded to ``[bs, max_q]`` queries over ``[bs, max_kv]`` keys
gathered from the pool through ``req_to_token``; one SDPA call per layer with a boolean mask that
encodes prefix visibility, causal order among new tokens, or each request's custom mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark_sglang.core.forward_batch import ForwardBatch
from dspark_sglang.layers.attention.base import AttentionBackend
from dspark_sglang.mem_cache.kv_pool import KVPool


@dataclass
class TorchNativeMetadata:
    kv_slots: torch.Tensor  # [bs, max_kv] int64 (padding -> slot 0)
    mask: torch.Tensor  # [bs, 1, max_q, max_kv] bool, True = attend
    q_index: torch.Tensor  # [num_tokens] int64 flat index into [bs * max_q]
    bs: int
    max_q: int


def build_attention_mask(fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (kv_slots [bs, max_kv], mask [bs, max_q, max_kv], q_index [num_tokens])."""
    seq_lens, ext_lens = fb.seq_lens_list, fb.extend_lens_list
    bs = len(seq_lens)
    max_kv, max_q = max(seq_lens), max(ext_lens)
    rows = fb.req_to_token[fb.req_pool_indices, :max_kv].cpu()  # [bs, max_kv]
    kv_pos = torch.arange(max_kv)
    q_ar = torch.arange(max_q)
    seq_t = torch.tensor(seq_lens)
    ext_t = torch.tensor(ext_lens)
    prefix_t = seq_t - ext_t
    valid_kv = kv_pos[None, :] < seq_t[:, None]  # [bs, max_kv]
    kv_slots = torch.where(valid_kv, rows, torch.zeros_like(rows))
    # absolute position of each query / key; causal: key_pos <= query_pos
    q_abs = prefix_t[:, None] + q_ar[None, :]  # [bs, max_q]
    mask = (kv_pos[None, None, :] <= q_abs[:, :, None]) & valid_kv[:, None, :]
    if fb.custom_masks is not None:
        for i, cm in enumerate(fb.custom_masks):
            if cm is None:
                continue
            p, e = int(prefix_t[i]), ext_lens[i]
            assert cm.shape == (e, e), (cm.shape, e)
            mask[i, :e, p : p + e] = cm
    valid_q = q_ar[None, :] < ext_t[:, None]  # [bs, max_q]
    mask[:, :, 0] |= ~valid_q  # padded query rows attend to something (discarded later)
    q_index = (torch.arange(bs)[:, None] * max_q + q_ar[None, :])[valid_q]
    return kv_slots, mask, q_index


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, device: str = "cpu", **_: object) -> None:
        self.device = device

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        kv_slots, mask, q_index = build_attention_mask(fb)
        if self.device != "cpu":
            kv_slots, mask, q_index = (kv_slots.to(self.device), mask.to(self.device),
                                       q_index.to(self.device))
        fb.attn_metadata = TorchNativeMetadata(
            kv_slots=kv_slots, mask=mask[:, None], q_index=q_index,
            bs=fb.batch_size, max_q=max(fb.extend_lens_list),
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        md: TorchNativeMetadata = fb.attn_metadata
        kv_pool.store(layer_id, fb.out_cache_loc, k, v)
        num_tokens, num_heads, head_dim = q.shape
        k_all = kv_pool.k_bufs[layer_id][md.kv_slots]  # [bs, max_kv, kvh, d]
        v_all = kv_pool.v_bufs[layer_id][md.kv_slots]
        if md.bs == 1 and md.max_q == num_tokens:
            q_pad = q.unsqueeze(0)
        else:
            q_pad = q.new_zeros((md.bs * md.max_q, num_heads, head_dim))
            q_pad[md.q_index] = q
            q_pad = q_pad.view(md.bs, md.max_q, num_heads, head_dim)
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2).to(k_all.dtype),  # [bs, h, max_q, d]
            k_all.transpose(1, 2),
            v_all.transpose(1, 2),
            attn_mask=md.mask,
            scale=sm_scale,
            enable_gqa=True,
        ).transpose(1, 2)  # [bs, max_q, h, d]
        out = out.reshape(md.bs * md.max_q, num_heads, head_dim)
        if not (md.bs == 1 and md.max_q == num_tokens):
            out = out[md.q_index]
        return out.to(q.dtype)
