"""Draft trees built from per-position draft distributions, and their verify attention mask.

A tree verify block is ``[anchor, node_0, ..., node_{n-1}]``. Node ``i`` carries a token, a
parent (``-1`` = the anchor) and a depth (``1`` for children of the anchor); its position in the
sequence is ``anchor_position + depth``. Node indices are assigned in admission order, and a parent
is always admitted before its children, so ``parents[i] < i``.

:func:`build_topk_tree` grows the tree EAGLE-style: each node's score is the cumulative draft
log-probability of its path; the best-scoring frontier node is admitted next, and admitting a node
at depth ``d`` offers its ``topk`` children from position ``d``'s distribution. Because log-probs
are ``<= 0`` a child never outscores its parent, so best-first order is also a valid tree order.
The per-position distributions do not depend on the parent's token (a parallel drafter's base
logits); a Markov-head drafter that wants parent-dependent children builds its own tree.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [n] int64
    parents: torch.Tensor  # [n] int64, -1 for children of the anchor, parents[i] < i
    depths: torch.Tensor  # [n] int64, >= 1
    scores: torch.Tensor  # [n] float32, cumulative draft log-prob of the path to the node

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])


def build_topk_tree(draft_log_probs: torch.Tensor, topk: int, max_nodes: int) -> DraftTree:
    """Best-first top-k tree over ``gamma`` positions.

    ``draft_log_probs``: ``[gamma, vocab]`` log-probabilities of draft positions ``1..gamma``.
    Returns at most ``max_nodes`` nodes with depth ``<= gamma``; siblings carry distinct tokens.
    Ties in score go to the node offered first. Tokens with log-prob ``-inf`` (e.g. masked by a
    grammar) are never added.
    """
    assert draft_log_probs.dim() == 2, "draft_log_probs must be [gamma, vocab]"
    assert topk >= 1 and max_nodes >= 0
    gamma, vocab = draft_log_probs.shape
    k = min(topk, vocab)
    top_vals, top_ids = torch.topk(draft_log_probs.float(), k, dim=-1)  # [gamma, k]
    vals, ids = top_vals.tolist(), top_ids.tolist()

    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    # heap entries: (-score, offer_order, depth, token, parent)
    heap: list[tuple[float, int, int, int, int]] = []
    offered = 0
    if gamma > 0:
        for v, t in zip(vals[0], ids[0]):
            if v == float("-inf"):
                continue
            heap.append((-v, offered, 1, t, -1))
            offered += 1
        heapq.heapify(heap)
    while heap and len(tokens) < max_nodes:
        neg, _, depth, tok, parent = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(tok)
        parents.append(parent)
        depths.append(depth)
        scores.append(-neg)
        if depth < gamma:
            for v, t in zip(vals[depth], ids[depth]):
                if v == float("-inf"):
                    continue
                heapq.heappush(heap, (neg - v, offered, depth + 1, t, node))
                offered += 1
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        parents=torch.tensor(parents, dtype=torch.int64),
        depths=torch.tensor(depths, dtype=torch.int64),
        scores=torch.tensor(scores, dtype=torch.float32),
    )


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    """Verify mask over ``[anchor, node_0..node_{n-1}]``: ``[n + 1, n + 1]`` bool (True = may
    attend).

    Row 0 (the anchor) sees only itself; row ``i + 1`` sees the anchor, its ancestors and itself.
    ``parents``: ``[n]`` int64 with ``-1`` for children of the anchor. Works for any node order
    (pointer jumping, ``depth`` vectorised steps).
    """
    n = int(parents.shape[0])
    device = parents.device
    # parent in block coordinates: node i is row i + 1, the anchor is row 0 and its own parent
    block_parent = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), parents + 1])
    mask = torch.eye(n + 1, dtype=torch.bool, device=device)
    rows = torch.arange(n + 1, device=device)
    cur = rows.clone()
    for _ in range(n + 1):
        cur = block_parent[cur]
        mask[rows, cur] = True
        if bool((cur == 0).all()):
            break
    else:
        raise ValueError("parents do not form a tree rooted at the anchor")
    return mask


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each node (``1`` for children of the anchor); needs ``parents[i] < i``."""
    depth: list[int] = []
    for p in parents:
        assert p < len(depth), "parents must precede their children"
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def tree_position_offsets(depths: torch.Tensor) -> torch.Tensor:
    """Position offsets of ``[anchor, nodes...]`` relative to the anchor: ``[n + 1]`` int64."""
    zero = torch.zeros(1, dtype=torch.int64, device=depths.device)
    return torch.cat([zero, depths.to(torch.int64)])
