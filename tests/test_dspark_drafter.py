"""DSpark drafter: block attention, context injection, chain sampling, DeepSpec checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from dspark_sglang.speculative.dspark import (
    DSparkConfig,
    DSparkDrafter,
    StsCalibration,
    load_dspark_checkpoint,
    save_dspark_checkpoint,
)
from dspark_sglang.speculative.dspark.checkpoint import read_checkpoint_tensor_names
from dspark_sglang.speculative.dspark.confidence import mask_adjusted_confidence

torch.set_num_threads(1)
V, H, GAMMA = 100, 32, 4


def make_config(**kw: object) -> DSparkConfig:
    base = {"vocab_size": V, "hidden_size": H, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                "block_size": GAMMA,
                "target_layer_ids": (0, 2), "mask_token_id": V - 1, "markov_rank": 8,
                "markov_head_type": "vanilla", "enable_confidence_head": True,
                "confidence_head_with_markov": True, "rope_theta": 10000.0}
    base.update(kw)
    return DSparkConfig(**base)  # type: ignore[arg-type]


def make_drafter(seed: int = 0, **kw: object) -> DSparkDrafter:
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(V, H)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.mul_(8.0)  # spread logits so argmax / sampling are not near-uniform
    drafter = DSparkDrafter(make_config(**kw), emb, head)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return drafter.eval()


def make_context(drafter: DSparkDrafter, lengths: list[int], seed: int = 1):
    """Per request a random target-hidden context; returns padded ctx K/V, valid, anchors."""
    g = torch.Generator().manual_seed(seed)
    bs, lmax = len(lengths), max(lengths)
    n_layers = drafter.config.num_hidden_layers
    kvh, d = drafter.config.num_key_value_heads, drafter.config.head_dim
    ctx_k = [torch.zeros(bs, lmax, kvh, d) for _ in range(n_layers)]
    ctx_v = [torch.zeros(bs, lmax, kvh, d) for _ in range(n_layers)]
    valid = torch.zeros(bs, lmax, dtype=torch.bool)
    with torch.no_grad():
        for r, n in enumerate(lengths):
            hidden = torch.randn(n, drafter.config.ctx_input_size, generator=g)
            kv = drafter.context_kv(drafter.project_context(hidden), torch.arange(n))
            for layer, (k, v) in enumerate(kv):
                ctx_k[layer][r, :n], ctx_v[layer][r, :n] = k, v
            valid[r, :n] = True
    anchors = torch.randint(0, V - 1, (bs,), generator=g)
    return ctx_k, ctx_v, valid, anchors, torch.tensor(lengths)


def run_block(drafter: DSparkDrafter, lengths: list[int], seed: int = 1) -> torch.Tensor:
    ctx_k, ctx_v, valid, anchors, pos = make_context(drafter, lengths, seed)
    with torch.no_grad():
        return drafter.forward_block(anchors, pos, ctx_k, ctx_v, valid)


def test_config_roundtrip_and_deepspec_fields() -> None:
    cfg = make_config()
    d = cfg.to_dict()
    assert d["architectures"] == ["Qwen3DSparkModel"]
    for key in ("block_size", "target_layer_ids", "mask_token_id", "markov_rank",
                "markov_head_type", "enable_confidence_head", "confidence_head_with_markov"):
        assert key in d
    assert DSparkConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a head-less, Markov-less config omits the conditional keys, as DeepSpec does
    bare = make_config(markov_rank=0, enable_confidence_head=False,
                       confidence_head_with_markov=False).to_dict()
    assert "markov_head_type" not in bare and "confidence_head_with_markov" not in bare
    # unknown target keys survive a round trip
    d["bos_token_id"] = 7
    assert DSparkConfig.from_dict(d).to_dict()["bos_token_id"] == 7
    with pytest.raises(ValueError):
        make_config(target_layer_ids=(2, 1))


def test_state_dict_uses_deepspec_names_without_shared_modules() -> None:
    names = set(make_drafter(markov_head_type="gated").state_dict())
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight", "markov_head.markov_w1.weight",
                "markov_head.markov_w2.weight", "markov_head.gate_proj.weight",
                "markov_head.gate_proj.bias", "confidence_head.proj.weight",
                "confidence_head.proj.bias"}
    for i in range(2):
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.self_attn.{p}_norm.weight" for p in "qk"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"layers.{i}.input_layernorm.weight",
                     f"layers.{i}.post_attention_layernorm.weight"}
    assert names == expected


def test_block_attention_is_bidirectional() -> None:
    drafter = make_drafter()
    base = run_block(drafter, [6])

    def perturb_last_row(module: torch.nn.Module, inp: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, GAMMA - 1] += 1.0
        return out

    hook = drafter.embed_tokens.register_forward_hook(perturb_last_row)
    try:
        changed = run_block(drafter, [6])
    finally:
        hook.remove()
    assert not torch.allclose(base[:, 0], changed[:, 0], atol=1e-5)  # row 0 sees row gamma-1
    assert torch.equal(run_block(drafter, [6]), base)  # hook removed, deterministic


def test_invalid_context_entries_have_no_effect() -> None:
    drafter = make_drafter()
    ctx_k, ctx_v, valid, anchors, pos = make_context(drafter, [5])
    with torch.no_grad():
        ref = drafter.forward_block(anchors, pos, ctx_k, ctx_v, valid)
        pad = 3
        junk_k = [torch.cat([k, 50 * torch.randn(1, pad, *k.shape[2:])], 1) for k in ctx_k]
        junk_v = [torch.cat([v, 50 * torch.randn(1, pad, *v.shape[2:])], 1) for v in ctx_v]
        junk_valid = torch.cat([valid, torch.zeros(1, pad, dtype=torch.bool)], 1)
        padded = drafter.forward_block(anchors, pos, junk_k, junk_v, junk_valid)
        # the context does matter when it is valid
        other = drafter.forward_block(anchors, pos, junk_k, junk_v, torch.ones_like(junk_valid))
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, ref, atol=1e-3)


def test_batched_blocks_match_single_requests() -> None:
    drafter = make_drafter()
    ctx_k, ctx_v, valid, anchors, pos = make_context(drafter, [3, 7])
    with torch.no_grad():
        both = drafter.forward_block(anchors, pos, ctx_k, ctx_v, valid)
        for r, n in enumerate([3, 7]):
            one = drafter.forward_block(anchors[r : r + 1], pos[r : r + 1],
                                        [k[r : r + 1, :n] for k in ctx_k],
                                        [v[r : r + 1, :n] for v in ctx_v], valid[r : r + 1, :n])
            torch.testing.assert_close(both[r : r + 1], one, rtol=1e-5, atol=1e-5)


def _chain(drafter: DSparkDrafter, temps: list[float], gens=None, mask_fn=None, k=None):
    bs = len(temps)
    ctx_k, ctx_v, valid, anchors, pos = make_context(drafter, [4 + r for r in range(bs)])
    with torch.no_grad():
        hidden = drafter.forward_block(anchors, pos, ctx_k, ctx_v, valid)
        logits = drafter.base_logits(hidden)
    chain = drafter.sample_chain(hidden, logits, anchors, torch.tensor(temps), gens, mask_fn, k)
    return chain, hidden, logits, anchors


def test_greedy_chain_is_argmax_of_base_plus_markov() -> None:
    drafter = make_drafter()
    chain, _hidden, logits, anchors = _chain(drafter, [0.0, 0.0])
    markov = drafter.markov_head
    assert markov is not None
    prev = anchors
    for k in range(GAMMA):
        with torch.no_grad():
            expect = (logits[:, k] + markov.bias(prev)).argmax(-1)
        assert torch.equal(chain.tokens[:, k], expect)
        assert torch.equal(chain.probs[:, k].argmax(-1), expect)
        assert torch.all(chain.probs[:, k].max(-1).values == 1.0)
        prev = expect
    assert chain.confidences.shape == (2, GAMMA)
    assert torch.all((chain.confidences > 0) & (chain.confidences < 1))


def test_greedy_chain_with_mask_never_emits_masked_token() -> None:
    drafter = make_drafter()
    unmasked, *_ = _chain(drafter, [0.0, 0.0])
    banned_log: list[torch.Tensor] = []

    def mask_fn(k: int, prev: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + k)
        banned = torch.rand(prev.shape[0], V, generator=g) < 0.5
        if k == 0:  # ban exactly what the unmasked drafter would pick
            banned[torch.arange(prev.shape[0]), unmasked.tokens[:, 0]] = True
        banned_log.append(banned)
        return torch.zeros(prev.shape[0], V).masked_fill(banned, float("-inf"))

    chain, *_ = _chain(drafter, [0.0, 0.0], mask_fn=mask_fn)
    for k in range(GAMMA):
        picked = banned_log[k].gather(1, chain.tokens[:, k : k + 1])
        assert not picked.any()
        assert torch.all(chain.probs[:, k][banned_log[k]] == 0)
    assert not torch.equal(chain.tokens[:, 0], unmasked.tokens[:, 0])


def test_mask_that_forces_a_token_gives_full_confidence() -> None:
    drafter = make_drafter()

    def force(k: int, prev: torch.Tensor) -> torch.Tensor:
        m = torch.full((prev.shape[0], V), float("-inf"))
        m[:, 7] = 0.0
        return m

    chain, *_ = _chain(drafter, [0.0, 1.0], mask_fn=force)
    assert torch.all(chain.tokens == 7)
    torch.testing.assert_close(chain.confidences, torch.ones_like(chain.confidences))
    # the correction never lowers a confidence and is the identity without a mask
    logits = torch.randn(3, V)
    conf = torch.tensor([0.2, 0.5, 0.9])
    tok = logits.argmax(-1)
    torch.testing.assert_close(mask_adjusted_confidence(conf, logits, logits, tok), conf)
    masked = logits.clone()
    masked[:, :50] = float("-inf")
    masked[torch.arange(3), tok] = logits[torch.arange(3), tok]
    assert torch.all(mask_adjusted_confidence(conf, logits, masked, tok) >= conf - 1e-6)


def test_mixed_greedy_and_seeded_sampled_rows() -> None:
    drafter = make_drafter()
    greedy_only, *_ = _chain(drafter, [0.0, 0.0])
    a, *_ = _chain(drafter, [0.0, 1.0], gens=[None, torch.Generator().manual_seed(5)])
    b, *_ = _chain(drafter, [0.0, 1.0], gens=[None, torch.Generator().manual_seed(5)])
    assert torch.equal(a.tokens[0], greedy_only.tokens[0])  # greedy row unaffected
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    torch.testing.assert_close(a.probs[1].sum(-1), torch.ones(GAMMA))
    # the sampled token always has positive probability under the recorded q
    assert torch.all(a.probs[1].gather(1, a.tokens[1:2].T) > 0)
    short, *_ = _chain(drafter, [0.0, 0.0], k=2)
    assert short.tokens.shape == (2, 2) and torch.equal(short.tokens, greedy_only.tokens[:, :2])


def test_sampled_first_token_follows_recorded_distribution() -> None:
    drafter = make_drafter()
    n = 3000
    ctx_k, ctx_v, valid, anchors, pos = make_context(drafter, [5])
    with torch.no_grad():
        hidden = drafter.forward_block(anchors, pos, ctx_k, ctx_v, valid)
        logits = drafter.base_logits(hidden)
    torch.manual_seed(0)
    chain = drafter.sample_chain(hidden.expand(n, -1, -1), logits.expand(n, -1, -1),
                                 anchors.expand(n), torch.full((n,), 0.7), num_tokens=1)
    empirical = torch.bincount(chain.tokens[:, 0], minlength=V).float() / n
    tv = 0.5 * (empirical - chain.probs[0, 0]).abs().sum()
    assert tv < 0.08


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_teacher_forced_heads_match_chain_sampling(head_type: str) -> None:
    drafter = make_drafter(markov_head_type=head_type)
    chain, hidden, _logits, anchors = _chain(drafter, [0.0, 0.0])
    prev = torch.cat([anchors.unsqueeze(1), chain.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        draft_logits, conf_logits = drafter.train_heads(hidden, prev)
    assert torch.equal(draft_logits.argmax(-1), chain.tokens)
    assert conf_logits is not None and chain.confidence_logits is not None
    torch.testing.assert_close(conf_logits, chain.confidence_logits)


def test_checkpoint_roundtrip_gives_identical_chains(tmp_path) -> None:
    drafter = make_drafter(markov_head_type="rnn")
    cal = StsCalibration(temperatures=[1.0, 1.5, 2.0, 0.8], dataset="toy", num_samples=3)
    save_dspark_checkpoint(tmp_path, drafter, cal)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    sts = json.loads((tmp_path / "sts_calibration.json").read_text())
    assert sts["temperatures"] == [1.0, 1.5, 2.0, 0.8]
    assert set(read_checkpoint_tensor_names(tmp_path)) == set(drafter.state_dict())

    loaded = load_dspark_checkpoint(tmp_path, drafter.embed_tokens, drafter.lm_head)
    assert loaded.config == drafter.config
    drafter.set_sts(cal)
    for temps in ([0.0, 0.0], [0.0, 1.3]):
        a, *_ = _chain(drafter, temps, gens=[None, torch.Generator().manual_seed(9)])
        b, *_ = _chain(loaded.eval(), temps, gens=[None, torch.Generator().manual_seed(9)])
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.probs, b.probs)
        assert torch.equal(a.confidences, b.confidences)


def test_checkpoint_with_shared_weights_and_strictness(tmp_path) -> None:
    drafter = make_drafter(enable_confidence_head=False, confidence_head_with_markov=False)
    save_dspark_checkpoint(tmp_path, drafter, include_shared_weights=True)
    names = read_checkpoint_tensor_names(tmp_path)
    assert "embed_tokens.weight" in names and "lm_head.weight" in names
    assert not (tmp_path / "sts_calibration.json").exists()
    loaded = load_dspark_checkpoint(tmp_path, drafter.embed_tokens, drafter.lm_head)
    assert loaded.confidence_head is None
    # a config that expects a head the file lacks is refused
    cfg = replace(drafter.config, enable_confidence_head=True)
    cfg.save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="missing"):
        load_dspark_checkpoint(tmp_path, drafter.embed_tokens, drafter.lm_head)
