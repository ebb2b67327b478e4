"""Apply a packed token bitmask to logits in place.

``bitmask`` is int32 ``[n, ceil(vocab / 32)]``; bit ``j`` (little-endian: ``(word >> j) & 1``) of
word ``w`` allows token ``32 * w + j``. Disallowed logits become ``-inf``; allowed ones are left
untouched. Tokens at or past ``32 * num_words`` (a logits row wider than the mask, e.g. a padded
LM head) are disallowed: a token the grammar never saw can never be sampled. This is the layout
xgrammar and llguidance produce.
"""

from __future__ import annotations

import torch

from ._runtime import check_launchable


def _check(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    assert logits.dim() == 2 and bitmask.dim() == 2, (logits.shape, bitmask.shape)
    assert logits.shape[0] == bitmask.shape[0], f"rows {logits.shape[0]} != {bitmask.shape[0]}"
    assert bitmask.dtype == torch.int32, bitmask.dtype
    assert logits.dtype.is_floating_point, logits.dtype


def apply_token_bitmask_inplace(
    logits: torch.Tensor,  # [n, vocab] float, written in place
    bitmask: torch.Tensor,  # [n, ceil(vocab / 32)] int32
) -> None:
    """Triton implementation."""
    _check(logits, bitmask)
    n, vocab = logits.shape
    if n == 0 or vocab == 0:
        return
    check_launchable(logits, bitmask)
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1
    from .jit.bitmask import apply_bitmask_kernel  # imports triton

    block = 1024
    apply_bitmask_kernel[(n, (vocab + block - 1) // block)](
        logits, bitmask, vocab, bitmask.shape[1], logits.stride(0), bitmask.stride(0), BLOCK=block
    )


def unpack_token_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[n, num_words]`` int32 -> ``[n, vocab]`` bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool()  # [n, num_words, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed[:, :vocab]


def apply_token_bitmask_inplace_ref(
    logits: torch.Tensor,  # [n, vocab] float, written in place
    bitmask: torch.Tensor,  # [n, ceil(vocab / 32)] int32
) -> None:
    """Torch reference (unpack, then ``masked_fill_``). Runs on any device."""
    _check(logits, bitmask)
    logits.masked_fill_(~unpack_token_bitmask(bitmask, logits.shape[1]), float("-inf"))
