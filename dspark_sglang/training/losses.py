"""The DSpark training loss, as DeepSpec computes it (``deepspec/modeling/dspark/loss.py``).

Per supervised block position ``k`` (0-based row ``j = k - 1``) with draft distribution ``p_d``
(softmax of base logits + Markov bias) and target distribution ``p_t``:

- weight ``w = valid · exp(-j / gamma)`` (DeepSpec ``loss_decay_gamma``, 4.0 for block 7);
- CE: ``-log p_d(y)`` with ``y`` the training token (DeepSpec: the token of the target-generated
  response; here ``target_ids`` or, if omitted, ``argmax p_t``);
- L1: ``‖p_d − p_t‖₁``. Note DeepSpec's "l1 loss" is the *full* L1 norm, i.e. ``2 · TV``; the
  ``alpha_tv`` weight multiplies this term, as DeepSpec's ``l1_loss_alpha`` (0.9) does;
- confidence: ``BCE(sigmoid(z), a)`` with ``a = clamp(1 − ½‖p_d − p_t‖₁, 0, 1) = Σ_v min(p_d,
  p_t)`` (the acceptance probability of draft sampling, target detached);
- each term is ``Σ w·term / (Σ w + 1e-6)`` over all positions in the batch, and
  ``total = alpha_ce·CE + alpha_tv·L1 + alpha_conf·BCE``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def position_weights(valid: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """``valid [N, k]`` -> ``valid · exp(-j / gamma)`` float32 (no decay when gamma is None/<=0)."""
    w = valid.float()
    if gamma is not None and gamma > 0:
        j = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32)
        w = w * torch.exp(-j / float(gamma))
    return w


def dspark_loss(
    draft_logits: torch.Tensor,  # [N, k, V]
    target_logits: torch.Tensor,  # [N, k, V] logits, or probabilities with target_is_probs
    confidence_logits: torch.Tensor | None,  # [N, k] raw head logits
    valid: torch.Tensor,  # [N, k] bool
    gamma: float | None = 4.0,
    alpha_ce: float = 0.1,
    alpha_tv: float = 0.9,
    alpha_conf: float = 1.0,
    target_ids: torch.Tensor | None = None,  # [N, k] int64 training tokens
    target_is_probs: bool = False,
    ce_mask: torch.Tensor | None = None,  # [N, k] bool: rows whose CE counts (default all)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted DSpark loss; returns ``(total, parts)``.

    ``parts``: ``ce``, ``l1`` (= 2·TV, the term weighted by ``alpha_tv``), ``tv``, ``conf``
    (0 without a head), ``accept_rate`` (mean ``Σ min(p_d, p_t)`` over valid positions) and
    ``expected_tau`` (mean over blocks with a valid position of ``1 + Σ_k Π_{i≤k} a_i``). All
    parts except ``ce``/``l1``/``conf`` are detached. ``ce_mask`` zeroes the CE of the rows it
    leaves out (their weight stays in the denominator): a training token outside a restricted
    vocabulary has no logit to raise.
    """
    assert draft_logits.shape == target_logits.shape, "draft and target must be [N, k, V]"
    assert valid.shape == draft_logits.shape[:2], "valid must be [N, k]"
    w = position_weights(valid, gamma)  # [N, k]
    den = w.sum() + 1e-6

    log_pd = torch.log_softmax(draft_logits.float(), dim=-1)  # [N, k, V]
    p_d = log_pd.exp()
    p_t = (target_logits.float() if target_is_probs
           else torch.softmax(target_logits.float(), dim=-1)).detach()
    if target_ids is None:
        target_ids = p_t.argmax(dim=-1)
    ce_tok = -log_pd.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)  # [N, k]
    if ce_mask is not None:
        ce_tok = ce_tok * ce_mask.to(ce_tok.dtype)
    ce = (ce_tok * w).sum() / den

    l1_tok = (p_d - p_t).abs().sum(dim=-1)  # [N, k]
    l1 = (l1_tok * w).sum() / den
    accept = (1.0 - 0.5 * l1_tok).clamp(0.0, 1.0)  # [N, k]

    conf = ce.new_zeros(())
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(
            confidence_logits.float(), accept.detach(), reduction="none")
        conf = (bce * w).sum() / den

    total = alpha_ce * ce + alpha_tv * l1 + alpha_conf * conf
    with torch.no_grad():
        vf = valid.float()
        accept_rate = (accept * vf).sum() / vf.sum().clamp(min=1.0)
        blocks = valid.any(dim=-1)
        tau = 1.0 + (accept * vf).cumprod(dim=-1).sum(dim=-1)
        expected_tau = (tau * blocks).sum() / blocks.sum().clamp(min=1)
    parts = {
        "ce": ce, "l1": l1, "tv": (0.5 * l1).detach(), "conf": conf,
        "accept_rate": accept_rate, "expected_tau": expected_tau,
    }
    return total, parts


def decay_weight(j: int, gamma: float) -> float:
    """Scalar ``exp(-j / gamma)`` for 0-based row ``j`` (reference for tests and reports)."""
    return math.exp(-j / gamma)
