"""Triton kernel: attention of new tokens over a paged KV pool with a per-request mask."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(
    m_i, l_i, acc, s, v, DOT_FP32: tl.constexpr
):
    """Fold one key block into the running (max, sum, acc). ``s`` is in log2 units, -inf = hidden.

    Rows that have seen only hidden keys keep ``m_i = -inf`` and contribute nothing (the
    ``m_safe`` substitution keeps ``exp2(-inf - -inf)`` from producing NaN).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def verify_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_slots, kv_heads, head_dim]
    v_ptr,  # [num_slots, kv_heads, head_dim]
    o_ptr,  # [num_tokens, num_heads, head_dim]
    req_to_token_ptr,  # [max_reqs, max_ctx] int64
    req_pool_indices_ptr,  # [bs]
    seq_lens_ptr,  # [bs]
    extend_lens_ptr,  # [bs]
    extend_start_ptr,  # [bs]
    mask_ptr,  # flat uint8, sum_i ext_i * ext_i (unused when HAS_MASK is False)
    mask_indptr_ptr,  # [bs + 1]
    qk_scale_log2,  # sm_scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_req,
    KV_GROUP: tl.constexpr,  # num_heads // kv_heads
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two >= HEAD_DIM
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands (fp32 inputs, and the CPU interpreter)
):
    """One program per (request, query head, block of BLOCK_M new tokens).

    Pass 1 walks the prefix keys (always visible), pass 2 the request's new tokens, whose
    visibility comes from the custom mask (row-major ``[ext, ext]`` at ``mask_indptr[b]``) or is
    causal. Last-dim strides are 1 (asserted by the wrapper).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    ext_len = tl.load(extend_lens_ptr + b)
    if mb * BLOCK_M >= ext_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ext_start = tl.load(extend_start_ptr + b)
    req_row = tl.load(req_pool_indices_ptr + b)
    prefix_len = seq_len - ext_len
    kv_h = h // KV_GROUP

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_valid = offs_m < ext_len
    d_valid = offs_d < HEAD_DIM

    q_ptrs = q_ptr + (ext_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    token_row = req_to_token_ptr + req_row * stride_req

    # pass 1: prefix keys, visible to every new token
    for start in range(0, prefix_len, BLOCK_N):
        cols = start + offs_n
        c_valid = cols < prefix_len
        slots = tl.load(token_row + cols, mask=c_valid, other=0).to(tl.int64)
        kv_mask = c_valid[:, None] & d_valid[None, :]
        k = tl.load(
            k_ptr + slots[:, None] * stride_kt + kv_h * stride_kh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM_PAD]
        v = tl.load(
            v_ptr + slots[:, None] * stride_vt + kv_h * stride_vh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(c_valid[None, :], s * qk_scale_log2, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, DOT_FP32)

    # pass 2: the request's new tokens, masked
    if HAS_MASK:
        ext_end = ext_len
        mask_base = tl.load(mask_indptr_ptr + b)
    else:
        ext_end = tl.minimum(ext_len, (mb + 1) * BLOCK_M)  # causal: later keys are all hidden
        mask_base = 0
    for start in range(0, ext_end, BLOCK_N):
        cols = start + offs_n
        c_valid = cols < ext_len
        slots = tl.load(token_row + prefix_len + cols, mask=c_valid, other=0).to(tl.int64)
        kv_mask = c_valid[:, None] & d_valid[None, :]
        k = tl.load(
            k_ptr + slots[:, None] * stride_kt + kv_h * stride_kh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr + slots[:, None] * stride_vt + kv_h * stride_vh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        pair_valid = m_valid[:, None] & c_valid[None, :]
        if HAS_MASK:
            bits = tl.load(
                mask_ptr + mask_base + offs_m[:, None] * ext_len + cols[None, :],
                mask=pair_valid,
                other=0,
            )
            visible = pair_valid & (bits != 0)
        else:
            visible = pair_valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s * qk_scale_log2, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, DOT_FP32)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key at all output zeros
    out = acc / l_safe[:, None]
    o_ptrs = o_ptr + (ext_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
