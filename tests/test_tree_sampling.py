"""Multi-draft (tree) rejection sampling keeps the target distribution (T > 0)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dspark_sglang.speculative.spec_decoder import SpecDecoder
from dspark_sglang.speculative.worker import Draft


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
    d = Draft(tokens=[1, 4, 5, 2], parents=[-1, -1, -1, 0])
    probs = torch.stack([p0, p_child, p_child, p_child, p_child])  # rows: anchor + 4 nodes
    dec = SpecDecoder.__new__(SpecDecoder)
    n = 20000
    gen = torch.Generator().manual_seed(0)
    req = SimpleNamespace(generator=gen, sampling_params=SimpleNamespace(is_greedy=False))
    first = torch.zeros(v)
    second_after_1 = torch.zeros(v)
    n1 = 0
    for _ in range(n):
        toks, rows = dec._accept_tree(req, d, torch.zeros(5, dtype=torch.long), probs)
        first[toks[0]] += 1
        if toks[0] == 1:
            n1 += 1
            second_after_1[toks[1]] += 1
        assert rows[0] == 0 and len(rows) == len(toks)
    assert _chi2_ok(first, p0, n)
    assert _chi2_ok(second_after_1, p_child, n1)


def test_tree_greedy_follows_argmax_path():
    d = Draft(tokens=[3, 7, 9, 1], parents=[-1, -1, 1, 2])
    dec = SpecDecoder.__new__(SpecDecoder)
    req = SimpleNamespace(generator=None, sampling_params=SimpleNamespace(is_greedy=True))
    # target argmax per row: anchor->7, node0(3)->x, node1(7)->9, node2(9)->1, node3(1)->5
    greedy = torch.tensor([7, 0, 9, 1, 5])
    toks, rows = dec._accept_tree(req, d, greedy, None)
    assert toks == [7, 9, 1, 5] and rows == [0, 2, 3, 4]
