"""Fused, chunked LM head + DSpark token losses for training (CPU and CUDA).

The reference path (:func:`training.losses.dspark_loss`) materialises draft and target logits,
probabilities and their differences as ``[N, k, V]`` tensors (V = 49k for SmolLM2: ~350 MB each
for 256 blocks of 7), so a training step is bound by memory traffic over those tensors, not by
the matmuls. Here the rows are processed in chunks that stay in cache: per chunk the draft
logits ``z = h @ W^T + e @ W2^T`` (frozen shared head ``W``, trainable Markov ``W2``) and the
target logits ``zt = ht @ W^T`` are computed, reduced to per-row losses, and dropped. The
backward pass recomputes them per chunk and forms the logit gradient analytically::

    p = softmax(z), q = softmax(zt), s = sign(p - q)
    l1  = Σ_v |p_v - q_v|          dl1/dz  = p ⊙ (s - <p, s>)
    ce  = logsumexp(z) - z_y       dce/dz  = p - onehot(y)

then ``dh = dz @ W``, ``de = dz @ W2``, ``dW2 = dz^T @ e``. The forward keeps ``p`` (bf16)
and ``s`` (int8) for the backward: ``3·M·V`` bytes instead of two more matmuls per chunk.
Matmuls run in ``matmul_dtype``
(bf16 by default: on CPUs with AVX512-BF16 and on GPUs it is several times faster than fp32);
softmax and losses are always float32.
"""

from __future__ import annotations

from typing import Any

import torch


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, e: torch.Tensor | None,
                  w2: torch.Tensor | None) -> torch.Tensor:
    z = (h @ w.t()).float()  # [c, V]
    if e is not None and w2 is not None:
        z = z + (e @ w2.t()).float()
    return z


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, markov_e: torch.Tensor | None,
                head_w: torch.Tensor, markov_w2: torch.Tensor | None,
                target_hidden: torch.Tensor, target_ids: torch.Tensor | None, chunk: int,
                matmul_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = hidden.shape[0]
        labels = (hidden.new_empty(m, dtype=torch.int64) if target_ids is None
                  else target_ids)  # None: each row's target argmax, filled per chunk
        w = head_w.to(matmul_dtype)
        w2 = markov_w2.to(matmul_dtype) if markov_w2 is not None else None
        l1 = hidden.new_empty(m, dtype=torch.float32)
        ce = hidden.new_empty(m, dtype=torch.float32)
        # p and sign(p - q) are kept in bf16 / int8 for the backward pass (skips recomputing
        # both [c, V] matmuls per chunk; bf16 p is exact to ~0.4 % relative)
        p_keep = hidden.new_empty(m, head_w.shape[0], dtype=torch.bfloat16)
        s_keep = hidden.new_empty(m, head_w.shape[0], dtype=torch.int8)
        with torch.no_grad():
            for a in range(0, m, chunk):
                b = min(m, a + chunk)
                e = markov_e[a:b].to(matmul_dtype) if markov_e is not None else None
                z = _chunk_logits(hidden[a:b].to(matmul_dtype), w, e, w2)
                zt = (target_hidden[a:b].to(matmul_dtype) @ w.t()).float()
                if target_ids is None:
                    labels[a:b] = zt.argmax(-1)
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                p = (z - lse).exp_()
                q = torch.softmax(zt, dim=-1)
                d = p - q
                s_keep[a:b] = torch.sign(d)
                p_keep[a:b] = p
                l1[a:b] = d.abs_().sum(-1)
                ce[a:b] = lse.squeeze(-1) - z.gather(-1, labels[a:b, None]).squeeze(-1)
        ctx.save_for_backward(markov_e, head_w, markov_w2, labels, p_keep, s_keep)
        ctx.mark_non_differentiable(labels)
        ctx.hidden_dtype = hidden.dtype
        ctx.chunk, ctx.matmul_dtype = chunk, matmul_dtype
        return l1, ce, labels

    @staticmethod
    def backward(ctx: Any, g_l1: torch.Tensor, g_ce: torch.Tensor,
                 _g_labels: torch.Tensor | None) -> tuple[Any, ...]:
        markov_e, head_w, markov_w2, target_ids, p_keep, s_keep = ctx.saved_tensors
        chunk, mdt = ctx.chunk, ctx.matmul_dtype
        m = p_keep.shape[0]
        w = head_w.to(mdt)
        w2 = markov_w2.to(mdt) if markov_w2 is not None else None
        need_h, need_e, _, need_w2 = ctx.needs_input_grad[:4]
        d_h = p_keep.new_empty(m, head_w.shape[1], dtype=torch.float32) if need_h else None
        d_e = (torch.zeros_like(markov_e, dtype=torch.float32)
               if need_e and markov_e is not None else None)
        d_w2 = (torch.zeros_like(markov_w2, dtype=torch.float32)
                if need_w2 and markov_w2 is not None else None)
        g_l1, g_ce = g_l1.float(), g_ce.float()
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            e = markov_e[a:b].to(mdt) if markov_e is not None else None
            p = p_keep[a:b].float()
            s = s_keep[a:b].float()
            ps = (p * s).sum(-1, keepdim=True)
            # dz = g_l1 * p (s - <p,s>) + g_ce * (p - onehot(y))
            dz = p * (g_l1[a:b, None] * (s - ps) + g_ce[a:b, None])
            dz.scatter_add_(-1, target_ids[a:b, None], -g_ce[a:b, None])
            dzm = dz.to(mdt)
            if d_h is not None:
                d_h[a:b] = (dzm @ w).float()
            if d_e is not None and w2 is not None:
                d_e[a:b] = (dzm @ w2).float()
            if d_w2 is not None and e is not None:
                d_w2 += (dzm.t() @ e).float()
        return (d_h.to(ctx.hidden_dtype) if d_h is not None else None,
                d_e.to(markov_e.dtype) if d_e is not None else None, None,
                d_w2.to(markov_w2.dtype) if d_w2 is not None else None, None, None, None, None)


def fused_head_losses(
    hidden: torch.Tensor,  # [M, H] draft block hidden (final-normed), requires grad
    markov_e: torch.Tensor | None,  # [M, r] W1[prev] (vanilla Markov head), or None
    head_w: torch.Tensor,  # [V, H] frozen shared LM head weight
    markov_w2: torch.Tensor | None,  # [V, r] Markov output weight (trainable), or None
    target_hidden: torch.Tensor,  # [M, H] target final hidden at the same positions
    target_ids: torch.Tensor | None,  # [M] int64 training tokens; None: the target's argmax
    chunk: int = 128,
    matmul_dtype: torch.dtype = torch.bfloat16,
    return_labels: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(l1 [M], ce [M])`` float32 of ``softmax(h W^T + e W2^T)`` against
    ``softmax(ht W^T)`` and ``target_ids`` (``None``: each row's argmax of ``ht W^T``, the token
    greedy verification accepts); differentiable in ``hidden``, ``markov_e`` and ``markov_w2``
    without materialising any ``[M, V]`` tensor beyond one chunk. ``return_labels`` appends the
    CE labels used ``[M]``."""
    assert hidden.dim() == 2 and target_hidden.shape == hidden.shape, "hidden must be [M, H]"
    assert target_ids is None or target_ids.shape == hidden.shape[:1], "target_ids must be [M]"
    assert (markov_e is None) == (markov_w2 is None), "markov_e and markov_w2 go together"
    l1, ce, labels = _FusedHeadLoss.apply(
        hidden, markov_e, head_w, markov_w2, target_hidden,
        None if target_ids is None else target_ids.long(), int(chunk), matmul_dtype)
    return (l1, ce, labels) if return_labels else (l1, ce)
