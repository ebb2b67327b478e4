"""Triton kernel: set logits of tokens whose bitmask bit is 0 to -inf."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def apply_bitmask_kernel(
    logits_ptr,  # [n, vocab], written in place
    bitmask_ptr,  # [n, num_words] int32
    vocab,
    num_words,
    stride_logits,
    stride_bitmask,
    BLOCK: tl.constexpr,
):
    """Grid ``(n, ceil(vocab / BLOCK))``. Token ``t`` is bit ``t % 32`` of word ``t // 32``;
    tokens past ``32 * num_words`` count as disallowed."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab
    word_idx = offs // 32
    words = tl.load(
        bitmask_ptr + row * stride_bitmask + word_idx,
        mask=in_vocab & (word_idx < num_words),
        other=0,
    )
    allowed = ((words >> (offs % 32)) & 1) != 0
    neg_inf = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_logits + offs, neg_inf, mask=in_vocab & ~allowed)
