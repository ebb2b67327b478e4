"""Packed token bitmasks: one bit per token, 32 tokens per int32 word.

Layout (the one xgrammar and llguidance write): token ``t`` is bit ``t % 32`` (least significant
first) of word ``t // 32``; a set bit means "allowed". A mask for a model vocab of ``V`` tokens is
``[n_rows, ceil(V / 32)]`` int32 on CPU (the backends fill it there); apply it to logits on any
device.
"""

from __future__ import annotations

import numpy as np
import torch


def bitmask_width(vocab_size: int) -> int:
    """Number of int32 words per row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def allocate_bitmask(n_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 bitmask ``[n_rows, ceil(vocab_size / 32)]`` with every token allowed."""
    return torch.full((n_rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def _bit_positions(device: torch.device) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)  # [32]


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack ``[n, W]`` int32 into ``[n, vocab_size]`` bool (True = allowed).

    Tokens past ``32 * W`` (a logits vocab wider than the mask) come out False.
    """
    assert bitmask.dtype == torch.int32 and bitmask.dim() == 2, (bitmask.dtype, bitmask.shape)
    n, width = bitmask.shape
    bits = (bitmask.unsqueeze(-1) >> _bit_positions(bitmask.device)) & 1  # [n, W, 32]
    flat = bits.reshape(n, width * 32).bool()  # [n, 32 * W]
    if vocab_size <= width * 32:
        return flat[:, :vocab_size].contiguous()
    out = torch.zeros(n, vocab_size, dtype=torch.bool, device=bitmask.device)
    out[:, : width * 32] = flat
    return out


def bool_to_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Pack ``[n, V]`` bool into ``[n, ceil(V / 32)]`` int32 (the inverse of bitmask_to_bool)."""
    assert allowed.dtype == torch.bool and allowed.dim() == 2
    packed = np.packbits(allowed.cpu().numpy(), axis=1, bitorder="little")  # [n, ceil(V/8)]
    n, nbytes = packed.shape
    pad = (-nbytes) % 4
    if pad:
        packed = np.concatenate([packed, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32).copy())  # [n, W]


def _apply_torch_(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    vocab = logits.shape[1]
    allowed = bitmask_to_bool(bitmask, vocab)  # [n, V]
    logits.masked_fill_(~allowed, float("-inf"))


def _xgrammar_apply(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int) -> bool:
    """Try xgrammar's in-place kernel (C++ on CPU, Triton on CUDA); False if unusable."""
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - xgrammar is a declared dependency
        return False
    try:
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
    except Exception:  # noqa: BLE001 - any failure falls back to the torch path
        return False
    return True


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, use_xgrammar: bool = True) -> None:
    """Set disallowed logits to -inf in place.

    ``logits`` ``[n, V]`` float (any device); ``bitmask`` ``[n, W]`` int32 (moved to the logits'
    device if needed). If ``V > 32 * W`` the columns past the mask are disallowed; if ``V`` is
    smaller the extra bits are ignored. The torch path is the reference; xgrammar's kernel is used
    when it is importable and accepts the tensors.
    """
    assert logits.dim() == 2 and bitmask.dim() == 2, (logits.shape, bitmask.shape)
    assert logits.shape[0] == bitmask.shape[0], (logits.shape, bitmask.shape)
    assert bitmask.dtype == torch.int32, bitmask.dtype
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    vocab = logits.shape[1]
    covered = min(vocab, bitmask.shape[1] * 32)
    if covered < vocab:
        logits[:, covered:] = float("-inf")
    if use_xgrammar and logits.is_contiguous() and _xgrammar_apply(logits, bitmask, covered):
        return
    _apply_torch_(logits[:, :covered], bitmask)
