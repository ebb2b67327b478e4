"""Extend / verify attention over a paged KV pool, with a per-request mask over the new tokens.

Layout (the ``ForwardBatch`` contract of ``dspark_sglang``): request ``i`` has ``seq_lens[i]`` keys,
listed in order by ``req_to_token[req_pool_indices[i], :seq_lens[i]]``; the last
``extend_lens[i]`` of them are its new tokens, whose queries are rows
``extend_start[i] : extend_start[i] + extend_lens[i]`` of ``q`` and whose K/V are already stored.
Every new token sees the whole prefix. Among the new tokens, ``custom_mask`` decides (row = query,
column = key, True/1 = may attend; request ``i``'s ``[ext_i, ext_i]`` block is stored row-major
at ``custom_mask[mask_indptr[i] : mask_indptr[i] + ext_i * ext_i]``); ``None`` means causal.
A chain draft is the causal case; a tree draft sets each node's row to its ancestors and itself.
A query row that sees no key at all (possible only with an empty prefix and an all-zero mask row)
gets zeros.

``verify_attention`` (Triton) and ``verify_attention_ref`` (torch) share one signature and contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._runtime import check_launchable, dot_in_fp32


def mask_indptr_from_extend_lens(extend_lens: torch.Tensor) -> torch.Tensor:
    """Offsets of each request's ``[ext, ext]`` mask block in the flat mask: ``[bs + 1]`` int64."""
    sizes = extend_lens.to(torch.int64) ** 2
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])


def _check_inputs(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start: torch.Tensor,
    custom_mask: torch.Tensor | None,
    mask_indptr: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    assert q.dim() == 3 and k_buf.dim() == 3 and v_buf.shape == k_buf.shape, (q.shape, k_buf.shape)
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_buf.shape[1]
    assert k_buf.shape[2] == head_dim, f"head_dim mismatch {k_buf.shape[2]} != {head_dim}"
    assert num_heads % kv_heads == 0, f"num_heads {num_heads} not a multiple of {kv_heads}"
    assert q.dtype == k_buf.dtype == v_buf.dtype, (q.dtype, k_buf.dtype, v_buf.dtype)
    assert req_to_token.dim() == 2
    bs = seq_lens.shape[0]
    for name, t in (("req_pool_indices", req_pool_indices), ("extend_lens", extend_lens),
                    ("extend_start", extend_start)):
        assert t.shape == (bs,), f"{name} must be [bs={bs}], got {tuple(t.shape)}"
    if custom_mask is not None:
        assert custom_mask.dim() == 1, "custom_mask is flat: sum_i ext_i * ext_i"
        assert custom_mask.dtype in (torch.bool, torch.uint8), custom_mask.dtype
        assert mask_indptr is None or mask_indptr.shape == (bs + 1,)
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype


def verify_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    req_to_token: torch.Tensor,  # [max_reqs, max_ctx] int64
    req_pool_indices: torch.Tensor,  # [bs]
    seq_lens: torch.Tensor,  # [bs] prefix + new tokens
    extend_lens: torch.Tensor,  # [bs] new tokens
    extend_start: torch.Tensor,  # [bs] first row of each request in q
    custom_mask: torch.Tensor | None,  # flat bool/uint8 [sum_i ext_i^2], or None = causal
    mask_indptr: torch.Tensor | None,  # [bs + 1]; None = derived from extend_lens
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; rows of no request kept
    max_extend_len: int | None = None,  # host-side max(extend_lens); None = read it (one sync)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q's dtype
    """Triton implementation; see the module docstring for the contract.

    Writes only the rows that belong to a request (into ``out`` when given). Head dims that are
    not a power of two (e.g. 80) are padded inside the kernel. Launch: grid
    ``(bs, num_heads, ceil(max_extend_len / BLOCK_M))``.
    """
    _check_inputs(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, extend_lens,
                  extend_start, custom_mask, mask_indptr, out)
    check_launchable(q, k_buf, v_buf, req_to_token, seq_lens)
    from .jit.verify_attention import verify_attention_kernel  # imports triton

    o = out if out is not None else torch.empty_like(q)
    bs = seq_lens.shape[0]
    if bs == 0 or q.shape[0] == 0:
        return o
    if max_extend_len is None:
        max_extend_len = int(extend_lens.max().item())
    if max_extend_len == 0:
        return o
    for name, t in (("q", q), ("k_buf", k_buf), ("v_buf", v_buf), ("out", o)):
        assert t.stride(2) == 1, f"{name} must be contiguous in head_dim"
    assert req_to_token.stride(1) == 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    has_mask = custom_mask is not None
    if has_mask:
        mask_u8 = custom_mask.contiguous().view(torch.uint8)
        if mask_indptr is None:
            mask_indptr = mask_indptr_from_extend_lens(extend_lens)
    else:
        mask_u8 = q.new_zeros(1, dtype=torch.uint8)
        mask_indptr = seq_lens  # never read
    block_m = 16 if max_extend_len <= 16 else (32 if max_extend_len <= 32 else 64)
    block_n = 64
    head_dim_pad = max(16, 1 << (head_dim - 1).bit_length())
    grid = (bs, num_heads, (max_extend_len + block_m - 1) // block_m)
    verify_attention_kernel[grid](
        q, k_buf, v_buf, o,
        req_to_token, req_pool_indices, seq_lens, extend_lens, extend_start,
        mask_u8, mask_indptr,
        float(sm_scale) * math.log2(math.e),
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), o.stride(0), o.stride(1), req_to_token.stride(0),
        KV_GROUP=num_heads // k_buf.shape[1],
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_MASK=has_mask,
        DOT_FP32=dot_in_fp32(q.dtype, q.device),
        num_warps=4 if block_m < 64 else 8,
        num_stages=2,
    )
    return o


def verify_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    req_to_token: torch.Tensor,  # [max_reqs, max_ctx] int64
    req_pool_indices: torch.Tensor,  # [bs]
    seq_lens: torch.Tensor,  # [bs]
    extend_lens: torch.Tensor,  # [bs]
    extend_start: torch.Tensor,  # [bs]
    custom_mask: torch.Tensor | None,  # flat bool/uint8 [sum_i ext_i^2], or None = causal
    mask_indptr: torch.Tensor | None,  # [bs + 1]; None = derived from extend_lens
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    max_extend_len: int | None = None,  # accepted for signature parity; unused
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Torch reference (a loop over requests, SDPA in fp32 or wider with an explicit bool mask).

    Same contract as ``verify_attention``; reads the small per-request tensors on the host.
    """
    del max_extend_len
    _check_inputs(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, extend_lens,
                  extend_start, custom_mask, mask_indptr, out)
    o = out if out is not None else torch.empty_like(q)
    num_heads, kv_heads = q.shape[1], k_buf.shape[1]
    group = num_heads // kv_heads
    if custom_mask is not None and mask_indptr is None:
        mask_indptr = mask_indptr_from_extend_lens(extend_lens)
    compute = torch.promote_types(q.dtype, torch.float32)
    rows = req_pool_indices.tolist()
    seqs = seq_lens.tolist()
    exts = extend_lens.tolist()
    starts = extend_start.tolist()
    offsets = mask_indptr.tolist() if custom_mask is not None else None
    for i, (row, seq, ext, start) in enumerate(zip(rows, seqs, exts, starts, strict=True)):
        if ext == 0:
            continue
        prefix = seq - ext
        slots = req_to_token[row, :seq]
        k = k_buf[slots].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq, D]
        v = v_buf[slots].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq, D]
        qi = q[start : start + ext].to(compute).transpose(0, 1)  # [H, ext, D]
        visible = torch.ones(ext, seq, dtype=torch.bool, device=q.device)
        if custom_mask is None:
            new_block = torch.ones(ext, ext, dtype=torch.bool, device=q.device).tril()
        else:
            flat = custom_mask[offsets[i] : offsets[i] + ext * ext]
            new_block = flat.reshape(ext, ext).to(torch.bool)
        visible[:, prefix:] = new_block
        oi = F.scaled_dot_product_attention(qi, k, v, attn_mask=visible, scale=sm_scale)
        oi = oi.masked_fill(~visible.any(1)[None, :, None], 0.0)  # rows with no visible key
        o[start : start + ext] = oi.transpose(0, 1).to(o.dtype)
    return o
