"""Accepting draft tokens against the target: greedy matching and lossless rejection sampling.

Terms (as in vLLM's rejection sampler): a request proposes ``l`` draft tokens; the target verify
forward gives ``l + 1`` distributions (row 0 scores the anchor's successor = draft 1, ..., row
``l`` scores the token after the last draft). The first ``n`` drafts are *accepted*; then one more
token is emitted: the *recovered* token (sampled from the residual at the first rejection) or,
when all ``l`` drafts are accepted, the *bonus* token (sampled from row ``l``). Every result list
therefore has length ``num_accepted + 1``.

Randomness contract of :func:`rejection_verify`: request ``r`` draws ``l_r`` acceptance uniforms
(all of them, up front, in position order) and then one more uniform for the recovered / bonus
token, from its own generator (or the global RNG when it has none). The outcome is a deterministic
function of the inputs and the generators' states; the list and the padded variants agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from dspark_sglang.layers.sampler import draw_uniforms, sample_with_uniforms


class PaddedVerifyResult(NamedTuple):
    num_accepted: torch.Tensor  # [bs] int64, accepted drafts per request
    output_ids: torch.Tensor  # [bs, L + 1] int64, accepted drafts then recovered/bonus, -1 padded


def _to_lists(res: PaddedVerifyResult) -> list[list[int]]:
    counts = (res.num_accepted + 1).tolist()
    rows = res.output_ids.tolist()
    return [row[:c] for row, c in zip(rows, counts)]


def greedy_verify_padded(
    target_argmax: torch.Tensor, draft_tokens: torch.Tensor, draft_lens: torch.Tensor
) -> PaddedVerifyResult:
    """Greedy acceptance for a padded batch.

    ``target_argmax``: ``[bs, L + 1]`` int64 target argmax at each verify row;
    ``draft_tokens``: ``[bs, L]`` int64 (values past ``draft_lens[r]`` are ignored);
    ``draft_lens``: ``[bs]`` int64, ``0 <= l_r <= L``.
    Draft ``k`` is accepted while every draft up to it equals the target argmax of the row before
    it; the emitted token after the accepted run is ``target_argmax[r, num_accepted]``.
    """
    bs, width = draft_tokens.shape
    assert target_argmax.shape == (bs, width + 1), "target_argmax must be [bs, L + 1]"
    pos = torch.arange(width, device=draft_tokens.device).unsqueeze(0)  # [1, L]
    match = (draft_tokens == target_argmax[:, :width]) & (pos < draft_lens.unsqueeze(1))
    num_accepted = torch.cumprod(match.to(torch.int64), dim=1).sum(dim=1)  # [bs]
    out_pos = torch.arange(width + 1, device=draft_tokens.device).unsqueeze(0)  # [1, L + 1]
    output_ids = torch.where(
        out_pos <= num_accepted.unsqueeze(1), target_argmax, torch.full_like(target_argmax, -1)
    )
    return PaddedVerifyResult(num_accepted, output_ids)


def greedy_verify(
    target_argmax: Sequence[torch.Tensor], draft_tokens: Sequence[torch.Tensor]
) -> list[list[int]]:
    """Per-request greedy acceptance: ``target_argmax[r]`` is ``[l_r + 1]``, drafts ``[l_r]``.

    Returns, per request, the accepted drafts followed by the correction / bonus token.
    """
    out: list[list[int]] = []
    for tgt, drf in zip(target_argmax, draft_tokens):
        tgt_l, drf_l = tgt.tolist(), drf.tolist()
        assert len(tgt_l) == len(drf_l) + 1, "target rows must be one more than drafts"
        n = 0
        while n < len(drf_l) and drf_l[n] == tgt_l[n]:
            n += 1
        out.append(drf_l[:n] + [tgt_l[n]])
    return out


def rejection_verify_padded(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> PaddedVerifyResult:
    """Speculative rejection sampling for a padded batch (lossless for any draft distribution).

    ``target_probs``: ``[bs, L + 1, vocab]`` target sampling distributions (after temperature and
    filters) at each verify row; ``draft_probs``: ``[bs, L, vocab]`` the distributions the drafts
    were actually sampled from (one-hot for a greedy drafter); ``draft_tokens``: ``[bs, L]``;
    ``draft_lens``: ``[bs]``. Rows past ``draft_lens[r]`` are ignored.

    Draft ``x_k`` is accepted when ``u_k * q(x_k) < p(x_k)`` (probability ``min(1, p/q)``). At the
    first rejection the recovered token is drawn from ``norm(max(0, p - q))`` at that row, or from
    ``p`` when the residual is all zero (``p == q``). If all drafts are accepted the bonus token is
    drawn from ``p`` at row ``l_r``.
    """
    bs, width = draft_tokens.shape
    vocab = target_probs.shape[-1]
    assert target_probs.shape == (bs, width + 1, vocab), "target_probs must be [bs, L + 1, V]"
    assert draft_probs.shape == (bs, width, vocab), "draft_probs must be [bs, L, V]"
    assert len(generators) == bs
    device = target_probs.device
    counts = draft_lens + 1  # [bs] uniforms per request: l_r acceptance tests + 1 final draw
    flat_u = torch.cat(draw_uniforms(generators, counts.tolist(), device))  # [sum(counts)]
    starts = torch.cumsum(counts, dim=0) - counts  # [bs]
    pos = torch.arange(width, device=device).unsqueeze(0)  # [1, L]
    valid = pos < draft_lens.unsqueeze(1)  # [bs, L]
    u_idx = torch.where(valid, starts.unsqueeze(1) + pos, starts.unsqueeze(1))
    u_accept = flat_u[u_idx]  # [bs, L], padded rows are masked out below
    u_final = flat_u[starts + draft_lens]  # [bs]

    rows = torch.arange(bs, device=device)
    tokens = draft_tokens.clamp(min=0).unsqueeze(-1)  # [bs, L, 1]
    p_x = target_probs[:, :width].gather(-1, tokens).squeeze(-1).double()  # [bs, L]
    q_x = draft_probs.gather(-1, tokens).squeeze(-1).double()  # [bs, L]
    accept = (u_accept * q_x < p_x) & valid  # [bs, L]
    num_accepted = torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)  # [bs]

    p_n = target_probs[rows, num_accepted].double()  # [bs, vocab]
    rejected = num_accepted < draft_lens  # [bs]
    if width > 0:
        q_n = draft_probs[rows, num_accepted.clamp(max=width - 1)].double()  # [bs, vocab]
        q_n = q_n * rejected.unsqueeze(1)  # bonus rows sample from p itself
    else:
        q_n = torch.zeros_like(p_n)
    residual = (p_n - q_n).clamp(min=0.0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0.0  # [bs, 1]
    final_dist = torch.where(empty, p_n, residual)
    final_tok = sample_with_uniforms(final_dist, u_final)  # [bs]

    output_ids = torch.full((bs, width + 1), -1, dtype=torch.int64, device=device)
    keep = pos < num_accepted.unsqueeze(1)
    output_ids[:, :width] = torch.where(keep, draft_tokens, output_ids[:, :width])
    output_ids[rows, num_accepted] = final_tok
    return PaddedVerifyResult(num_accepted, output_ids)


def rejection_verify(
    target_probs: Sequence[torch.Tensor],
    draft_probs: Sequence[torch.Tensor],
    draft_tokens: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator | None],
) -> list[list[int]]:
    """Per-request rejection sampling: ``target_probs[r]`` ``[l_r + 1, V]``, ``draft_probs[r]``
    ``[l_r, V]``, ``draft_tokens[r]`` ``[l_r]``. Same rule and RNG contract as the padded variant.
    """
    bs = len(target_probs)
    if bs == 0:
        return []
    vocab = target_probs[0].shape[-1]
    device = target_probs[0].device
    width = max(int(d.shape[0]) for d in draft_tokens)
    tp = torch.zeros(bs, width + 1, vocab, dtype=torch.float32, device=device)
    dp = torch.zeros(bs, width, vocab, dtype=torch.float32, device=device)
    dt = torch.zeros(bs, width, dtype=torch.int64, device=device)
    lens = torch.zeros(bs, dtype=torch.int64, device=device)
    for r in range(bs):
        l_r = int(draft_tokens[r].shape[0])
        assert target_probs[r].shape[0] == l_r + 1 and draft_probs[r].shape[0] == l_r
        tp[r, : l_r + 1] = target_probs[r]
        dp[r, :l_r] = draft_probs[r]
        dt[r, :l_r] = draft_tokens[r]
        lens[r] = l_r
    return _to_lists(rejection_verify_padded(tp, dp, dt, lens, generators))


class TreeAcceptResult(NamedTuple):
    path: list[int]  # accepted node indices (into the tree's node arrays), root to leaf
    output_ids: list[int]  # tokens of the accepted nodes, then the correction / bonus token


def tree_greedy_verify(
    target_argmax: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor
) -> TreeAcceptResult:
    """Greedy acceptance on a draft tree.

    ``target_argmax``: ``[n + 1]`` target argmax at the verify rows
    ``[anchor, node_0..node_{n-1}]``;
    ``tokens``, ``parents``: ``[n]`` (``parents[i] == -1`` for children of the anchor). From the
    anchor, repeatedly step to the child whose token equals the target argmax at the current node
    (siblings carry distinct tokens, so at most one matches); stop when none does. The emitted
    token after the path is the target argmax at the last accepted node.
    """
    tgt = target_argmax.tolist()
    tok = tokens.tolist()
    par = parents.tolist()
    assert len(tgt) == len(tok) + 1 and len(par) == len(tok)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(par):
        children.setdefault(p, []).append(i)
    path: list[int] = []
    cur = -1
    while True:
        want = tgt[cur + 1]
        nxt = next((c for c in children.get(cur, []) if tok[c] == want), None)
        if nxt is None:
            break
        path.append(nxt)
        cur = nxt
    return TreeAcceptResult(path, [tok[i] for i in path] + [tgt[cur + 1]])
