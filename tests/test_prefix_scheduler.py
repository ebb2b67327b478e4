"""Hardware-aware prefix scheduler and the SPS table it reads."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from dspark_sglang.speculative import prefix_scheduler
from dspark_sglang.speculative.prefix_scheduler import (
    PrefixScheduler,
    fixed_lengths,
    schedule_prefix,
)
from dspark_sglang.speculative.sps_profile import SPSTable, profile_sps


def _linear_time_table(t0: float, t1: float, max_b: int = 512) -> SPSTable:
    """Forward time ``t0 + t1 * B``: the usual shape (fixed cost + per-token cost)."""
    counts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    return SPSTable.from_measurements({b: 1.0 / (t0 + t1 * b) for b in counts if b <= max_b})


def _reference_scan(
    confs: list[list[float]], table: SPSTable, max_tokens: int | None = None
) -> tuple[list[int], float, int, float]:
    """Literal transcription of the documented rule: one candidate at a time."""
    bs = len(confs)
    cands = []
    for r, c in enumerate(confs):
        a = 1.0
        for j, x in enumerate(c):
            a *= min(max(x, 0.0), 1.0)
            cands.append((-a, j, r, a))
    cands.sort()
    lengths = [0] * bs
    tau, b = float(bs), bs
    for _, j, r, a in cands:
        if lengths[r] != j or (max_tokens is not None and b + 1 > max_tokens):
            break
        if (tau + a) * table.sps(b + 1) > tau * table.sps(b):
            lengths[r] += 1
            tau += a
            b += 1
        else:
            break
    return lengths, tau, b, tau * table.sps(b)


def test_flat_sps_admits_everything_up_to_max() -> None:
    confs = [[0.9, 0.5, 0.1], [0.2, 0.9], [0.99] * 6]
    dec = schedule_prefix(confs, SPSTable.flat(50.0))
    assert dec.lengths == [3, 2, 6]
    assert dec.num_verify_tokens == 3 + 11
    capped = schedule_prefix(confs, SPSTable.flat(50.0), max_lengths=[1, 5, 4])
    assert capped.lengths == [1, 2, 4]


def test_steep_sps_drop_gives_shorter_lengths() -> None:
    confs = [[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]] * 2
    flat = schedule_prefix(confs, SPSTable.flat())
    # verifying more than 4 tokens in total costs 3x
    steep = SPSTable.from_measurements({1: 100.0, 4: 100.0, 5: 33.0, 64: 30.0})
    dec = schedule_prefix(confs, steep)
    assert flat.lengths == [6, 6]
    assert sum(dec.lengths) + 2 <= 4
    assert all(s < f for s, f in zip(dec.lengths, flat.lengths))


def test_more_load_gives_shorter_or_equal_lengths() -> None:
    table = _linear_time_table(t0=0.02, t1=0.0005)
    row = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4]
    means, maxes = [], []
    for bs in [1, 4, 16, 64, 256]:
        dec = schedule_prefix([row] * bs, table)
        # identical requests: ties go to lower r, so lengths differ by at most one
        assert max(dec.lengths) - min(dec.lengths) <= 1
        means.append(sum(dec.lengths) / bs)
        maxes.append(max(dec.lengths))
    assert all(b <= a for a, b in itertools.pairwise(means))
    assert all(b <= a for a, b in itertools.pairwise(maxes))
    assert maxes[0] > maxes[-1]  # load actually changed the decision


def test_higher_confidence_gives_longer_lengths() -> None:
    table = _linear_time_table(t0=0.02, t1=0.002)
    low = schedule_prefix([[0.5] * 8] * 8, table)
    high = schedule_prefix([[0.9] * 8] * 8, table)
    assert min(high.lengths) >= max(low.lengths)
    assert sum(high.lengths) > sum(low.lengths)
    # inside one batch the confident request gets more
    mixed = schedule_prefix([[0.5] * 8, [0.95] * 8], table)
    assert mixed.lengths[1] > mixed.lengths[0]


def test_stop_rule_is_non_anticipating() -> None:
    # going from 1 to 2 tokens costs 40 %, then more tokens are free
    table = SPSTable.from_measurements({1: 100.0, 2: 60.0, 3: 60.0, 4: 60.0})
    confs = [[0.6, 1.0, 1.0]]
    dec = schedule_prefix(confs, table)
    assert dec.lengths == [0]  # (1 + 0.6) * 60 = 96 < 1 * 100: stop at the first candidate
    assert dec.objective == pytest.approx(100.0)
    # ... although admitting all three would have been better: 2.8 * 60 = 168
    later = fixed_lengths([3], confidences=confs, sps_table=table)
    assert later.objective == pytest.approx(168.0)
    assert later.objective > dec.objective


def test_ties_prefer_lower_request_then_lower_position() -> None:
    table = SPSTable.from_measurements({2: 100.0, 3: 90.0, 4: 74.0})
    dec = schedule_prefix([[0.5], [0.5]], table)  # 2.5*90=225 > 200, 3*74=222 < 225
    assert dec.lengths == [1, 0]
    assert dec.expected_tau == pytest.approx(2.5)
    assert dec.num_verify_tokens == 3


def test_prefix_constraint_with_zero_confidence() -> None:
    dec = schedule_prefix([[1.0, 0.0, 1.0, 1.0]], SPSTable.flat())
    assert dec.lengths == [1]  # a = 1, 0, 0, 0: zero-survival tokens add nothing


def test_verify_token_budget() -> None:
    dec = schedule_prefix([[0.9] * 8] * 4, SPSTable.flat(), max_num_verify_tokens=10)
    assert dec.num_verify_tokens == 10
    assert sum(dec.lengths) == 6
    assert max(dec.lengths) - min(dec.lengths) <= 1
    tiny = schedule_prefix([[0.9] * 8] * 4, SPSTable.flat(), max_num_verify_tokens=2)
    assert tiny.lengths == [0, 0, 0, 0] and tiny.num_verify_tokens == 4


def test_matches_reference_scan_on_random_inputs() -> None:
    rng = random.Random(0)
    tables = [
        _linear_time_table(0.02, 0.0005),
        _linear_time_table(0.01, 0.003),
        SPSTable.from_measurements({1: 50.0, 8: 48.0, 9: 20.0, 64: 18.0}),
    ]
    for trial in range(60):
        bs = rng.randint(1, 40)
        confs = [[rng.random() ** 0.3 for _ in range(rng.randint(0, 10))] for _ in range(bs)]
        table = tables[trial % 3]
        budget = rng.choice([None, bs + rng.randint(0, 50)])
        dec = schedule_prefix(confs, table, max_num_verify_tokens=budget)
        lengths, tau, b, obj = _reference_scan(confs, table, budget)
        assert dec.lengths == lengths
        assert dec.num_verify_tokens == b == bs + sum(lengths)
        assert dec.expected_tau == pytest.approx(tau)
        assert dec.objective == pytest.approx(obj)


def test_small_scan_and_array_form_decide_identically() -> None:
    """Few candidates run as a Python scan, many as numpy: the same decision, bit for bit
    (lengths, expected tau, B, objective), for lists and tensors, NaN / inf / ties / budgets."""
    rng = random.Random(1)
    tables = [_linear_time_table(0.02, 0.0005), _linear_time_table(0.003, 0.002),
              SPSTable.from_measurements({1: 50.0, 8: 48.0, 9: 20.0, 64: 18.0}), SPSTable.flat()]
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, 1.0, 0.5, 1.5, -0.2]
    scans = 0
    for trial in range(300):
        bs, width = rng.randint(1, 36), rng.randint(0, 8)
        conf = torch.tensor([[rng.choice(specials) if rng.random() < 0.15 else rng.random() ** 0.3
                              for _ in range(width)] for _ in range(bs)], dtype=torch.float32)
        conf = conf.reshape(bs, width)
        limits = [rng.randint(-1, width) for _ in range(bs)] if trial % 2 else None
        budget = rng.choice([None, bs + rng.randint(0, 40)])
        table = tables[trial % len(tables)]
        ref = prefix_scheduler._schedule_numpy(
            *prefix_scheduler._pad_confidences(conf, limits), table, budget)
        scans += prefix_scheduler._small_rows(conf, limits) is not None
        for inp in (conf, conf.tolist(), conf.numpy()):
            dec = schedule_prefix(inp, table, limits, budget)
            assert dec.lengths == ref.lengths
            assert dec.num_verify_tokens == ref.num_verify_tokens
            assert dec.expected_tau == ref.expected_tau and dec.objective == ref.objective
    assert 100 < scans < 300  # both forms were exercised


def test_tensor_input_and_scheduler_class() -> None:
    table = _linear_time_table(0.02, 0.001)
    conf = torch.tensor([[0.9, 0.8, 0.3], [0.5, 0.5, 0.5]])
    a = schedule_prefix(conf, table, max_lengths=[2, 3])
    b = PrefixScheduler(table).schedule(conf.tolist(), max_lengths=[2, 3])
    assert a == b
    assert a.lengths[0] <= 2
    assert schedule_prefix([], table).lengths == []


def test_fixed_lengths() -> None:
    dec = fixed_lengths([3, 0, 5], max_lengths=[2, 4, 9])
    assert dec.lengths == [2, 0, 5]
    assert dec.num_verify_tokens == 10
    assert math.isnan(dec.expected_tau) and math.isnan(dec.objective)
    conf = [[0.5, 0.5, 0.5], [], [1.0] * 5]
    dec2 = fixed_lengths([3, 0, 5], max_lengths=[2, 4, 9], confidences=conf)
    assert dec2.expected_tau == pytest.approx(3 + 0.5 + 0.25 + 5)


# ----------------------------------------------------------------------------- SPS table


def test_sps_table_interpolation_monotone_and_tail() -> None:
    t = SPSTable.from_measurements({8: 80.0, 1: 100.0, 4: 101.0, 16: 40.0})
    assert t.token_counts == [1, 4, 8, 16]
    # 101 is clipped: a bigger batch is never faster
    assert t.sps_values == [100.0, 100.0, 80.0, 40.0]
    assert t.sps(6) == pytest.approx(90.0)
    assert t.sps(1) == 100.0
    assert t.sps(32) == pytest.approx(20.0)  # constant tokens/s past the profile
    vals = t.sps_many(np.arange(1, 64))
    assert (np.diff(vals) <= 0).all()
    assert SPSTable.flat(5.0).sps(1000) == 5.0


def test_sps_table_json_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = SPSTable.from_measurements({1: 10.0, 2: 9.0}, meta={"device": "cpu"})
    path = tmp_path / "sps.json"
    t.save(path)
    u = SPSTable.load(path)
    assert (u.token_counts, u.sps_values) == (t.token_counts, t.sps_values)
    assert u.meta["device"] == "cpu"
    with pytest.raises(ValueError):
        SPSTable([1, 1], [2.0, 3.0])
    with pytest.raises(ValueError):
        SPSTable([1], [0.0])


def test_profile_sps_uses_median_time() -> None:
    calls: list[int] = []
    now = [0.0]

    def step(b: int) -> None:
        calls.append(b)
        now[0] += 0.01 * b + (1.0 if len(calls) == 6 else 0.0)  # one outlier (timed) call

    table = profile_sps(step, [4, 1, 4], repeats=3, warmup=1, clock=lambda: now[0],
                        prime_s=0.03)
    # warm-up, then rounds over the counts, each timed call right after untimed ones of its
    # count for prime_s (at least one): three of 10 ms, one of 40 ms
    assert calls == [1, 4] + [1, 1, 1, 1, 4, 4] * 3
    assert table.token_counts == [1, 4]
    assert table.sps_values == pytest.approx([100.0, 25.0])


def test_profile_sps_survives_a_burst_of_load() -> None:
    """Two consecutive slow calls (another process running) anywhere in the profile: the
    rounds put them on different counts, so every count's median stays exact."""
    def profile_with_burst(start: int) -> SPSTable:
        calls: list[int] = []
        now = [0.0]

        def step(b: int) -> None:
            calls.append(b)
            now[0] += 0.01 * b + (1.0 if start <= len(calls) - 1 < start + 2 else 0.0)

        return profile_sps(step, [1, 4], repeats=3, warmup=2, clock=lambda: now[0])

    for start in range(10):
        assert profile_with_burst(start).sps_values == pytest.approx([100.0, 25.0]), start


def test_profile_sps_measures_small_counts_settled_after_large_ones() -> None:
    """After a large count a small one runs slow for a few calls (caches, clocks: session
    13's Xeon priced 1 token at 2x this way); the timed call comes after priming calls, so the
    table holds the steady time."""
    now = [0.0]
    big_end = [-1.0]

    def step(b: int) -> None:
        slow = b < 64 and now[0] - big_end[0] < 0.03  # for 30 ms after a large count
        now[0] += 0.01 * b * (2.0 if slow else 1.0)
        if b >= 64:
            big_end[0] = now[0]

    table = profile_sps(step, [1, 2, 64], repeats=3, warmup=1, clock=lambda: now[0])
    assert table.sps_values == pytest.approx([100.0, 50.0, 100.0 / 64])
