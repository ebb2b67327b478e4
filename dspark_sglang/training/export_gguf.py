"""Write a DSpark drafter as the GGUF that llama.cpp's ``--spec-type draft-dspark`` loads.

Layout as llama.cpp's own converter writes it (``conversion/qwen.py``: ``DSparkModel(DFlashModel)``
registered for ``Qwen3DSparkModel`` / ``DSparkDraftModel`` / ``LingDSparkModel``), read in the
llama.cpp source vendored by ``llama-cpp-python`` 0.3.36 (nothing copied). llama.cpp adds no GGUF
architecture for DSpark: the drafter is a ``dflash`` model whose Markov head is found by its
tensors (rank = ``markov_w1``'s first GGML dimension).

- KV: ``general.architecture = "dflash"``; the Qwen3 hyper-parameters under ``dflash.*``
  (``block_count``, ``context_length``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count``, ``attention.head_count_kv``, ``attention.key_length``,
  ``attention.value_length``, ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``),
  ``general.file_type``; ``dflash.block_size``; ``dflash.target_layers`` = our
  ``target_layer_ids`` **plus one** (llama.cpp counts the embedding output as layer 0, like HF
  ``hidden_states``); ``dflash.sample_from_anchor = true``; ``dflash.has_confidence_head``; the
  target's tokenizer (``tokenizer.ggml.*``, copied from the target GGUF) with
  ``tokenizer.ggml.mask_token_id`` = the drafter's mask token.
- Tensors: ``fc.weight``, ``enc.output_norm.weight`` (our ``hidden_norm``), ``output_norm.weight``,
  per layer ``blk.{i}.{attn_norm,attn_q,attn_k,attn_v,attn_output,attn_q_norm,attn_k_norm,
  ffn_norm,ffn_gate,ffn_up,ffn_down}.weight``, ``markov_w1.weight`` / ``markov_w2.weight``
  (torch ``[V, r]`` -> GGML ``{r, V}``), ``conf_proj.weight`` / ``conf_proj.bias`` (optional).
  No embedding or LM head: llama.cpp shares the target's.

llama.cpp runs Qwen3-style drafters (q/k norms required) with a vanilla Markov head;
:func:`gguf_export_problems` lists what else a drafter would need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.model import DSparkDrafter

GGUF_ARCH = "dflash"
_LAYER_NAMES = {  # our per-layer tensor suffix -> llama.cpp blk.{i}.<name>
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}
_ROOT_NAMES = {
    "fc.weight": "fc.weight",
    "hidden_norm.weight": "enc.output_norm.weight",
    "norm.weight": "output_norm.weight",
    "markov_head.markov_w1.weight": "markov_w1.weight",
    "markov_head.markov_w2.weight": "markov_w2.weight",
    "confidence_head.proj.weight": "conf_proj.weight",
    "confidence_head.proj.bias": "conf_proj.bias",
}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's GGUF name for one of our (DeepSpec) tensor names."""
    if name in _ROOT_NAMES:
        return _ROOT_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"no llama.cpp DSpark GGUF name for tensor {name!r}")


def gguf_export_problems(cfg: DSparkConfig) -> list[str]:
    """Why llama.cpp's draft-dspark could not run this drafter (empty list: it can)."""
    problems = []
    if cfg.markov_rank <= 0:
        problems.append("no Markov head (markov_rank 0): llama.cpp would run it as plain DFlash")
    elif cfg.markov_head_type != "vanilla":
        problems.append(f"markov_head_type {cfg.markov_head_type!r}: llama.cpp has only vanilla")
    if cfg.enable_confidence_head and not cfg.confidence_head_with_markov:
        problems.append("a confidence head without the Markov input: llama.cpp's conf_proj "
                        "takes [h; W1[x]] (n_embd + r)")
    if not cfg.qk_norm:
        problems.append("no q_norm/k_norm: llama.cpp's DSpark backbone is Qwen3 (per-head norms "
                        "required)")
    if any(i < 0 for i in cfg.target_layer_ids):
        problems.append("target_layer_ids -1 (embedding output): not verified in llama.cpp")
    n_target = cfg.num_target_layers
    if n_target is not None and any(i >= n_target - 1 for i in cfg.target_layer_ids):
        problems.append(f"target_layer_ids {list(cfg.target_layer_ids)} read the last target "
                        f"layer ({n_target - 1}): llama.cpp exposes the inputs of layers "
                        f"0..{n_target - 1} only, i.e. outputs up to layer {n_target - 2} (it "
                        "aborts with 'layer input tensor is null')")
    if cfg.target_hidden_size not in (None, cfg.hidden_size):
        problems.append("target_hidden_size != hidden_size: llama.cpp's fc takes "
                        "len(target_layers) * n_embd inputs")
    if cfg.attention_bias:
        problems.append("attention_bias: llama.cpp's Qwen3 draft layers have no q/k/v biases")
    if cfg.rope_scaling:
        problems.append(f"rope_scaling {cfg.rope_scaling} is not written to the GGUF")
    return problems


def _copy_tokenizer(writer: object, target_gguf: str | Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(target_gguf))
    for name, fld in reader.fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.ggml.mask_token_id":
            continue
        vtype = fld.types[0]
        sub = fld.types[1] if vtype == GGUFValueType.ARRAY and len(fld.types) > 1 else None
        writer.add_key_value(name, fld.contents(), vtype, sub_type=sub)  # type: ignore[attr-defined]


def export_gguf(drafter: DSparkDrafter, out_path: str | Path, target_gguf: str | Path,
                dtype: str = "float16") -> Path:
    """Write ``drafter`` as a llama.cpp DSpark GGUF; returns the path.

    Matrices are stored in ``dtype`` (``float16`` or ``float32``), norms and biases in float32
    (as llama.cpp's converter does). Raises ``ValueError`` with :func:`gguf_export_problems`
    when llama.cpp could not run the drafter. ``target_gguf``: the target model's GGUF, whose
    ``tokenizer.ggml.*`` metadata is copied (llama.cpp's converter likewise requires
    ``--target-model-dir``; llama.cpp checks draft/target vocab compatibility).
    """
    import gguf

    cfg = drafter.config
    problems = gguf_export_problems(cfg)
    if problems:
        raise ValueError("llama.cpp draft-dspark cannot load this drafter: " + "; ".join(problems))
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), GGUF_ARCH)
    w.add_name("DSpark drafter")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16"
                    else gguf.LlamaFileType.ALL_F32)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    # keys spelled out: the gguf wheel on PyPI (0.19) predates add_block_size / add_target_layers
    w.add_uint32(f"{GGUF_ARCH}.block_size", cfg.block_size)
    w.add_array(f"{GGUF_ARCH}.target_layers", [int(i) + 1 for i in cfg.target_layer_ids])
    w.add_bool(f"{GGUF_ARCH}.sample_from_anchor", True)
    w.add_bool(f"{GGUF_ARCH}.has_confidence_head", cfg.enable_confidence_head)
    _copy_tokenizer(w, target_gguf)
    w.add_mask_token_id(cfg.mask_token_id)
    matrix_dtype = np.float16 if dtype == "float16" else np.float32
    for name, t in drafter.state_dict().items():
        arr = t.detach().to(torch.float32).cpu().numpy()
        if arr.ndim >= 2:
            arr = arr.astype(matrix_dtype)
        w.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def export_drafter_dir(drafter_dir: str | Path, out_path: str | Path, target_gguf: str | Path,
                       dtype: str = "float16") -> Path:
    """:func:`export_gguf` for a checkpoint directory (config.json + model.safetensors).

    The target is not loaded: the GGUF holds no embedding or LM head, so stand-in shared modules
    of the config's shape are enough to build the drafter."""
    from torch import nn

    from dspark_sglang.speculative.dspark.checkpoint import load_dspark_checkpoint

    cfg = DSparkConfig.load(Path(drafter_dir) / "config.json")
    embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    drafter = load_dspark_checkpoint(drafter_dir, embed, lambda h: h)
    return export_gguf(drafter, out_path, target_gguf, dtype)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from dspark_sglang.models.default_model import default_model_path
    from dspark_sglang.speculative.dspark_worker import DEFAULT_DRAFTER_DIR

    ap = argparse.ArgumentParser(prog="python -m dspark_sglang.training.export_gguf",
                                 description="Write a DSpark drafter as llama.cpp's "
                                             "draft-dspark GGUF.")
    ap.add_argument("--drafter", default=str(DEFAULT_DRAFTER_DIR),
                    help="checkpoint directory (default: the shipped SmolLM2 drafter)")
    ap.add_argument("--target-gguf", default=None,
                    help="the target's GGUF, for its tokenizer (default: the embedded model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    a = ap.parse_args(argv)
    target = a.target_gguf or default_model_path()
    print(export_drafter_dir(a.drafter, a.out, target, a.dtype))


if __name__ == "__main__":
    main()
