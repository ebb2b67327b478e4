"""Triton kernel: scatter new tokens' K/V into the slot-indexed KV buffers."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    k_buf_ptr,  # [num_slots, kv_heads, head_dim]
    v_buf_ptr,  # [num_slots, kv_heads, head_dim]
    loc_ptr,  # [n] slot of each token
    k_ptr,  # [n, kv_heads, head_dim]
    v_ptr,  # [n, kv_heads, head_dim]
    stride_kb_s,
    stride_kb_h,
    stride_vb_s,
    stride_vb_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token; last-dim strides are 1. Values are cast to the buffer dtype."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + t * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :], mask=mask)
    tl.store(
        k_buf_ptr + slot * stride_kb_s + offs_h[:, None] * stride_kb_h + offs_d[None, :],
        k.to(k_buf_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_buf_ptr + slot * stride_vb_s + offs_h[:, None] * stride_vb_h + offs_d[None, :],
        v.to(v_buf_ptr.dtype.element_ty),
        mask=mask,
    )
