"""Store new tokens' K/V into a slot-indexed KV pool: ``k_buf[loc[i]] = k[i]`` (same for v).

Contract: ``loc`` holds distinct slot indices (duplicates give an unspecified winner); values are
cast to the buffer dtype; nothing outside the ``loc`` rows is touched. ``k``/``v`` may be strided
views (e.g. slices of a fused qkv projection) as long as the head dim is contiguous.
"""

from __future__ import annotations

import torch

from ._runtime import check_launchable


def _check(
    k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    assert k_buf.dim() == 3 and v_buf.shape == k_buf.shape, (k_buf.shape, v_buf.shape)
    assert k.dim() == 3 and v.shape == k.shape, (k.shape, v.shape)
    assert k.shape[1:] == k_buf.shape[1:], f"token shape {k.shape[1:]} != slot {k_buf.shape[1:]}"
    assert loc.shape == (k.shape[0],), f"loc must be [{k.shape[0]}], got {tuple(loc.shape)}"
    assert not loc.dtype.is_floating_point


def store_kv(
    k_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim], written in place
    v_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim], written in place
    loc: torch.Tensor,  # [n] int slot indices
    k: torch.Tensor,  # [n, kv_heads, head_dim]
    v: torch.Tensor,  # [n, kv_heads, head_dim]
) -> None:
    """Triton implementation (one program per token)."""
    _check(k_buf, v_buf, loc, k, v)
    if k.shape[0] == 0:
        return
    check_launchable(k_buf, v_buf, loc, k, v)
    for name, t in (("k_buf", k_buf), ("v_buf", v_buf), ("k", k), ("v", v)):
        assert t.stride(2) == 1, f"{name} must be contiguous in head_dim"
    from .jit.kv_store import store_kv_kernel  # imports triton

    kv_heads, head_dim = k.shape[1], k.shape[2]
    store_kv_kernel[(k.shape[0],)](
        k_buf, v_buf, loc.contiguous(), k, v,
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=1 << (kv_heads - 1).bit_length(),
        BLOCK_D=1 << (head_dim - 1).bit_length(),
    )


def store_kv_ref(
    k_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim], written in place
    v_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim], written in place
    loc: torch.Tensor,  # [n] int slot indices
    k: torch.Tensor,  # [n, kv_heads, head_dim]
    v: torch.Tensor,  # [n, kv_heads, head_dim]
) -> None:
    """Torch reference (index_copy_)."""
    _check(k_buf, v_buf, loc, k, v)
    index = loc.to(torch.int64)
    k_buf.index_copy_(0, index, k.to(k_buf.dtype))
    v_buf.index_copy_(0, index, v.to(v_buf.dtype))
