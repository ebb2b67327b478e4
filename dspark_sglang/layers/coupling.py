"""Position-keyed Gumbel-max sampling: a seed makes speculation invisible at T > 0.

For a request with an explicit ``seed``, the token at output position ``i`` is

    x_i = argmax_v  log p_i(v) + G(seed, i)[v]          (tokens with p_i(v) = 0 excluded)

where ``p_i`` is the target's processed distribution (temperature, top-k/p, min-p, penalties,
grammar) and ``G(seed, i)`` is i.i.d. standard Gumbel noise drawn from a counter-based stream
keyed by ``(seed, i)`` only. By the Gumbel-max trick ``x_i`` is an exact sample from ``p_i``, and
the noise is independent across positions, so the output follows the target distribution.

Because ``x_i`` depends only on (seed, position, target distribution), it does not matter how the
token was reached: plain decoding, any drafter, any verify length, any batch or load give the same
text. Speculative verification becomes a greedy match against these per-position samples: a
draft is accepted exactly when it equals ``x_i``, and the first mismatch emits ``x_i`` itself.
A drafter maximises agreement by drawing its own drafts with the same noise,
``d_i = argmax log q_i + G(seed, i)`` (the Gumbel coupling of ``q`` and ``p``).
"""

from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 63) - 1


def _stream_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for ``(seed, position)``; distinct pairs give unrelated streams."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(position)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK64


def position_gumbel(seed: int, position: int, vocab: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise ``[vocab]`` float64 for output position ``position``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_stream_seed(seed, position))
    u = torch.rand(vocab, generator=gen, dtype=torch.float64)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)
    return (-torch.log(-torch.log(u))).to(device)


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> int:
    """``argmax log probs + noise`` over the support of ``probs [V]`` (need not be normalised)."""
    assert probs.dim() == 1 and noise.shape == probs.shape, "probs and noise must be [V]"
    scores = torch.log(probs.double()) + noise.to(device=probs.device, dtype=torch.float64)
    scores = torch.where(probs > 0, scores, torch.full_like(scores, float("-inf")))
    return int(scores.argmax())


def coupled_sample(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at output ``position`` of a request seeded with ``seed``: a sample of ``probs``."""
    return gumbel_argmax(probs, position_gumbel(seed, position, probs.shape[-1], probs.device))
