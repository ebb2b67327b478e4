"""Greedy acceptance on hand-made cases; rejection sampling is lossless (statistical tests)."""

from __future__ import annotations

import math

import pytest
import torch

from dspark_sglang.layers.sampler import make_generator
from dspark_sglang.speculative.verify import (
    greedy_verify,
    greedy_verify_padded,
    greedy_verify_rows,
    rejection_verify,
    rejection_verify_padded,
)

torch.set_num_threads(1)

V = 4  # vocabulary of the synthetic language
N = 20000  # samples per statistical test


def _t(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    ("target", "draft", "expected"),
    [
        ([5, 6, 7, 8], [5, 6, 7], [5, 6, 7, 8]),  # all accepted + bonus
        ([9, 6, 7, 8], [5, 6, 7], [9]),  # first rejected -> correction only
        ([5, 6, 1, 8], [5, 6, 7], [5, 6, 1]),  # rejected in the middle
        ([3], [], [3]),  # no drafts: plain decode
        ([5, 2, 7], [5, 6], [5, 2]),  # later matches after a miss do not count
    ],
)
def test_greedy_verify_hand_made(target: list[int], draft: list[int], expected: list[int]) -> None:
    assert greedy_verify([_t(target)], [_t(draft)]) == [expected]


def test_greedy_verify_padded_matches_list_version() -> None:
    gen = torch.Generator().manual_seed(0)
    bs, width = 64, 5
    lens = torch.randint(0, width + 1, (bs,), generator=gen)
    target = torch.randint(0, 3, (bs, width + 1), generator=gen)
    draft = torch.where(
        torch.rand(bs, width, generator=gen) < 0.8,
        target[:, :width],
        torch.randint(0, 3, (bs, width), generator=gen),
    )
    res = greedy_verify_padded(target, draft, lens)
    ref = greedy_verify(
        [target[r, : lens[r] + 1] for r in range(bs)], [draft[r, : lens[r]] for r in range(bs)]
    )
    for r in range(bs):
        n = int(res.num_accepted[r])
        assert res.output_ids[r, : n + 1].tolist() == ref[r]
        assert (res.output_ids[r, n + 1 :] == -1).all()
    assert {int(n) for n in res.num_accepted} != {0}  # the case mix exercised acceptance
    # the list form the engine runs: every request's rows in one flat list of argmax ids
    flat, offsets, drafts = [], [], []
    for r in range(bs):
        n = int(lens[r])
        offsets.append(len(flat))
        flat += target[r, : n + 1].tolist()
        drafts.append(draft[r, :n].tolist())
    assert greedy_verify_rows(flat, drafts, offsets) == ref


# ------------------------------------------------------------------- synthetic language


def _tables(kind: str, depth: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Target P[d] and draft Q[d]: next-token distributions given d previous tokens,
    shape ``[V] * d + [V]``."""
    g = torch.Generator().manual_seed(seed)

    def rand_table(d: int, support: list[int] | None = None) -> torch.Tensor:
        logits = 1.5 * torch.randn([V] * d + [V], generator=g)
        if support is not None:
            mask = torch.full([V], float("-inf"))
            mask[support] = 0.0
            logits = logits + mask
        return torch.softmax(logits, -1)

    def one_hot_table(d: int) -> torch.Tensor:
        t = torch.randn([V] * d + [V], generator=g)
        return torch.nn.functional.one_hot(t.argmax(-1), V).float()

    if kind == "disjoint":
        target = [rand_table(d, [0, 1]) for d in range(depth + 1)]
        draft = [rand_table(d, [2, 3]) for d in range(depth + 1)]
    else:
        target = [rand_table(d) for d in range(depth + 1)]
        if kind == "equal":
            draft = [t.clone() for t in target]
        elif kind == "onehot":
            draft = [one_hot_table(d) for d in range(depth + 1)]
        elif kind == "random":
            draft = [rand_table(d) for d in range(depth + 1)]
        else:
            raise ValueError(kind)
    return target, draft


def _lookup(table: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` selected by each prefix: prefix ``[n, d]`` -> ``[n, V]``."""
    if prefix.shape[1] == 0:
        return table.expand(prefix.shape[0], V)
    return table[tuple(prefix.T)]


def _round(
    ctx: torch.Tensor, num_drafts: int, target: list[torch.Tensor], draft: list[torch.Tensor]
) -> torch.Tensor:
    """One draft + verify round for every row of ``ctx`` ``[n, c]``; returns output ids."""
    n, c = ctx.shape
    drafts = torch.zeros(n, num_drafts, dtype=torch.int64)
    q_rows, p_rows = [], []
    for k in range(num_drafts + 1):
        prefix = torch.cat([ctx, drafts[:, :k]], dim=1)
        p_rows.append(_lookup(target[c + k], prefix))
        if k < num_drafts:
            q = _lookup(draft[c + k], prefix)
            q_rows.append(q)
            drafts[:, k] = torch.multinomial(q, 1).squeeze(1)
    res = rejection_verify_padded(
        torch.stack(p_rows, 1),
        torch.stack(q_rows, 1) if q_rows else torch.zeros(n, 0, V),
        drafts,
        torch.full((n,), num_drafts, dtype=torch.int64),
        [None] * n,
    )
    return res.output_ids


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.719: alpha = 1e-4)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _assert_follows(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit of integer ``samples`` against flat ``probs``."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double().flatten() * samples.numel()
    assert (counts[expected == 0] == 0).all(), "sampled a token the target gives probability 0"
    nz = expected > 0
    stat = float((((counts - expected) ** 2)[nz] / expected[nz]).sum())
    df = int(nz.sum()) - 1
    if df > 0:
        assert stat < _chi2_critical(df), f"chi2={stat:.1f} over df={df}"


_KIND_SEEDS = {"random": 100, "disjoint": 200, "onehot": 300, "equal": 400}


@pytest.mark.parametrize("num_drafts", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "disjoint", "onehot", "equal"])
def test_rejection_sampling_is_lossless(kind: str, num_drafts: int) -> None:
    torch.manual_seed(1000 + num_drafts)
    target, draft = _tables(kind, num_drafts + 1, seed=_KIND_SEEDS[kind] + num_drafts)
    out = _round(torch.zeros(N, 0, dtype=torch.int64), num_drafts, target, draft)
    y1 = out[:, 0]
    _assert_follows(y1, target[0])

    # second token: from the same round when a draft was accepted, else from the next round
    y2 = out[:, 1].clone()
    need = y2 < 0
    if need.any():
        out2 = _round(y1[need].unsqueeze(1), num_drafts, target, draft)
        y2[need] = out2[:, 0]
    joint = target[0].unsqueeze(1) * target[1]  # [V, V]: P(y1) P(y2 | y1)
    _assert_follows(y1 * V + y2, joint)

    accepted = (out >= 0).sum(1) - 1
    if kind == "equal":
        assert (accepted == num_drafts).all()
    if kind == "disjoint":
        assert (accepted == 0).all()


def test_one_hot_target_reduces_to_greedy() -> None:
    gen = torch.Generator().manual_seed(4)
    bs, width = 32, 4
    tgt_ids = torch.randint(0, V, (bs, width + 1), generator=gen)
    target = torch.nn.functional.one_hot(tgt_ids, V).float()
    draft_probs = torch.softmax(torch.randn(bs, width, V, generator=gen), -1)
    drafts = torch.where(
        torch.rand(bs, width, generator=gen) < 0.7,
        tgt_ids[:, :width],
        torch.randint(0, V, (bs, width), generator=gen),
    )
    lens = torch.full((bs,), width, dtype=torch.int64)
    res = rejection_verify_padded(target, draft_probs, drafts, lens, [None] * bs)
    ref = greedy_verify_padded(tgt_ids, drafts, lens)
    assert torch.equal(res.output_ids, ref.output_ids)


def _random_case(seed: int) -> tuple[list[torch.Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    lens = [0, 1, 3, 2]
    tp = [torch.softmax(torch.randn(n + 1, 16, generator=g), -1) for n in lens]
    dp = [torch.softmax(torch.randn(n, 16, generator=g), -1) for n in lens]
    dt = [torch.multinomial(q, 1, generator=g).flatten() if len(q) else _t([]) for q in dp]
    return tp, dp, dt


def test_rejection_verify_seeded_is_deterministic() -> None:
    tp, dp, dt = _random_case(0)

    def run(seed: int) -> list[list[int]]:
        outs: list[list[int]] = []
        gens = [make_generator(seed + r) for r in range(4)]
        for _ in range(20):  # generators advance across rounds
            outs += rejection_verify(tp, dp, dt, gens)
        return outs

    a = run(10)
    torch.manual_seed(99)
    b = run(10)
    c = run(20)
    assert a == b
    assert a != c
    for res, drafts in zip(a, dt * 20):
        assert 1 <= len(res) <= len(drafts) + 1
        assert res[:-1] == drafts.tolist()[: len(res) - 1]


def test_list_and_padded_variants_agree() -> None:
    tp, dp, dt = _random_case(1)
    lists = rejection_verify(tp, dp, dt, [make_generator(r) for r in range(4)])
    width = max(len(d) for d in dt)
    tpp = torch.zeros(4, width + 1, 16)
    dpp = torch.zeros(4, width, 16)
    dtp = torch.zeros(4, width, dtype=torch.int64)
    for r in range(4):
        n = len(dt[r])
        tpp[r, : n + 1], dpp[r, :n], dtp[r, :n] = tp[r], dp[r], dt[r]
    lens = torch.tensor([len(d) for d in dt])
    res = rejection_verify_padded(tpp, dpp, dtp, lens, [make_generator(r) for r in range(4)])
    counts = (res.num_accepted + 1).tolist()
    assert [res.output_ids[r, : counts[r]].tolist() for r in range(4)] == lists
