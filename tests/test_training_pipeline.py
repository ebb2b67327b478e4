"""Drafter training pipeline on a tiny random target: cache, training, export, STS, simulation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_sglang.core.forward_batch import ForwardMode
from dspark_sglang.entrypoints.model_setup import build_target_model
from dspark_sglang.layers.attention.base import create_attention_backend
from dspark_sglang.mem_cache.kv_pool import KVPool
from dspark_sglang.model_executor.model_runner import BatchRequestSpec, build_forward_batch
from dspark_sglang.models.llama import LlamaForCausalLM
from dspark_sglang.models.loader import load_model_files
from dspark_sglang.speculative.dspark.checkpoint import load_dspark_checkpoint
from dspark_sglang.speculative.dspark.model import DSparkDrafter
from dspark_sglang.training.blocks import build_block_batch, sample_anchors
from dspark_sglang.training.calibration import expected_calibration_error, survival
from dspark_sglang.training.data import Prompt, Sample, read_prompts, select_prompts
from dspark_sglang.training.export import export_drafter
from dspark_sglang.training.simulate import SimSummary, trace_sequence
from dspark_sglang.training.target_cache import (
    TargetHiddenExtractor,
    build_target_cache,
    load_target_cache,
)
from dspark_sglang.training.trainer import (
    TrainConfig,
    calibrate,
    init_from_target,
    make_drafter_config,
    split_heldout,
    step_loss,
    train_drafter,
)

LAYERS = (0, 1)
GAMMA = 4


@pytest.fixture(scope="module")
def target(tiny_model_dir) -> LlamaForCausalLM:
    loaded = load_model_files(tiny_model_dir("llama", layers=2))
    return build_target_model(loaded.config, loaded.state_dict, torch.float32, "cpu", 512)


def _samples(target: LlamaForCausalLM, n: int = 12, seed: int = 0) -> list[Sample]:
    """Greedy continuations of random prompts (a tiny 'self-distillation' set)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    ext = TargetHiddenExtractor(target, LAYERS, 2048, 256)
    for i in range(n):
        ids = torch.randint(3, target.config.vocab_size, (6,), generator=g).tolist()
        prompt = list(ids)
        for _ in range(24):
            _, fin = ext.run([ids])[0]
            ids.append(int(target.lm_head(fin[-1]).argmax()))
        out.append(Sample(f"s:{i}", prompt, ids[len(prompt):]))
    return out


@pytest.fixture(scope="module")
def cache(target: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cache")
    ext = TargetHiddenExtractor(target, LAYERS, max_batch_tokens=128, max_seq_len=64)
    build_target_cache(ext, _samples(target), d, shard_tokens=100, log=lambda *_: None)
    return d


def _drafter(target: LlamaForCausalLM, rank: int = 16, seed: int = 0) -> DSparkDrafter:
    torch.manual_seed(seed)
    cfg = make_drafter_config(target.config, LAYERS, num_layers=1, block_size=GAMMA,
                              markov_rank=rank, mask_token_id=0)
    d = DSparkDrafter(cfg, target.embed_tokens, target.lm_head)
    init_from_target(d, target, 1)
    return d


def test_cache_round_trip_matches_direct_forward(target: LlamaForCausalLM, cache: Path) -> None:
    layer_ids, seqs = load_target_cache(cache)
    assert layer_ids == list(LAYERS) and len(seqs) == 12
    s = next(x for x in seqs if x.key == "s:3")
    assert s.loss_start == 6 and s.input_ids.shape == (30,)
    # independent forward through the model's own runner path
    kv = KVPool(2, 64, target.config.num_key_value_heads, target.config.head_dim, torch.float32)
    r2t = torch.zeros(1, 64, dtype=torch.long)
    slots = torch.arange(1, 31)
    r2t[0, :30] = slots
    fb = build_forward_batch(ForwardMode.EXTEND,
                             [BatchRequestSpec(0, s.input_ids.tolist(), 0, slots)], r2t,
                             capture_layer_ids=LAYERS, capture_final_hidden=True)
    out = target(fb, create_attention_backend("torch_native"), kv)
    assert s.aux_hidden.dtype == torch.bfloat16
    torch.testing.assert_close(s.aux_hidden.float(), out.aux_hidden, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(s.final_hidden.float(), out.final_hidden, rtol=1e-2, atol=2e-2)
    # resumable: a second build adds nothing
    ext = TargetHiddenExtractor(target, LAYERS, max_batch_tokens=128, max_seq_len=64)
    stats = build_target_cache(ext, _samples(target, n=2), cache, log=lambda *_: None)
    assert stats["new_tokens"] == 0


def test_read_prompts_refuses_eval_sets(tmp_path: Path) -> None:
    d = tmp_path / "workloads" / "eval"
    d.mkdir(parents=True)
    (d / "x.jsonl").write_text('{"turns": ["hi"]}\n')
    with pytest.raises(ValueError):
        read_prompts([d / "x.jsonl"])
    (tmp_path / "p.jsonl").write_text('{"turns": ["hi", "more"], "domain": "chat"}\n')
    assert read_prompts([tmp_path / "p.jsonl"])[0].text == "hi"


def test_training_steps_lower_the_loss(target: LlamaForCausalLM, cache: Path,
                                       tmp_path: Path) -> None:
    _, seqs = load_target_cache(cache)
    drafter = _drafter(target)
    cfg = TrainConfig(steps=25, batch_seqs=4, anchors_per_seq=6, lr=3e-3, warmup_steps=2,
                      ckpt_every=10, log_every=5, export_dtype="float32")
    rng = random.Random(5)
    fixed = build_block_batch(seqs[:6], [sample_anchors(s, 6, rng) for s in seqs[:6]], GAMMA)
    with torch.no_grad():
        before = float(step_loss(drafter, target.lm_head, fixed, cfg, "cpu")[0])
    train_drafter(drafter, target.lm_head, seqs, cfg, tmp_path, progress=False)
    with torch.no_grad():
        after = float(step_loss(drafter, target.lm_head, fixed, cfg, "cpu")[0])
    assert after < 0.9 * before, (before, after)
    assert (tmp_path / "latest" / "model.safetensors").exists()
    # resume continues from the saved step instead of restarting
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert state["step"] == 25
    more = TrainConfig(**{**cfg.__dict__, "steps": 27})
    last = train_drafter(drafter, target.lm_head, seqs, more, tmp_path, progress=False)
    assert last["step"] == 27


def test_export_load_round_trip_gives_identical_drafts(target: LlamaForCausalLM,
                                                       tmp_path: Path) -> None:
    drafter = _drafter(target, seed=3)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drafter.set_sts([1.0, 1.5, 2.0, 0.5])
    out = export_drafter(drafter, tmp_path / "ckpt", dtype="float32")
    loaded = load_dspark_checkpoint(out, target.embed_tokens, target.lm_head)
    assert loaded.sts_calibration().temperatures == [1.0, 1.5, 2.0, 0.5]
    g = torch.Generator().manual_seed(0)
    lmax, bs = 10, 3
    h = torch.randn(bs, lmax, len(LAYERS) * target.config.hidden_size, generator=g)
    pos = torch.arange(lmax).expand(bs, lmax)
    anchors = torch.randint(3, 300, (bs,), generator=g)
    valid = torch.arange(lmax)[None, :] < torch.tensor([4, 7, 10])[:, None]

    def chain(d: DSparkDrafter) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            kv = d.context_kv(d.project_context(h), pos)
            hid = d.forward_block(anchors, valid.sum(1), [k for k, _ in kv],
                                  [v for _, v in kv], valid)
            c = d.sample_chain(hid, d.base_logits(hid), anchors, torch.zeros(bs))
        return c.tokens, c.confidences

    t1, c1 = chain(drafter)
    t2, c2 = chain(loaded)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(c1, c2)
    # bf16 export is what ships: same tensor names, half the bytes
    small = export_drafter(drafter, tmp_path / "ckpt16")
    assert (small / "model.safetensors").stat().st_size < 0.6 * (
        out / "model.safetensors").stat().st_size


def test_sts_lowers_ece_on_heldout(target: LlamaForCausalLM, cache: Path) -> None:
    _, seqs = load_target_cache(cache)
    _, held = split_heldout(seqs, 0.5, 0)
    drafter = _drafter(target)
    with torch.no_grad():  # a deliberately over-confident head
        drafter.confidence_head.proj.bias.fill_(6.0)
    cfg = TrainConfig(export_dtype="float32")
    cal, ev = calibrate(drafter, target.lm_head, held, cfg)
    assert cal is not None and ev["conf_logits"].shape[1] == GAMMA
    z, acc = ev["conf_logits"], np.cumprod(ev["accepted"], axis=1)
    before = expected_calibration_error(survival(z), acc)
    after = expected_calibration_error(survival(z, np.asarray(cal.temperatures)), acc)
    assert after < before
    assert drafter.sts_calibration().temperatures == cal.temperatures


def test_calibrate_reads_at_most_calib_max_seqs(target: LlamaForCausalLM, cache: Path) -> None:
    _, seqs = load_target_cache(cache)
    _, held = split_heldout(seqs, 0.5, 0)
    assert len(held) >= 2
    drafter = _drafter(target)
    _, ev_one = calibrate(drafter, target.lm_head, held, TrainConfig(calib_max_seqs=1))
    _, ev_all = calibrate(drafter, target.lm_head, held, TrainConfig(calib_max_seqs=0))
    _, ev_first = calibrate(drafter, target.lm_head, held[:1], TrainConfig(calib_max_seqs=0))
    assert ev_one["accepted"].shape == ev_first["accepted"].shape
    assert ev_all["accepted"].shape[0] > ev_one["accepted"].shape[0]


def test_sts_lowers_ece_on_synthetic_overconfident_scores() -> None:
    from dspark_sglang.training.calibration import fit_sts_calibration

    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.2, 0.9, size=(4000, 3))
    accepted = rng.uniform(size=true_p.shape) < true_p
    z = 4.0 * np.log(true_p / (1 - true_p))  # logits 4x too sharp
    cal = fit_sts_calibration(z, accepted)
    assert all(a < b for a, b in zip(cal.ece_after, cal.ece_before))
    assert cal.temperatures[0] > 2.0


def _oracle_fn(ids: torch.Tensor, vocab: int, gamma: int):
    def fn(anchors: torch.Tensor):
        n = ids.shape[0]
        idx = (anchors[:, None] + torch.arange(1, gamma + 1)[None, :]).clamp(max=n - 1)
        logits = 50.0 * torch.nn.functional.one_hot(ids[idx], vocab).float()
        return logits, logits, torch.full(idx.shape, 5.0)
    return fn


def test_simulation_with_oracle_drafter_gives_full_blocks() -> None:
    gamma, vocab, prompt = 7, 50, 5
    n = prompt + 1 + 4 * (gamma + 1)  # first token from prefill, then 4 full steps
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    tgt = torch.full((n, vocab), -30.0)
    tgt[torch.arange(n - 1), ids[1:]] = 30.0  # row i predicts token i + 1
    s = SimSummary(gamma)
    tr = trace_sequence(_oracle_fn(ids, vocab, gamma), ids, prompt, tgt, gamma, chunk=5)
    s.add(tr)
    assert s.tau_greedy("dspark") == gamma + 1
    assert s.tau_greedy("mtp1") == 2.0
    # the chain capped at c drafts: c + 1 tokens a step (the oracle's drafts all hold)
    assert [s.tau_greedy_capped(c) for c in (1, 3, gamma)] == [2.0, 4.0, gamma + 1]
    assert s.tau_t1("mtp1") == pytest.approx(2.0, abs=1e-4)
    assert s.conditional_acceptance()[0] == 1.0
    # a drafter that is always wrong: tau is 1 (bonus only)
    wrong = _oracle_fn((ids + 1) % vocab, vocab, gamma)
    s2 = SimSummary(gamma)
    s2.add(trace_sequence(wrong, ids, prompt, tgt, gamma))
    assert s2.tau_greedy_capped(3) == 1.0
    assert s2.tau_greedy("dspark") == 1.0 and s2.tau_t1("dspark") == pytest.approx(1.0, abs=1e-4)


def _half_map(target: LlamaForCausalLM, seqs, path: Path) -> str:
    """A token map of about half the vocabulary that holds some labels and misses others."""
    from dspark_sglang.speculative.dspark.token_map import save_token_map

    vocab = target.config.vocab_size
    labels = sorted({t for s in seqs for t in s.input_ids.tolist()})
    ids = sorted(set(labels[::2]) | set(range(0, vocab, 3)))[: vocab // 2]
    assert 0 < len(ids) < vocab and set(labels) - set(ids)
    save_token_map(path, list(reversed(ids)), vocab)  # not in id order: columns are map order
    return str(path)


@pytest.mark.parametrize("head_type,use_map,ce_label", [
    ("vanilla", False, "data"), ("gated", False, "data"), ("rnn", False, "data"),
    ("none", False, "data"), ("vanilla", True, "data"), ("none", True, "data"),
    ("vanilla", False, "target"), ("vanilla", True, "target")])
def test_fused_loss_matches_reference(target: LlamaForCausalLM, cache: Path, tmp_path: Path,
                                      head_type: str, use_map: bool, ce_label: str) -> None:
    """The chunked fused head (what training runs) equals the materialised reference loss in
    value and in every parameter gradient (float32 matmuls, so only rounding differs), also
    restricted to a token map (labels outside it have no CE) and with the target's argmax as
    the CE label."""
    _, seqs = load_target_cache(cache)
    token_map = _half_map(target, seqs, tmp_path / "map.json") if use_map else ""
    rng = random.Random(3)
    batch = build_block_batch(seqs[:5], [sample_anchors(s, 5, rng) for s in seqs[:5]], GAMMA)
    results = []
    for fused in (False, True):
        torch.manual_seed(1)
        cfg = make_drafter_config(target.config, LAYERS, num_layers=1, block_size=GAMMA,
                                  markov_rank=0 if head_type == "none" else 8,
                                  markov_head_type="vanilla" if head_type == "none"
                                  else head_type)
        d = DSparkDrafter(cfg, target.embed_tokens, target.lm_head)
        if d.markov_head is not None:  # non-zero W2 so the Markov path carries gradient
            torch.nn.init.normal_(d.markov_head.markov_w2.weight, std=0.05)
        tcfg = TrainConfig(fused_loss=fused, compute_dtype="float32", loss_chunk=7,
                           token_map=token_map, ce_label=ce_label)
        loss, parts = step_loss(d, target.lm_head, batch, tcfg, "cpu")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: v.detach() for k, v in parts.items()}, grads))
    (l_ref, p_ref, g_ref), (l_fu, p_fu, g_fu) = results
    torch.testing.assert_close(l_fu, l_ref, rtol=1e-4, atol=1e-5)
    for k in ("ce", "l1", "conf", "accept_rate", "expected_tau"):
        torch.testing.assert_close(p_fu[k], p_ref[k], rtol=1e-4, atol=1e-5)
    assert g_ref.keys() == g_fu.keys() and len(g_ref) > 5
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fu[name], g, rtol=1e-3, atol=1e-5, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in g_fu.values())


def test_target_label_is_the_target_argmax(target: LlamaForCausalLM, cache: Path) -> None:
    """``ce_label="target"``: the fused head's CE labels are the argmax of the target's logits
    (not the data tokens, which a random tiny target rarely picks), its CE and gradient equal
    those of passing that argmax explicitly, and the CE differs from the data label's."""
    from dspark_sglang.training.fused_loss import fused_head_losses

    torch.manual_seed(0)
    m, h = 23, target.config.hidden_size
    w = target.lm_head.weight.detach()
    ht = torch.randn(m, h)
    data_ids = torch.randint(0, w.shape[0], (m,))
    argmax = (ht @ w.t()).argmax(-1)
    assert int((argmax != data_ids).sum()) > m // 2
    out = {}
    for name, ids in (("none", None), ("explicit", argmax), ("data", data_ids)):
        hid = torch.randn(m, h, generator=torch.Generator().manual_seed(1)).requires_grad_()
        l1, ce, labels = fused_head_losses(hid, None, w, None, ht, ids, chunk=5,
                                           matmul_dtype=torch.float32, return_labels=True)
        (l1.sum() + ce.sum()).backward()
        out[name] = (l1.detach(), ce.detach(), labels, hid.grad)
    assert torch.equal(out["none"][2], argmax) and torch.equal(out["data"][2], data_ids)
    for a, b in zip(out["none"], out["explicit"]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out["none"][0], out["data"][0])  # L1 does not use labels
    assert not torch.allclose(out["none"][1], out["data"][1])
    assert not torch.allclose(out["none"][3], out["data"][3])


def test_heldout_acceptance_with_target_labels(target: LlamaForCausalLM, cache: Path) -> None:
    """``evaluate_blocks`` with ``ce_label="target"`` counts a draft as accepted when its
    argmax is the target's argmax (full vocabulary), with ``"data"`` when it is the data token:
    recomputed here by hand from the same teacher-forced forward."""
    from dspark_sglang.training.blocks import block_forward, prev_tokens, target_block_logits
    from dspark_sglang.training.trainer import evaluate_blocks

    _, seqs = load_target_cache(cache)
    d = _drafter(target)
    d.eval()
    for mode in ("data", "target"):
        ev = evaluate_blocks(d, target.lm_head, seqs[:3], TrainConfig(ce_label=mode), "cpu",
                             anchors_per_seq=4, seed=5)
        rng, want = random.Random(5), []
        with torch.no_grad():
            for s in seqs[:3]:
                a = sample_anchors(s, 4, rng)
                if not a:
                    continue
                batch = build_block_batch([s], [a], GAMMA)
                logits, _ = d.train_heads(block_forward(d, batch), prev_tokens(batch))
                tgt = target_block_logits(target.lm_head, batch, GAMMA, "cpu")
                label = tgt.argmax(-1) if mode == "target" else batch.labels
                want.append((logits.argmax(-1) == label) & batch.valid)
        assert (ev["accepted"] == torch.cat(want).numpy()).all()
    with pytest.raises(ValueError, match="ce_label"):
        evaluate_blocks(d, target.lm_head, seqs[:1], TrainConfig(ce_label="argmax"), "cpu")


def test_packed_block_forward_matches_per_block(target: LlamaForCausalLM, cache: Path) -> None:
    """Training's per-sequence packed backbone equals the per-block reference (what the engine
    computes per request), including sequences with fewer anchors than others."""
    from dspark_sglang.training.blocks import block_forward, block_forward_packed

    _, seqs = load_target_cache(cache)
    rng = random.Random(7)
    anchors = [sample_anchors(s, 2 + i % 4, rng) for i, s in enumerate(seqs[:5])]
    batch = build_block_batch(seqs[:5], anchors, GAMMA)
    d = _drafter(target)
    with torch.no_grad():
        ref = block_forward(d, batch)
        got = block_forward_packed(d, batch)
    assert got.shape == ref.shape == (sum(len(a) for a in anchors), GAMMA,
                                      target.config.hidden_size)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_init_from_checkpoint_copies_weights_and_checks_shapes(target: LlamaForCausalLM,
                                                               tmp_path: Path) -> None:
    from dspark_sglang.train_drafter import _init_from_checkpoint

    src = _drafter(target, seed=5)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_drafter(src, tmp_path / "ckpt", dtype="float32")
    fresh = _drafter(target, seed=6)
    _init_from_checkpoint(fresh, str(out), target)
    for (name, a), (_, b) in zip(src.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="does not match"):
        _init_from_checkpoint(_drafter(target, rank=8), str(out), target)


def test_init_from_checkpoint_grows_layers_as_identity(target: LlamaForCausalLM, cache: Path,
                                                       tmp_path: Path) -> None:
    """A 1-layer checkpoint loaded into a 3-layer drafter: the first layer is the checkpoint's,
    the added layers are copies of it with zero output projections, so the grown drafter's
    block hidden states and logits equal the checkpoint's; the added layers then train."""
    from dspark_sglang.train_drafter import _init_from_checkpoint
    from dspark_sglang.training.blocks import block_forward, prev_tokens

    src = _drafter(target, seed=5)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_drafter(src, tmp_path / "ckpt", dtype="float32")
    cfg = make_drafter_config(target.config, LAYERS, num_layers=3, block_size=GAMMA,
                              markov_rank=16, mask_token_id=0)
    grown = DSparkDrafter(cfg, target.embed_tokens, target.lm_head)
    _init_from_checkpoint(grown, str(out), target)
    sd_src, sd = src.state_dict(), grown.state_dict()
    for name, v in sd_src.items():
        assert torch.equal(sd[name], v), name
    for i in (1, 2):
        assert not sd[f"layers.{i}.self_attn.o_proj.weight"].any()
        assert not sd[f"layers.{i}.mlp.down_proj.weight"].any()
        assert torch.equal(sd[f"layers.{i}.self_attn.q_proj.weight"],
                           sd_src["layers.0.self_attn.q_proj.weight"])
    _, seqs = load_target_cache(cache)
    rng = random.Random(3)
    batch = build_block_batch(seqs[:3], [sample_anchors(s, 3, rng) for s in seqs[:3]], GAMMA)
    with torch.no_grad():
        want = src.train_heads(block_forward(src, batch), prev_tokens(batch))[0]
    got = grown.train_heads(block_forward(grown, batch), prev_tokens(batch))[0]
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    # the zeroed projections get gradients: the added layers are not dead
    got.logsumexp(-1).sum().backward()
    assert grown.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0
    assert grown.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0


def test_select_prompts_keeps_the_shuffled_order_within_a_domain() -> None:
    prompts = [Prompt(f"k{i}", "code" if i % 3 == 0 else "math", f"t{i}") for i in range(30)]
    full = select_prompts(prompts, seed=0)
    assert sorted(p.key for p in full) == sorted(p.key for p in prompts) and full != prompts
    code = select_prompts(prompts, seed=0, domains=["code"])
    assert code == [p for p in full if p.domain == "code"]  # same keys, same order: resumable
    assert select_prompts(prompts, seed=0, domains=["code"], limit=3) == code[:3]
    assert select_prompts(prompts, seed=0, domains=["chat"]) == []


def test_token_map_training_restricts_the_distributions(target: LlamaForCausalLM, cache: Path,
                                                        tmp_path: Path) -> None:
    """With a map the loss is the full-vocabulary loss of the map's columns only: equal to the
    reference on logits sliced by hand, different from the unrestricted loss, and a map of the
    whole vocabulary in id order changes nothing."""
    from dspark_sglang.speculative.dspark.token_map import save_token_map
    from dspark_sglang.training.blocks import block_forward, prev_tokens, target_block_logits
    from dspark_sglang.training.losses import dspark_loss

    _, seqs = load_target_cache(cache)
    rng = random.Random(5)
    batch = build_block_batch(seqs[:4], [sample_anchors(s, 4, rng) for s in seqs[:4]], GAMMA)
    d = _drafter(target)
    torch.nn.init.normal_(d.markov_head.markov_w2.weight, std=0.05)
    vocab = target.config.vocab_size
    half = _half_map(target, seqs, tmp_path / "half.json")
    save_token_map(tmp_path / "all.json", list(range(vocab)), vocab)
    with torch.no_grad():
        def loss_of(token_map: str) -> float:
            cfg = TrainConfig(compute_dtype="float32", loss_chunk=5, token_map=token_map)
            return float(step_loss(d, target.lm_head, batch, cfg, "cpu")[0])

        full, restricted, whole = loss_of(""), loss_of(half), loss_of(str(tmp_path / "all.json"))
        ids = torch.tensor(json.loads((tmp_path / "half.json").read_text())["token_ids"])
        hidden = block_forward(d, batch)
        logits, conf = d.train_heads(hidden, prev_tokens(batch))
        tgt = target_block_logits(target.lm_head, batch, GAMMA, "cpu")
        pos = {int(t): j for j, t in enumerate(ids)}
        cols = torch.tensor([[pos.get(int(t), 0) for t in row] for row in batch.labels])
        inside = torch.tensor([[int(t) in pos for t in row] for row in batch.labels])
        cfg = TrainConfig()
        by_hand = float(dspark_loss(logits[..., ids], tgt[..., ids], conf, batch.valid,
                                    cfg.loss_decay_gamma, cfg.alpha_ce, cfg.alpha_tv,
                                    cfg.alpha_conf, target_ids=cols, ce_mask=inside)[0])
    assert restricted == pytest.approx(by_hand, rel=1e-4)
    assert whole == pytest.approx(full, rel=1e-5)
    assert abs(restricted - full) > 1e-3


class _GreedyEngine:
    """The two things ``eval_drafter.evaluate_set`` asks of an Engine: a tokenizer and greedy
    ``generate`` (here the tiny target's own argmax loop)."""

    class _Tok:
        def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
            return messages[0]["content"]

        def encode(self, text: str) -> list[int]:
            return [3 + ord(c) % 50 for c in text]

    def __init__(self, target: LlamaForCausalLM) -> None:
        self.tokenizer = self._Tok()
        self.ext = TargetHiddenExtractor(target, LAYERS, 2048, 256)
        self.target = target

    def generate(self, input_ids: list[list[int]], sampling_params: dict) -> list[dict]:
        outs = []
        for ids in input_ids:
            ids = list(ids)
            new = []
            for _ in range(sampling_params["max_new_tokens"]):
                _, fin = self.ext.run([ids])[0]
                new.append(int(self.target.lm_head(fin[-1]).argmax()))
                ids.append(new[-1])
            outs.append({"output_ids": new})
        return outs


def test_eval_drafter_compare_is_paired_and_independent(target: LlamaForCausalLM) -> None:
    """``evaluate_set`` with several drafters (``eval_drafter --compare``) gives each drafter
    the summary it gets alone, on the same continuations: the same drafter twice gives equal
    results, and a different drafter's column is its own."""
    from dspark_sglang.eval_drafter import evaluate_set

    eng = _GreedyEngine(target)
    ext = TargetHiddenExtractor(target, LAYERS, 2048, 256)
    d1, d2 = _drafter(target, seed=0), _drafter(target, seed=5)
    torch.nn.init.normal_(d2.markov_head.markov_w2.weight, std=0.5)
    prompts = ["add two numbers", "a poem", "sort a list please"]
    both = evaluate_set(eng, ext, [d1, d2, d1], target.lm_head, prompts, 20)
    alone = evaluate_set(eng, ext, [d2], target.lm_head, prompts, 20)
    assert len(both) == 3 and both[0].t1_n > 0
    for k in ("dspark", "dflash", "mtp1"):
        assert both[0].tau_greedy(k) == both[2].tau_greedy(k)
        assert both[1].tau_greedy(k) == alone[0].tau_greedy(k)
        assert both[1].tau_t1(k) == pytest.approx(alone[0].tau_t1(k))
    assert both[0].tau_t1("dspark") != pytest.approx(both[1].tau_t1("dspark"))


def test_init_from_checkpoint_keeps_first_layers_and_grows_markov_heads(
        target: LlamaForCausalLM, tmp_path: Path) -> None:
    """Ablation starts: a 3-layer vanilla checkpoint loaded into a 1-layer drafter keeps its
    first layer (and everything outside the layers); into a gated-Markov drafter, the shared
    ``W1`` is the checkpoint's and the gates start at 1/2 whatever the hidden state (``W2``
    doubled), so the bias starts as the vanilla one; into an RNN head, the output starts as
    ``W2 tanh(W1[prev])``."""
    from dspark_sglang.train_drafter import _init_from_checkpoint

    torch.manual_seed(5)
    cfg3 = make_drafter_config(target.config, LAYERS, num_layers=3, block_size=GAMMA,
                               markov_rank=16, mask_token_id=0)
    src = DSparkDrafter(cfg3, target.embed_tokens, target.lm_head)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_drafter(src, tmp_path / "ckpt", dtype="float32")
    small = _drafter(target, seed=6)  # 1 layer
    _init_from_checkpoint(small, str(out), target)
    sd_src = src.state_dict()
    for name, v in small.state_dict().items():
        assert torch.equal(v, sd_src[name]), name
    cfg_g = make_drafter_config(target.config, LAYERS, num_layers=3, block_size=GAMMA,
                                markov_rank=16, mask_token_id=0, markov_head_type="gated")
    gated = DSparkDrafter(cfg_g, target.embed_tokens, target.lm_head)
    _init_from_checkpoint(gated, str(out), target)
    prev = torch.tensor([3, 7, 11])
    hidden = torch.randn(3, target.config.hidden_size)
    with torch.no_grad():
        want = src.markov_head.bias(prev)
        got, _ = gated.markov_head.step(prev, hidden, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cfg_r = make_drafter_config(target.config, LAYERS, num_layers=3, block_size=GAMMA,
                                markov_rank=16, mask_token_id=0, markov_head_type="rnn")
    rnn = DSparkDrafter(cfg_r, target.embed_tokens, target.lm_head)
    _init_from_checkpoint(rnn, str(out), target)
    with torch.no_grad():
        e = src.markov_head.prev_embedding(prev)
        got, state = rnn.markov_head.step(prev, hidden, None)
        # the output reads tanh(e) of the previous token, the state half of tanh(e)
        torch.testing.assert_close(got, src.markov_head.markov_w2(torch.tanh(e)))
        torch.testing.assert_close(state, 0.5 * torch.tanh(e))
