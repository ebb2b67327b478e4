"""Accepting draft tokens against the target: the one verification library ``SpecDecoder`` calls.

Terms (as in vLLM's rejection sampler): a request proposes ``l`` draft tokens; the target verify
forward gives ``l + 1`` distributions (row 0 scores the anchor's successor = draft 1, ..., row
``l`` scores the token after the last draft). The first ``n`` drafts are *accepted*; then one more
token is emitted: the *recovered* token (sampled from the residual at the first rejection) or,
when all ``l`` drafts are accepted, the *bonus* token (sampled from row ``l``). Every result list
therefore has length ``num_accepted + 1``.

Which rule a request gets (``SpecDecoder._accept``):

- chain, greedy: :func:`greedy_verify_rows` (the batch's greedy chains over one list of argmax
  ids; :func:`greedy_verify_padded` is the same rule on padded tensors);
- chain, T > 0 with a ``seed``: :func:`coupled_verify` (accept while the draft equals the
  position-keyed Gumbel-max sample, ``layers/coupling.py``);
- chain, T > 0 without a seed: :func:`rejection_verify`;
- tree: :func:`tree_greedy_verify` (greedy) or :func:`tree_rejection_verify` (T > 0).

Randomness contract of :func:`rejection_verify`: request ``r`` draws ``l_r`` acceptance uniforms
(all of them, up front, in position order) and then one more uniform for the recovered / bonus
token, from its own generator (or the global RNG when it has none). The outcome is a deterministic
function of the inputs and the generators' states; the list and the padded variants agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from dspark_sglang.layers.coupling import coupled_sample
from dspark_sglang.layers.sampler import draw_uniforms, sample_with_uniforms


class PaddedVerifyResult(NamedTuple):
    num_accepted: torch.Tensor  # [bs] int64, accepted drafts per request
    output_ids: torch.Tensor  # [bs, L + 1] int64, accepted drafts then recovered/bonus, -1 padded


def padded_to_lists(res: PaddedVerifyResult) -> list[list[int]]:
    """Per request: the accepted drafts, then the recovered / bonus token."""
    counts = (res.num_accepted + 1).tolist()
    rows = res.output_ids.tolist()
    return [row[:c] for row, c in zip(rows, counts)]


def greedy_verify_rows(target_argmax: Sequence[int], drafts: Sequence[Sequence[int]],
                       offsets: Sequence[int]) -> list[list[int]]:
    """:func:`greedy_verify_padded`'s rule over plain lists: request ``r``'s verify rows start at
    ``offsets[r]`` of ``target_argmax`` (the argmax of every verify row of the batch, read once
    to the host). Per request: the accepted drafts, then the target's token after them. A few
    list comparisons per request, where the padded form builds and reduces tensors."""
    out = []
    for d, off in zip(drafts, offsets):
        n = 0
        for tok in d:
            if tok != target_argmax[off + n]:
                break
            n += 1
        out.append(list(d[:n]) + [target_argmax[off + n]])
    return out


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

    Returns, per request, the accepted drafts followed by the correction / bonus token (the rule
    of :func:`greedy_verify_padded`, which this pads for).
    """
    if not draft_tokens:
        return []
    for tgt, drf in zip(target_argmax, draft_tokens, strict=True):
        assert tgt.shape[0] == drf.shape[0] + 1, "target rows must be one more than drafts"
    lens = torch.tensor([int(d.shape[0]) for d in draft_tokens], dtype=torch.int64,
                        device=target_argmax[0].device)
    tgt = pad_sequence([t.to(torch.int64) for t in target_argmax], batch_first=True,
                       padding_value=-1)  # [bs, L + 1]
    drf = pad_sequence([d.to(torch.int64) for d in draft_tokens], batch_first=True,
                       padding_value=-1)  # [bs, L]
    return padded_to_lists(greedy_verify_padded(tgt, drf, lens))


def coupled_verify(
    target_probs: torch.Tensor, draft_tokens: Sequence[int], seed: int, first_position: int
) -> list[int]:
    """Seeded sampling: accept drafts while each equals the target's sample at its position.

    ``target_probs``: ``[l + 1, V]`` processed target distributions at the verify rows;
    ``draft_tokens``: ``l`` ids; row ``j`` decides output position ``first_position + j``. The
    sample there is :func:`coupled_sample` ``(target_probs[j], seed, first_position + j)`` -- the
    token plain decoding with this seed emits at that position -- so the result is the accepted
    drafts followed by the first sample that differs (or the bonus sample). Exactly lossless: each
    emitted token is that position's Gumbel-max sample of the target distribution.
    """
    assert target_probs.dim() == 2 and target_probs.shape[0] == len(draft_tokens) + 1, (
        "target_probs must be [l + 1, V]")
    out: list[int] = []
    for j in range(len(draft_tokens) + 1):
        tok = coupled_sample(target_probs[j], seed, first_position + j)
        out.append(tok)
        if j == len(draft_tokens) or draft_tokens[j] != tok:
            break
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
    return padded_to_lists(rejection_verify_padded(tp, dp, dt, lens, generators))


class TreeAcceptResult(NamedTuple):
    path: list[int]  # accepted node indices (into the tree's node arrays), root to leaf
    output_ids: list[int]  # tokens of the accepted nodes, then the correction / bonus token

    def verify_rows(self) -> list[int]:
        """Verify-block rows of the anchor and the accepted nodes (node ``i`` is row ``i + 1``)."""
        return [0] + [i + 1 for i in self.path]


def _as_list(x: torch.Tensor | Sequence[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


def _children(parents: list[int]) -> dict[int, list[int]]:
    """Children of each node (``-1`` = the anchor), in node order."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    return children


def tree_greedy_verify(
    target_argmax: torch.Tensor | Sequence[int], tokens: torch.Tensor | Sequence[int],
    parents: torch.Tensor | Sequence[int],
) -> TreeAcceptResult:
    """Greedy acceptance on a draft tree.

    ``target_argmax``: ``[n + 1]`` target argmax at the verify rows
    ``[anchor, node_0..node_{n-1}]``;
    ``tokens``, ``parents``: ``[n]`` (``parents[i] == -1`` for children of the anchor). From the
    anchor, repeatedly step to the child whose token equals the target argmax at the current node
    (the lowest-index one if several do); stop when none does. The emitted token after the path is
    the target argmax at the last accepted node. A chain (``parents[i] == i - 1``) gives
    :func:`greedy_verify`'s result.
    """
    tgt, tok, par = _as_list(target_argmax), _as_list(tokens), _as_list(parents)
    assert len(tgt) == len(tok) + 1 and len(par) == len(tok)
    children = _children(par)
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


def tree_rejection_verify(
    target_probs: torch.Tensor, tokens: torch.Tensor | Sequence[int],
    parents: torch.Tensor | Sequence[int], generator: torch.Generator | None,
) -> TreeAcceptResult:
    """Multi-draft rejection sampling on a tree of deterministic (one-hot) drafts.

    ``target_probs``: ``[n + 1, V]`` processed target distributions at the verify rows. From the
    anchor, the children of the current node are tried in node order: child token ``t`` is
    accepted with probability ``r(t)``, where ``r`` starts as the target distribution at the node
    and, after each rejected child, loses that child's token and is renormalised (sampling without
    replacement, SpecInfer-style). When every child is rejected the emitted token is drawn from
    what is left of ``r``. If a rejection leaves ``r`` with no mass (all of it was on the rejected
    token, up to rounding), that child is accepted. The emitted tokens follow the target
    distribution exactly.

    Randomness: one uniform per child tried, then one ``multinomial`` draw, from ``generator``
    (a CPU generator; the global RNG when None), in walk order.
    """
    tok, par = _as_list(tokens), _as_list(parents)
    assert target_probs.dim() == 2 and target_probs.shape[0] == len(tok) + 1 == len(par) + 1
    children = _children(par)
    path: list[int] = []
    node = -1
    while True:
        r = target_probs[node + 1].to("cpu", copy=True)  # [V]; the generators live on the CPU
        nxt = None
        for c in children.get(node, []):
            t = tok[c]
            u = torch.rand((), generator=generator)
            if float(u) < float(r[t]):
                nxt = c
                break
            r[t] = 0.0
            s = r.sum()
            if s <= 0:
                nxt = c
                break
            r = r / s
        if nxt is None:
            t = int(torch.multinomial(r, 1, generator=generator))
            return TreeAcceptResult(path, [tok[i] for i in path] + [t])
        path.append(nxt)
        node = nxt
