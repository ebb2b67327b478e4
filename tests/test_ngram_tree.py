"""Prompt-lookup proposals, top-k draft trees, their verify mask and greedy tree acceptance."""

from __future__ import annotations

import random

import pytest
import torch

from dspark_sglang.speculative.ngram import NgramProposer
from dspark_sglang.speculative.tree import (
    build_topk_tree,
    tree_attention_mask,
    tree_position_offsets,
)
from dspark_sglang.speculative.verify import greedy_verify, tree_greedy_verify

# ----------------------------------------------------------------------------- n-gram


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([1, 2, 3, 4, 5, 1, 2, 3], [4, 5, 1]),  # repeated phrase continues
        ([5, 6, 7, 0, 6, 3, 5, 6], [7, 0, 6]),  # longest suffix wins over a later 1-gram
        ([1, 2, 10, 1, 2, 20, 1, 2], [20, 1, 2]),  # most recent occurrence wins
        ([4, 4, 4], [4]),  # continuation may be short near the end
        ([1, 2, 3, 4], []),  # nothing repeats
        ([7], []),
        ([], []),
    ],
)
def test_ngram_hand_made(tokens: list[int], expected: list[int]) -> None:
    assert NgramProposer(max_ngram=4, min_ngram=1, num_draft_tokens=3).propose(tokens) == expected


def test_ngram_min_and_max_ngram() -> None:
    tokens = [9, 1, 5, 8, 2, 1]
    assert NgramProposer(4, 1, 2).propose(tokens) == [5, 8]
    assert NgramProposer(4, 2, 2).propose(tokens) == []  # only a 1-gram matches
    seq = [1, 2, 3, 7, 0, 2, 3, 8, 1, 2, 3]
    assert NgramProposer(3, 1, 1).propose(seq) == [7]  # the 3-gram [1, 2, 3]
    assert NgramProposer(2, 1, 1).propose(seq) == [8]  # the 2-gram [2, 3], most recent
    assert NgramProposer(2, 1, 4).propose(seq, num_draft_tokens=2) == [8, 1]


def _brute_force(tokens: list[int], max_n: int, min_n: int, k: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) < n + 1:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randint(0, 4) for _ in range(rng.randint(0, 40))]
        max_n, min_n, k = rng.randint(1, 5), 1, rng.randint(1, 6)
        min_n = rng.randint(1, max_n)
        got = NgramProposer(max_n, min_n, k).propose(tokens)
        assert got == _brute_force(tokens, max_n, min_n, k), (tokens, max_n, min_n, k)


def test_ngram_long_repetitive_context() -> None:
    rng = random.Random(1)
    phrase = [rng.randint(100, 50000) for _ in range(50)]
    context = [rng.randint(100, 50000) for _ in range(8000)] + phrase + [7, 7] + phrase[:20]
    assert NgramProposer(4, 1, 5).propose(context) == phrase[20:25]


# ----------------------------------------------------------------------------- tree


def _hand_tree_log_probs() -> torch.Tensor:
    probs = torch.tensor([[0.6, 0.3, 0.05, 0.03, 0.02], [0.1, 0.7, 0.15, 0.03, 0.02]])
    return probs.log()


def test_build_topk_tree_best_first() -> None:
    tree = build_topk_tree(_hand_tree_log_probs(), topk=2, max_nodes=5)
    # scores: 0.6, 0.6*0.7=0.42, 0.3, 0.3*0.7=0.21, 0.6*0.15=0.09
    assert tree.tokens.tolist() == [0, 1, 1, 1, 2]
    assert tree.parents.tolist() == [-1, 0, -1, 2, 0]
    assert tree.depths.tolist() == [1, 2, 1, 2, 2]
    assert torch.allclose(tree.scores.exp(), torch.tensor([0.6, 0.42, 0.3, 0.21, 0.09]))
    assert tree_position_offsets(tree.depths).tolist() == [0, 1, 2, 1, 2, 2]


def test_build_topk_tree_limits_and_masked_tokens() -> None:
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(4, 30), -1)
    lp[1, :] = float("-inf")
    lp[1, 3] = 0.0  # position 2 has a single allowed token (e.g. a grammar)
    tree = build_topk_tree(lp, topk=3, max_nodes=40)
    assert tree.num_nodes <= 40
    assert set(tree.tokens[tree.depths == 2].tolist()) == {3}
    assert int(tree.depths.max()) <= 4
    for i, p in enumerate(tree.parents.tolist()):
        assert p < i
        if p >= 0:
            assert tree.depths[i] == tree.depths[p] + 1
            assert tree.scores[i] <= tree.scores[p]
    sib: dict[int, list[int]] = {}
    for tok, p in zip(tree.tokens.tolist(), tree.parents.tolist()):
        sib.setdefault(p, []).append(tok)
    assert all(len(v) == len(set(v)) for v in sib.values())
    assert build_topk_tree(lp, topk=3, max_nodes=0).num_nodes == 0
    chain = build_topk_tree(lp, topk=1, max_nodes=100)
    assert chain.parents.tolist() == [-1, 0, 1, 2]


def test_tree_attention_mask_hand_made() -> None:
    mask = tree_attention_mask(torch.tensor([-1, 0, -1, 2, 0]))
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ]
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == expected


def test_tree_attention_mask_any_order_and_chain_is_causal() -> None:
    rng = random.Random(2)
    for _ in range(20):
        n = rng.randint(1, 25)
        perm = list(range(n))
        rng.shuffle(perm)  # node perm[i] is the i-th created
        parents = [-1] * n
        for i in range(1, n):
            parents[perm[i]] = rng.choice([-1] + perm[:i])
        mask = tree_attention_mask(torch.tensor(parents))
        for i in range(n):
            want = {0, i + 1}
            p = parents[i]
            while p >= 0:
                want.add(p + 1)
                p = parents[p]
            assert set(torch.nonzero(mask[i + 1]).flatten().tolist()) == want
    chain = tree_attention_mask(torch.tensor([-1, 0, 1, 2]))
    assert torch.equal(chain, torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    with pytest.raises(ValueError):
        tree_attention_mask(torch.tensor([1, 0]))  # a cycle


@pytest.mark.parametrize(
    ("target", "path", "output"),
    [
        ([1, 9, 9, 1, 7, 9], [2, 3], [1, 1, 7]),  # into the second branch, to a leaf + bonus
        ([0, 2, 9, 9, 9, 3], [0, 4], [0, 2, 3]),  # first branch, second child
        ([0, 1, 5, 9, 9, 9], [0, 1], [0, 1, 5]),
        ([4, 9, 9, 9, 9, 9], [], [4]),  # no child matches: correction only
    ],
)
def test_tree_greedy_verify(target: list[int], path: list[int], output: list[int]) -> None:
    tree = build_topk_tree(_hand_tree_log_probs(), topk=2, max_nodes=5)
    res = tree_greedy_verify(torch.tensor(target), tree.tokens, tree.parents)
    assert res.path == path
    assert res.output_ids == output
    # accepted nodes form a root-to-node chain
    for a, b in zip([-1] + res.path, res.path):
        assert tree.parents[b] == a


def test_tree_greedy_verify_on_chain_equals_chain_verify() -> None:
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(0, 6)
        drafts = [rng.randint(0, 2) for _ in range(n)]
        target = [rng.randint(0, 2) for _ in range(n + 1)]
        res = tree_greedy_verify(
            torch.tensor(target, dtype=torch.int64),
            torch.tensor(drafts, dtype=torch.int64),
            torch.arange(n, dtype=torch.int64) - 1,
        )
        ref = greedy_verify([torch.tensor(target)], [torch.tensor(drafts, dtype=torch.int64)])[0]
        assert res.output_ids == ref
        assert res.path == list(range(len(ref) - 1))
