"""``--quantization gguf``: serve a GGUF checkpoint's linears (and LM head) on its own blocks.

After the float model is built, every projection whose GGUF tensors are in a format the CPU
kernels handle (``dspark_kernels.cpu_ops.GGML_BLOCKS``) is replaced by a
:class:`~dspark_sglang.layers.quantized_linear.GGUFLinear` holding the file's blocks next to the
float weight; the LM head too (from ``output.weight``, or from ``token_embd.weight`` when the
embeddings are tied). The drafter shares ``model.lm_head``, so it gets the quantised head when it
is built after this call. Nothing changes when the checkpoint is not GGUF or the extension
cannot be built.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from dspark_sglang.layers.linear import Linear
from dspark_sglang.layers.quantized_linear import GGUFLinear, GGUFWeight, choose_quant_rows
from dspark_sglang.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("none", "gguf")


def gguf_file_for(model_path: str, cache_dir: str | Path | None = None) -> Path | None:
    """The single GGUF file behind ``model_path`` (parts joined into the cache), or None."""
    from dspark_sglang.models.gguf_loader import gguf_parts, join_parts
    from dspark_sglang.models.loader import gguf_cache_dir

    p = Path(model_path).expanduser()
    parts = gguf_parts(p) if p.exists() else None
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return join_parts(parts, gguf_cache_dir(parts, cache_dir) / "joined.gguf")


def _weights(blocks: dict[str, object], names: list[str]) -> list[GGUFWeight] | None:
    if not all(n in blocks for n in names):
        return None
    return [GGUFWeight(blocks[n].ggml_type, blocks[n].data, blocks[n].shape[1])  # type: ignore
            for n in names]


def apply_gguf_quantization(model: LlamaForCausalLM, model_path: str,
                            cache_dir: str | Path | None = None) -> int:
    """Replace the model's linears by GGUF-block ones where possible; returns how many.

    The model must be float32 on CPU. Layers whose tensors are not all in supported formats
    keep their float path.
    """
    from dspark_kernels.cpu_ops import GGML_BLOCKS, load_cpu_ops
    from dspark_sglang.models.gguf_loader import load_gguf_blocks

    path = gguf_file_for(model_path, cache_dir)
    if path is None:
        logger.info("quantization=gguf: %s is not a GGUF checkpoint; float32 weights", model_path)
        return 0
    ops = load_cpu_ops()
    if ops is None:
        logger.warning("quantization=gguf: CPU kernels unavailable; float32 weights")
        return 0
    blocks = load_gguf_blocks(path, set(GGML_BLOCKS))
    replaced: list[GGUFLinear] = []

    def swap(owner: nn.Module, attr: str, names: list[str]) -> None:
        base = getattr(owner, attr)
        parts = _weights(blocks, names)
        if parts is None or not isinstance(base, Linear):
            return
        new = GGUFLinear(base, parts, ops)
        setattr(owner, attr, new)
        replaced.append(new)

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        swap(layer, "qkv_proj", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"])
        swap(layer, "o_proj", [a + "o_proj.weight"])
        swap(layer, "gate_up_proj", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        swap(layer, "down_proj", [p + "mlp.down_proj.weight"])
    head = "lm_head.weight" if "lm_head.weight" in blocks else "model.embed_tokens.weight"
    if head == "lm_head.weight" or model.config.tie_word_embeddings:
        swap(model, "lm_head", [head])
    for layer in replaced:  # the Q8 kernel's layout, made now rather than in the first step
        layer.pack()
    rows = choose_quant_rows(replaced)
    logger.info("quantization=gguf: %d linears on GGUF blocks (%s); rows on the block kernel per "
                "shape: %s", len(replaced), ops.isa(), sorted(set(rows.values())))
    return len(replaced)
