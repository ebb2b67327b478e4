"""Triton kernels: greedy acceptance of chain and tree drafts against the target's argmax."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chain_accept_kernel(
    draft_ptr,  # [bs, L] int64
    draft_lens_ptr,  # [bs]
    target_ptr,  # [bs, L + 1] int64
    num_accepted_ptr,  # [bs] int64, out
    out_tokens_ptr,  # [bs, L + 1] int64, out
    L,
    stride_draft,
    stride_target,
    stride_out,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two > L
):
    """One program per request: first mismatch (or draft end) -> accepted count, then tokens."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    draft_len = tl.minimum(tl.load(draft_lens_ptr + b).to(tl.int32), L)
    draft = tl.load(draft_ptr + b * stride_draft + offs, mask=offs < L, other=PAD)
    target = tl.load(target_ptr + b * stride_target + offs, mask=offs <= L, other=PAD)
    reject = (draft != target) | (offs >= draft_len)
    num_accepted = tl.min(tl.where(reject, offs, BLOCK), 0)
    tl.store(num_accepted_ptr + b, num_accepted.to(tl.int64))
    tokens = tl.where(offs <= num_accepted, target, PAD)
    tl.store(out_tokens_ptr + b * stride_out + offs, tokens.to(tl.int64), mask=offs <= L)


@triton.jit
def tree_accept_kernel(
    tokens_ptr,  # [bs, N] int64, node 0 = root
    parents_ptr,  # [bs, N] int64, parents[i] < i, root's is ignored
    num_nodes_ptr,  # [bs]
    target_ptr,  # [bs, N] int64, target argmax after each node
    num_accepted_ptr,  # [bs] int64, out
    path_ptr,  # [bs, N] int64, out
    out_tokens_ptr,  # [bs, N] int64, out
    N,
    stride_tokens,
    stride_parents,
    stride_target,
    stride_path,
    stride_out,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= N
):
    """One program per request, one ascending pass over the nodes.

    Because parents precede children, scanning nodes in index order and stepping to the first
    node whose parent is the current tip and whose token equals the target's choice at the tip
    visits exactly the greedy path (lowest-index child on ties).
    """
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    num_nodes = tl.minimum(tl.load(num_nodes_ptr + b).to(tl.int32), N)
    tip = tl.full([], 0, tl.int32)
    depth = tl.full([], 0, tl.int32)
    path = tl.where(offs == 0, 0, PAD).to(tl.int64)
    out = tl.full([BLOCK], PAD, tl.int64)
    for i in range(1, num_nodes):
        parent = tl.load(parents_ptr + b * stride_parents + i).to(tl.int32)
        token = tl.load(tokens_ptr + b * stride_tokens + i).to(tl.int64)
        wanted = tl.load(target_ptr + b * stride_target + tip).to(tl.int64)
        hit = (parent == tip) & (token == wanted)
        out = tl.where(hit & (offs == depth), token, out)
        depth = tl.where(hit, depth + 1, depth)
        path = tl.where(hit & (offs == depth), i, path)
        tip = tl.where(hit, i, tip)
    bonus = tl.load(target_ptr + b * stride_target + tip).to(tl.int64)
    out = tl.where(offs == depth, bonus, out)
    tl.store(num_accepted_ptr + b, depth.to(tl.int64))
    tl.store(path_ptr + b * stride_path + offs, path, mask=offs < N)
    tl.store(out_tokens_ptr + b * stride_out + offs, out, mask=offs < N)
