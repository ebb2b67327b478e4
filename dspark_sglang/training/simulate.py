"""Offline, exact simulation of speculative decoding along the target's own trajectory.

Given a target sequence ``ids`` (prompt of length ``P`` + the target's greedy continuation) and
the target's logits at every position, we ask the drafter for a block at *every* anchor
``p in [P, L-2]`` (context = tokens ``< p``, anchor = ``ids[p]``), teacher-forced with the true
previous tokens. That is exact for greedy verification: draft ``k`` only matters when drafts
``< k`` matched, and then they *are* the true tokens, so the accepted length at ``p`` is the
number of leading matches.

- greedy ``tau``: walk the trajectory as the engine would (start at ``p = P``, accept ``a``
  drafts, emit ``a + 1`` tokens, jump to ``p + a + 1``); ``tau = tokens / steps``.
- T=1 ``tau``: per anchor ``1 + Σ_k Π_{i≤k} α_i`` with ``α_i = Σ_v min(p_d, p_t)`` (draft and
  target softmax at temperature 1 along the target's path), averaged over all anchors.
- MTP-1: the same with only the first draft.
- per-position conditional acceptance ``P(draft k ok | drafts < k ok)`` (greedy, all anchors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

# logit_fn(anchor_pos [A]) -> (draft_logits [A, g, V] (with Markov bias),
#                              base_logits [A, g, V] (no Markov bias), conf_logits [A, g] | None)
LogitFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


@dataclass
class SeqTrace:
    """Per-anchor results of one sequence (rows = anchors ``P .. L-2``)."""

    accepted: np.ndarray  # [A, g] bool, greedy per-position match (teacher forced)
    accepted_base: np.ndarray  # [A, g] bool, same without the Markov bias
    alpha: np.ndarray  # [A, g] float, Σ min(p_d, p_t) at T=1
    alpha_base: np.ndarray  # [A, g] float
    valid: np.ndarray  # [A, g] bool (label inside the sequence)
    alpha_coupled: np.ndarray | None = None  # [A, g] float, Gumbel-coupled match probability

    conf_logits: np.ndarray | None = None  # [A, g]
    remaining: np.ndarray | None = None  # [A] int, tokens left after the anchor (L - 1 - p)


def trace_sequence(
    logit_fn: LogitFn, ids: torch.Tensor, prompt_len: int, target_logits: torch.Tensor,
    gamma: int, chunk: int = 64,
) -> SeqTrace | None:
    """``ids [L]``; ``target_logits [L, V]`` (row ``i`` predicts token ``i + 1``)."""
    n = int(ids.shape[0])
    anchors = torch.arange(prompt_len, n - 1)
    if anchors.numel() == 0:
        return None
    outs: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("acc", "accb", "al", "alb", "val", "conf", "alc")}
    for a in anchors.split(chunk):
        idx = a[:, None] + torch.arange(1, gamma + 1)[None, :]  # [A, g] label positions
        valid = idx < n
        labels = ids[idx.clamp(max=n - 1)]
        draft, base, conf = logit_fn(a)
        tgt = target_logits[(idx - 1).clamp(max=n - 1)].float()  # [A, g, V]
        p_t = torch.softmax(tgt, -1)
        for name, lg in (("acc", draft), ("accb", base)):
            outs[name].append(((lg.argmax(-1) == labels) & valid).numpy())
        for name, lg in (("al", draft), ("alb", base)):
            al = torch.minimum(torch.softmax(lg.float(), -1), p_t).sum(-1)
            outs[name].append((al * valid).numpy())
        outs["alc"].append((coupled_match_prob(torch.softmax(draft.float(), -1), p_t)
                            * valid).numpy())
        outs["val"].append(valid.numpy())
        if conf is not None:
            outs["conf"].append(conf.float().numpy())
    cat = {k: np.concatenate(v) if v else None for k, v in outs.items()}
    return SeqTrace(cat["acc"], cat["accb"], cat["al"], cat["alb"], cat["val"],
                    alpha_coupled=cat["alc"], conf_logits=cat["conf"],
                    remaining=(n - 1 - anchors).numpy())


def coupled_match_prob(q: torch.Tensor, p: torch.Tensor, top: int = 4) -> torch.Tensor:
    """``P(argmax log q + G == argmax log p + G)`` for shared Gumbel noise ``G`` (the seeded
    coupling of layers/coupling.py): ``Σ_v 1 / Σ_u max(p_u / p_v, q_u / q_v)``. Summed over the
    ``top`` likeliest tokens of ``p`` and of ``q`` only, so a lower bound (a token's term is at
    most ``min(p_v, q_v)``). ``q, p [..., V]`` -> ``[...]``."""
    cand = torch.cat([p.topk(top, -1).indices, q.topk(top, -1).indices], -1)  # [..., 2top]
    cand = torch.sort(cand, -1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[..., 1:] = cand[..., 1:] == cand[..., :-1]
    out = torch.zeros(p.shape[:-1], dtype=torch.float32)
    for j in range(cand.shape[-1]):
        v = cand[..., j : j + 1]
        pv, qv = p.gather(-1, v), q.gather(-1, v)  # [..., 1]
        denom = torch.maximum(p / pv.clamp(min=1e-30), q / qv.clamp(min=1e-30)).sum(-1)
        term = torch.where((pv.squeeze(-1) > 0) & (qv.squeeze(-1) > 0), 1.0 / denom,
                           torch.zeros_like(denom))
        out += torch.where(dup[..., j], torch.zeros_like(term), term)
    return out.float()


def leading_true(flags: np.ndarray) -> np.ndarray:
    """Number of leading True values per row: ``[A, g] -> [A]``."""
    return np.cumprod(flags.astype(bool), axis=1).sum(axis=1)


def greedy_walk(accepted_len: np.ndarray, remaining: np.ndarray, max_draft: int) -> tuple[int, int]:
    """Walk anchors from the first one; returns ``(tokens_emitted, steps)``."""
    tokens = steps = 0
    i = 0
    while i < accepted_len.shape[0]:
        a = int(min(accepted_len[i], max_draft, remaining[i] - 1))
        tokens += a + 1
        steps += 1
        i += a + 1
    return tokens, steps


@dataclass
class SimSummary:
    """Aggregates over many traces of one eval set."""

    gamma: int
    tokens: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    t1_sum: dict[str, float] = field(default_factory=dict)
    t1_n: int = 0
    coupled_sum: float = 0.0  # T=1 tau of the seeded (Gumbel-coupled) verification, DSPARK
    prefix_counts: np.ndarray | None = None  # [g + 1]: anchors with >= k accepted (valid)
    traces: list[SeqTrace] = field(default_factory=list)

    def add(self, tr: SeqTrace) -> None:
        g = self.gamma
        self.traces.append(tr)
        for name, acc, md in (("dspark", tr.accepted, g), ("dflash", tr.accepted_base, g),
                              ("mtp1", tr.accepted, 1)):
            t, s = greedy_walk(leading_true(acc), tr.remaining, md)
            self.tokens[name] = self.tokens.get(name, 0) + t
            self.steps[name] = self.steps.get(name, 0) + s
        for name, al, md in (("dspark", tr.alpha, g), ("dflash", tr.alpha_base, g),
                             ("mtp1", tr.alpha, 1)):
            tau = 1.0 + np.cumprod(al[:, :md], axis=1).sum(axis=1)
            self.t1_sum[name] = self.t1_sum.get(name, 0.0) + float(tau.sum())
        if tr.alpha_coupled is not None:
            self.coupled_sum += float((1.0 + np.cumprod(tr.alpha_coupled, axis=1).sum(1)).sum())
        self.t1_n += tr.alpha.shape[0]
        lead = leading_true(tr.accepted)
        counts = np.array([(lead >= k).sum() for k in range(g + 1)])
        self.prefix_counts = counts if self.prefix_counts is None else self.prefix_counts + counts

    def tau_greedy(self, name: str) -> float:
        return self.tokens.get(name, 0) / max(self.steps.get(name, 0), 1)

    def tau_greedy_capped(self, max_draft: int) -> float:
        """Greedy DSPARK ``tau`` with at most ``max_draft`` drafts verified per step (the
        drafter's first ``max_draft`` block positions: what capping the chain at serving time,
        ``--speculative-num-draft-tokens``, gives this drafter)."""
        tokens = steps = 0
        for tr in self.traces:
            t, s = greedy_walk(leading_true(tr.accepted), tr.remaining, max_draft)
            tokens, steps = tokens + t, steps + s
        return tokens / max(steps, 1)

    def tau_t1(self, name: str) -> float:
        return self.t1_sum.get(name, 0.0) / max(self.t1_n, 1)

    def tau_t1_coupled(self) -> float:
        """Expected T=1 tau of DSPARK when requests carry a seed (position-keyed coupling)."""
        return self.coupled_sum / max(self.t1_n, 1)

    def conditional_acceptance(self) -> list[float]:
        """``P(draft k ok | drafts < k ok)`` for ``k = 1..g`` (greedy, all anchors)."""
        c = self.prefix_counts if self.prefix_counts is not None else np.zeros(self.gamma + 1)
        return [float(c[k] / c[k - 1]) if c[k - 1] else float("nan")
                for k in range(1, self.gamma + 1)]
