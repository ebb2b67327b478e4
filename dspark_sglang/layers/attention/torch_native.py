"""Torch-native attention backend: the CPU path and the oracle for the GPU backends.

Plan once per forward: requests are grouped by query length (new tokens per request); within a
group they are padded to ``[bs, max_kv]`` keys gathered from the pool through ``req_to_token``;
one SDPA call per group and layer with a boolean mask that encodes prefix visibility, causal
order among new tokens, or each request's custom mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark_sglang.core.forward_batch import ForwardBatch
from dspark_sglang.layers.attention.base import AttentionBackend
from dspark_sglang.mem_cache.kv_pool import KVPool


@dataclass
class TorchNativeGroup:
    """Requests of one query length, attended in one SDPA call."""

    kv_slots: torch.Tensor  # [bs, max_kv] int64 (padding -> slot 0)
    mask: torch.Tensor  # [bs, 1, max_q, max_kv] bool, True = attend
    q_index: torch.Tensor  # [group tokens] int64 flat index into [bs * max_q]
    token_index: torch.Tensor | None  # [group tokens] rows of the batch's q (None = all, in order)
    bs: int
    max_q: int


@dataclass
class TorchNativeMetadata:
    groups: list[TorchNativeGroup]


def build_attention_mask(
    seq_lens: list[int], ext_lens: list[int], rows: torch.Tensor,
    custom_masks: list[torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (kv_slots [bs, max_kv], mask [bs, max_q, max_kv], q_index [num_tokens]) for the
    given requests; ``rows [bs, >= max_kv]`` are their ``req_to_token`` rows."""
    bs = len(seq_lens)
    max_kv, max_q = max(seq_lens), max(ext_lens)
    rows = rows[:, :max_kv].cpu()  # [bs, max_kv]
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
    if custom_masks is not None:
        for i, cm in enumerate(custom_masks):
            if cm is None:
                continue
            p, e = int(prefix_t[i]), ext_lens[i]
            assert cm.shape == (e, e), (cm.shape, e)
            mask[i, :e, p : p + e] = cm
    valid_q = q_ar[None, :] < ext_t[:, None]  # [bs, max_q]
    mask[:, :, 0] |= ~valid_q  # padded query rows attend to something (discarded later)
    q_index = (torch.arange(bs)[:, None] * max_q + q_ar[None, :])[valid_q]
    return kv_slots, mask, q_index


def _group_by_query_len(ext_lens: list[int]) -> list[list[int]]:
    """Request indices grouped by query length (one group when all are equal)."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(ext_lens):
        groups.setdefault(e, []).append(i)
    return list(groups.values())


class TorchNativeAttnBackend(AttentionBackend):
    """Ragged over query lengths: requests are grouped by their number of new tokens and each
    group runs one SDPA, so a batch mixing decode rows (1 query) with verify chains (up to 8)
    does not pad every request to the longest chain."""

    def __init__(self, device: str = "cpu", **_: object) -> None:
        self.device = device

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        seq_lens, ext_lens = fb.seq_lens_list, fb.extend_lens_list
        req_rows = fb.req_to_token[fb.req_pool_indices, : max(seq_lens)]
        groups = []
        parts = _group_by_query_len(ext_lens)
        starts = [0]
        for e in ext_lens:
            starts.append(starts[-1] + e)
        for idx in parts:
            sel = torch.tensor(idx, dtype=torch.int64)
            cms = ([fb.custom_masks[i] for i in idx] if fb.custom_masks is not None else None)
            kv_slots, mask, q_index = build_attention_mask(
                [seq_lens[i] for i in idx], [ext_lens[i] for i in idx],
                req_rows[sel.to(req_rows.device)], cms)
            token_index = None
            if len(parts) > 1:
                token_index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx])
            if self.device != "cpu":
                kv_slots, mask, q_index = (kv_slots.to(self.device), mask.to(self.device),
                                           q_index.to(self.device))
                token_index = token_index.to(self.device) if token_index is not None else None
            groups.append(TorchNativeGroup(kv_slots, mask[:, None], q_index, token_index,
                                           len(idx), max(ext_lens[i] for i in idx)))
        fb.attn_metadata = TorchNativeMetadata(groups)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        md: TorchNativeMetadata = fb.attn_metadata
        kv_pool.store(layer_id, fb.out_cache_loc, k, v)
        if len(md.groups) == 1:
            return self._attend(q, md.groups[0], layer_id, kv_pool, sm_scale)
        out = torch.empty_like(q)
        for g in md.groups:
            assert g.token_index is not None
            out[g.token_index] = self._attend(q[g.token_index], g, layer_id, kv_pool, sm_scale)
        return out

    @staticmethod
    def _attend(q: torch.Tensor, md: TorchNativeGroup, layer_id: int, kv_pool: KVPool,
                sm_scale: float) -> torch.Tensor:
        """``q [group tokens, h, d]`` -> ``[group tokens, h, d]`` over the group's padded KV."""
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
