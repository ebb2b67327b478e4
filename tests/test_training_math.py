"""DSpark loss terms, a tiny training run, STS calibration and calibration metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dspark_sglang.speculative.dspark import DSparkConfig, DSparkDrafter, StsCalibration
from dspark_sglang.training.calibration import (
    apply_sts,
    expected_calibration_error,
    fit_sts,
    fit_sts_calibration,
    roc_auc,
    survival,
)
from dspark_sglang.training.losses import dspark_loss

torch.set_num_threads(1)


def test_loss_terms_match_hand_computation() -> None:
    p_d = torch.tensor([0.5, 0.3, 0.2])
    p_t = torch.tensor([0.2, 0.3, 0.5])
    draft = torch.log(p_d).expand(1, 2, 3).clone()
    target = torch.log(p_t).expand(1, 2, 3).clone()
    conf = torch.zeros(1, 2)  # sigmoid(0) = 0.5
    valid = torch.ones(1, 2, dtype=torch.bool)
    ids = torch.tensor([[0, 2]])
    total, parts = dspark_loss(draft, target, conf, valid, gamma=4.0, target_ids=ids)
    w = [1.0, math.exp(-1 / 4)]
    den = sum(w) + 1e-6
    ce = (w[0] * -math.log(0.5) + w[1] * -math.log(0.2)) / den
    l1 = 0.6 * sum(w) / den  # |0.3| + 0 + |0.3|
    bce = math.log(2.0) * sum(w) / den  # target a = 0.7, prediction 0.5: -(0.7+0.3) log 0.5
    torch.testing.assert_close(parts["ce"], torch.tensor(ce, dtype=torch.float32))
    torch.testing.assert_close(parts["l1"], torch.tensor(l1, dtype=torch.float32))
    torch.testing.assert_close(parts["tv"], torch.tensor(0.5 * l1, dtype=torch.float32))
    torch.testing.assert_close(parts["conf"], torch.tensor(bce, dtype=torch.float32))
    torch.testing.assert_close(parts["accept_rate"], torch.tensor(0.7))
    torch.testing.assert_close(parts["expected_tau"], torch.tensor(1 + 0.7 + 0.49))
    torch.testing.assert_close(total, torch.tensor(0.1 * ce + 0.9 * l1 + bce,
                                                   dtype=torch.float32))


def test_bce_targets_acceptance_and_probs_input() -> None:
    p_d = torch.tensor([[[0.9, 0.1]]])
    p_t = torch.tensor([[[0.6, 0.4]]])
    a = 0.7  # sum min(p_d, p_t)
    z = torch.tensor([[math.log(a / (1 - a))]], requires_grad=True)  # the optimum
    _, parts = dspark_loss(torch.log(p_d), p_t, z, torch.ones(1, 1, dtype=torch.bool),
                           target_is_probs=True)
    parts["conf"].backward()
    assert z.grad is not None and abs(float(z.grad)) < 1e-5
    # CE defaults to the target's argmax token (index 0)
    torch.testing.assert_close(parts["ce"], torch.tensor(-math.log(0.9)), atol=1e-5, rtol=0)


def test_invalid_positions_do_not_contribute() -> None:
    torch.manual_seed(0)
    draft, target = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    conf = torch.randn(2, 3)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    total, _ = dspark_loss(draft, target, conf, valid)
    draft2, target2, conf2 = draft.clone(), target.clone(), conf.clone()
    draft2[~valid] = 100 * torch.randn(int((~valid).sum()), 5)
    target2[~valid] = 100 * torch.randn(int((~valid).sum()), 5)
    conf2[~valid] = 50.0
    total2, _ = dspark_loss(draft2, target2, conf2, valid)
    torch.testing.assert_close(total, total2)


def test_tiny_drafter_training_lowers_loss() -> None:
    torch.manual_seed(0)
    v, h, gamma, n, ctx_len = 100, 32, 4, 8, 6
    cfg = DSparkConfig(vocab_size=v, hidden_size=h, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       block_size=gamma, target_layer_ids=(0, 1), mask_token_id=v - 1,
                       markov_rank=8, enable_confidence_head=True,
                       confidence_head_with_markov=True, rope_theta=10000.0)
    emb = torch.nn.Embedding(v, h).requires_grad_(False)
    head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    drafter = DSparkDrafter(cfg, emb, head)
    ctx_hidden = torch.randn(n, ctx_len, cfg.ctx_input_size)
    target_logits = 3.0 * torch.randn(n, gamma, v)  # the fixed random "target"
    target_ids = target_logits.argmax(-1)
    anchors = torch.randint(0, v - 1, (n,))
    prev = torch.cat([anchors.unsqueeze(1), target_ids[:, :-1]], dim=1)
    positions = torch.arange(ctx_len)
    valid_ctx = torch.ones(n, ctx_len, dtype=torch.bool)
    valid = torch.ones(n, gamma, dtype=torch.bool)
    opt = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    assert all(p is not emb.weight for p in drafter.parameters())

    def step() -> torch.Tensor:
        h_ctx = drafter.project_context(ctx_hidden.reshape(n * ctx_len, -1))
        kv = drafter.context_kv(h_ctx, positions.repeat(n))
        ctx_k = [k.view(n, ctx_len, *k.shape[1:]) for k, _ in kv]
        ctx_v = [v_.view(n, ctx_len, *v_.shape[1:]) for _, v_ in kv]
        hidden = drafter.forward_block(anchors, torch.full((n,), ctx_len), ctx_k, ctx_v,
                                       valid_ctx)
        draft_logits, conf_logits = drafter.train_heads(hidden, prev)
        loss, _ = dspark_loss(draft_logits, target_logits, conf_logits, valid, gamma=4.0,
                              target_ids=target_ids)
        return loss

    with torch.no_grad():
        first = float(step())
    for _ in range(30):
        opt.zero_grad()
        loss = step()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(step())
    assert last < 0.8 * first, (first, last)
    assert emb.weight.grad is None and head.weight.grad is None


def _overconfident_data(n: int = 4000, k: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(0.3, 0.95, size=(n, k))
    accepted = rng.uniform(size=(n, k)) < p_true
    logits = 3.0 * np.log(p_true / (1 - p_true)) + 1.0  # overconfident head
    return logits, accepted


def test_sts_lowers_ece_of_survival() -> None:
    logits, accepted = _overconfident_data()
    cal = fit_sts_calibration(logits, accepted)
    temps = np.asarray(cal.temperatures)
    assert temps.shape == (5,) and np.all(temps > 1.0)  # over-confidence -> T > 1
    prefix = np.cumprod(accepted, axis=1)
    for j in range(5):
        before = expected_calibration_error(survival(logits)[:, j], prefix[:, j])
        after = expected_calibration_error(survival(logits, temps)[:, j], prefix[:, j])
        assert after < before
        assert after == pytest.approx(cal.ece_after[j])
        assert before == pytest.approx(cal.ece_before[j])
    assert np.all(fit_sts(logits, accepted) == temps)
    np.testing.assert_allclose(apply_sts(logits, np.ones(5)), 1 / (1 + np.exp(-logits)))


def test_sts_unobserved_positions_keep_identity() -> None:
    logits, accepted = _overconfident_data(n=500, k=3)
    observed = np.zeros_like(accepted)
    observed[:, 0] = True
    accepted[:] = True  # nothing rejected, so positions 1 and 2 stay unknown
    temps = fit_sts(logits, accepted, observed=observed)
    assert temps[1] == 1.0 and temps[2] == 1.0


def test_ece_and_auc_hand_values() -> None:
    assert expected_calibration_error(np.array([0.1, 0.9]), np.array([0, 1])) == pytest.approx(0.1)
    assert expected_calibration_error(np.array([0.5, 0.52]), np.array([1, 0])) == pytest.approx(
        0.01)  # same bin: |0.51 - 0.5|
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.uniform(size=60) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        pos.size * neg.size)
    assert roc_auc(s, y) == pytest.approx(brute)


def test_sts_file_format_roundtrip(tmp_path) -> None:
    cal = StsCalibration(temperatures=[1.2, 0.9], dataset="d", num_samples=10,
                         ece_before=[0.1, 0.2], ece_after=[0.05, 0.1])
    cal.save(tmp_path / "sts.json")
    assert StsCalibration.load(tmp_path / "sts.json") == cal
    (tmp_path / "other.json").write_text('{"sts_temperatures": [2.0, 3.0]}')
    assert StsCalibration.load(tmp_path / "other.json").temperatures == [2.0, 3.0]
    with pytest.raises(ValueError):
        StsCalibration(temperatures=[1.0, 0.0])
