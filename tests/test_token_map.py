"""Token maps (reduced draft vocabulary): ranking, file formats, the drafter's restricted heads,
and greedy DSPARK through the Engine with a map == plain decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dspark_sglang.speculative.dspark.token_map import (
    TOKEN_MAP_FILE,
    build_token_map,
    load_token_map,
    save_token_map,
)
from tests.conftest import PROMPTS, greedy

V, H = 64, 32


def test_build_ranks_by_frequency_then_id() -> None:
    ids = build_token_map([[5, 5, 9, 3], [9, 5, 70]], vocab_size=V, size=6)
    assert ids == [5, 9, 3, 0, 1, 2]  # 70 is outside the vocabulary
    assert len(build_token_map([], V, 1000)) == V


def test_file_formats(tmp_path: Path) -> None:
    save_token_map(tmp_path / "m.json", [4, 2, 7], V)
    assert load_token_map(tmp_path / "m.json") == [4, 2, 7]
    assert load_token_map(tmp_path / "m.json", size=2) == [4, 2]
    (tmp_path / "plain.json").write_text(json.dumps([1, 2]))
    assert load_token_map(tmp_path / "plain.json") == [1, 2]
    torch.save(torch.tensor([8, 6, 1]), tmp_path / "sglang.pt")  # SGLang's EAGLE token maps
    assert load_token_map(tmp_path / "sglang.pt") == [8, 6, 1]
    (tmp_path / "dup.json").write_text(json.dumps([1, 1]))
    with pytest.raises(ValueError, match="distinct"):
        load_token_map(tmp_path / "dup.json")
    with pytest.raises(ValueError):
        load_token_map(tmp_path / "m.json", size=0)


def _drafter(markov: str = "vanilla") -> object:
    from dspark_sglang.models.config import ModelConfig
    from dspark_sglang.speculative.dspark.model import DSparkDrafter
    from dspark_sglang.speculative.dspark.random_init import random_dspark_config

    target = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": H,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256})
    torch.manual_seed(0)
    cfg = random_dspark_config(target, block_size=4, markov_head_type=markov)
    d = DSparkDrafter(cfg, nn.Embedding(V, H), nn.Linear(H, V, bias=False))
    for p in d.parameters():
        nn.init.normal_(p, std=0.5)
    return d.eval()


@pytest.mark.parametrize("markov", ["vanilla", "gated", "rnn"])
def test_drafter_drafts_only_mapped_tokens(markov: str) -> None:
    d = _drafter(markov)
    keep = [3, 17, 40, 41, 63, 9, 22, 5]
    hidden = torch.randn(3, 4, H)
    full = d.base_logits(hidden)
    d.set_token_map(keep, dtype="float32")
    sub = d.base_logits(hidden)
    assert torch.allclose(sub[..., keep], full[..., keep], atol=1e-5)
    off = torch.ones(V, dtype=torch.bool)
    off[keep] = False
    assert torch.isneginf(sub[..., off]).all()
    anchors = torch.tensor([1, 2, 3])
    temps = torch.tensor([0.0, 1.0, 0.0])
    chain = d.sample_chain(hidden, sub, anchors, temps)
    assert set(chain.tokens.flatten().tolist()) <= set(keep)
    assert (chain.probs[..., off] == 0).all() and torch.allclose(chain.probs.sum(-1),
                                                                 torch.ones(3, 4))
    # greedy rows: the same chain as the full drafter with every other token masked out
    d.set_token_map(None)
    ban = torch.zeros(V)
    ban[off] = float("-inf")
    ref = d.sample_chain(hidden, full, anchors, torch.zeros(3),
                         mask_fn=lambda k, p: ban.expand(3, V))
    assert chain.tokens[[0, 2]].tolist() == ref.tokens[[0, 2]].tolist()
    assert d.base_logits(hidden).isfinite().all()


def test_token_map_dtype_choice() -> None:
    d = _drafter()
    d.set_token_map(list(range(10)))
    assert d.draft_vocab is not None and d.draft_vocab.dtype == torch.float32
    d.set_token_map(list(range(10)), dtype="bfloat16")
    assert d.draft_vocab.head_weight.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        d.set_token_map([V + 1], dtype="float32")
    with pytest.raises(ValueError):
        d.set_token_map([1], dtype="int8")


@pytest.mark.parametrize("algo", ["DSPARK", "TREE"])
def test_engine_greedy_with_token_map_equals_none(make_engine, llama_dir, tmp_path, algo) -> None:
    from dspark_sglang.speculative.sps_profile import SPSTable
    from tests.conftest import random_drafter_for

    drafter = Path(random_drafter_for(llama_dir, tmp_path / "d"))
    # the drafter's own token_map.json is the default; a small one cuts most of the vocabulary
    save_token_map(drafter / TOKEN_MAP_FILE, list(range(0, 150, 3)), 384)
    sps = tmp_path / "flat.json"
    SPSTable.flat(10.0).save(sps)
    kw = {"speculative_dspark_sps_table_path": str(sps)} if algo == "DSPARK" else {}
    plain = make_engine(llama_dir)
    ref = [o["output_ids"] for o in plain.generate(PROMPTS, greedy(20))]
    e = make_engine(llama_dir, speculative_algorithm=algo,
                    speculative_draft_model_path=str(drafter),
                    speculative_dspark_disable_draft_budget=True, **kw)
    assert len(e.parts.decoder.worker.drafter.draft_vocab) == 50
    assert [o["output_ids"] for o in e.generate(PROMPTS, greedy(20))] == ref
    regex = e.generate(PROMPTS[0], {**greedy(12), "regex": "[a-c]+"})
    assert regex["output_ids"] == plain.generate(PROMPTS[0], {**greedy(12),
                                                             "regex": "[a-c]+"})["output_ids"]
    none = make_engine(llama_dir, speculative_algorithm=algo,
                       speculative_draft_model_path=str(drafter), speculative_token_map="none",
                       **kw)
    assert none.parts.decoder.worker.drafter.draft_vocab is None


@pytest.mark.parametrize("markov", ["vanilla", "gated"])
def test_chain_in_map_space_equals_vocabulary_space(markov: str) -> None:
    """``base_logits(..., in_map=True)`` (what the worker drafts with) gives the chain of the
    vocabulary-wide ``-inf``-padded logits: same greedy tokens, same confidences, same q."""
    d = _drafter(markov)
    d.set_token_map([40, 3, 17, 41, 63, 9, 22, 5], dtype="float32")  # unsorted on purpose
    hidden = torch.randn(3, 4, H)
    anchors = torch.tensor([1, 2, 3])
    wide = d.base_logits(hidden)
    narrow = d.base_logits(hidden, in_map=True)
    assert narrow.shape == (3, 4, 8)
    ban = torch.zeros(3, V)
    ban[:, 17] = float("-inf")  # a grammar-style mask given over the whole vocabulary
    for temps, mask_fn in [(torch.zeros(3), None), (torch.zeros(3), lambda k, p: ban)]:
        a = d.sample_chain(hidden, wide, anchors, temps, mask_fn=mask_fn)
        b = d.sample_chain(hidden, narrow, anchors, temps, mask_fn=mask_fn)
        assert a.tokens.tolist() == b.tokens.tolist()
        assert 17 not in b.tokens.flatten().tolist() or mask_fn is None
        torch.testing.assert_close(a.confidences, b.confidences)
        torch.testing.assert_close(a.probs, b.probs)
    temps = torch.tensor([1.0, 0.0, 0.7])
    g1 = [torch.Generator().manual_seed(i) for i in range(3)]
    g2 = [torch.Generator().manual_seed(i) for i in range(3)]
    a = d.sample_chain(hidden, wide, anchors, temps, g1)
    b = d.sample_chain(hidden, narrow, anchors, temps, g2)
    torch.testing.assert_close(a.probs, b.probs)
    assert set(b.tokens.flatten().tolist()) <= {40, 3, 17, 41, 63, 9, 22, 5}
