"""Multi-draft (tree) rejection sampling keeps the target distribution (T > 0).

These call ``speculative/verify.py``, the functions ``SpecDecoder`` runs for tree drafts.
"""

from __future__ import annotations

import torch

from dspark_sglang.speculative.verify import tree_greedy_verify, tree_rejection_verify


def _chi2_ok(counts: torch.Tensor, p: torch.Tensor, n: int) -> bool:
    exp = p * n
    keep = exp > 5
    stat = (((counts[keep] - exp[keep]) ** 2) / exp[keep]).sum().item()
    dof = int(keep.sum()) - 1
    return stat < dof + 6 * (2 * dof) ** 0.5  # ~5 sigma


def test_tree_first_token_follows_target():
    v = 6
    p0 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])  # target at the anchor row
    p_child = torch.full((v,), 1.0 / v)
    # root children: tokens 1, 4, 5 ; a grandchild under token 1
    tokens, parents = [1, 4, 5, 2], [-1, -1, -1, 0]
    probs = torch.stack([p0, p_child, p_child, p_child, p_child])  # rows: anchor + 4 nodes
    n = 20000
    gen = torch.Generator().manual_seed(0)
    first = torch.zeros(v)
    second_after_1 = torch.zeros(v)
    n1 = 0
    for _ in range(n):
        res = tree_rejection_verify(probs, tokens, parents, gen)
        toks, rows = res.output_ids, res.verify_rows()
        first[toks[0]] += 1
        if toks[0] == 1:
            n1 += 1
            second_after_1[toks[1]] += 1
        assert rows[0] == 0 and len(rows) == len(toks)
    assert _chi2_ok(first, p0, n)
    assert _chi2_ok(second_after_1, p_child, n1)


def test_tree_rejection_empty_residual_accepts_the_child():
    # all of the (unnormalised, as after rounding) mass is on the child's token: a rejection
    # would leave nothing to sample from, so the child is accepted whatever the uniform
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    for seed in range(20):
        res = tree_rejection_verify(probs, [2], [-1], torch.Generator().manual_seed(seed))
        assert res.path == [0] and res.output_ids[0] == 2 and len(res.output_ids) == 2


def test_tree_greedy_follows_argmax_path():
    tokens, parents = [3, 7, 9, 1], [-1, -1, 1, 2]
    # target argmax per row: anchor->7, node0(3)->x, node1(7)->9, node2(9)->1, node3(1)->5
    greedy = torch.tensor([7, 0, 9, 1, 5])
    res = tree_greedy_verify(greedy, tokens, parents)
    assert res.output_ids == [7, 9, 1, 5] and res.verify_rows() == [0, 2, 3, 4]
