"""Load a checkpoint (HF safetensors dir or GGUF) into config + float32 state dict + tokenizer.

GGUF checkpoints are converted once (dequantised, renamed, un-permuted) and cached as an HF
directory (``model.safetensors``, ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``)
under ``$DSPARK_CACHE_DIR`` or ``~/.cache/dspark_sglang``, keyed by the source files' paths,
sizes and mtimes; later loads read the cache and need neither ``gguf`` nor ``transformers``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dspark_sglang.models.config import ModelConfig
from dspark_sglang.models.tokenizer import Tokenizer

CACHE_ENV_VAR = "DSPARK_CACHE_DIR"
_DONE_MARKER = "conversion_complete"


@dataclass
class LoadedModel:
    """Everything a model runner needs from disk.

    ``state_dict`` holds HF-named float32 CPU tensors. When ``config.tie_word_embeddings`` is set
    it has no ``lm_head.weight``: the model must reuse ``model.embed_tokens.weight``.
    """

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    model_path: str


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "dspark_sglang"


def _read_safetensors_dir(d: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in model_path {str(d)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            state[name] = t if t.dtype == torch.float32 else t.float()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _load_hf_dir(d: Path, model_path: str) -> LoadedModel:
    raw = json.loads((d / "config.json").read_text())
    config = ModelConfig.from_hf_dict(raw)
    gen = d / "generation_config.json"
    if gen.is_file():
        extra = json.loads(gen.read_text()).get("eos_token_id")
        extra_ids = extra if isinstance(extra, list) else ([] if extra is None else [extra])
        eos = list(config.eos_token_ids) + [int(i) for i in extra_ids
                                            if int(i) not in config.eos_token_ids]
        config = replace(config, eos_token_ids=tuple(eos))
    state = _read_safetensors_dir(d, config)
    return LoadedModel(config, state, Tokenizer.from_dir(d, config), model_path)


def convert_gguf_to_hf_dir(parts: list[Path], out_dir: Path) -> None:
    """Convert the GGUF checkpoint made of ``parts`` into an HF directory at ``out_dir``.

    Writes into a temporary sibling and renames it into place, so a crash never leaves a
    half-written cache that a later load would trust.
    """
    from safetensors.torch import save_file

    from dspark_sglang.models.gguf_loader import join_parts, load_gguf, write_gguf_tokenizer_files

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gguf_file = join_parts(parts, tmp / "joined.gguf")
        ckpt = load_gguf(gguf_file)
        save_file(ckpt.state_dict, str(tmp / "model.safetensors"))
        ckpt.config.save(tmp / "config.json")
        write_gguf_tokenizer_files(ckpt.metadata, gguf_file, tmp)
        (tmp / "joined.gguf").unlink(missing_ok=True)
        (tmp / _DONE_MARKER).write_text(json.dumps([str(p) for p in parts]))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_cache_dir(parts: list[Path], cache_dir: str | Path | None = None) -> Path:
    """Cache folder of a GGUF checkpoint: ``<cache_root>/<fingerprint of parts>``."""
    from dspark_sglang.models.gguf_loader import parts_fingerprint

    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return root / parts_fingerprint(parts)


def load_model_files(
    model_path: str | None, cache_dir: str | Path | None = None
) -> LoadedModel:
    """Load config, float32 weights and tokenizer from ``model_path``.

    ``model_path`` is an HF directory (``config.json`` + ``*.safetensors`` + ``tokenizer.json``),
    a ``.gguf`` file, a directory holding one, or a directory of byte-concatenated GGUF parts;
    None means the embedded default model. ``cache_dir`` overrides the GGUF cache root.
    Raises ValueError naming ``model_path`` when nothing loadable is there, and ValueError naming
    the architecture when it is not llama / qwen2 / qwen3.
    """
    from dspark_sglang.models.default_model import default_model_path
    from dspark_sglang.models.gguf_loader import gguf_parts

    if model_path is None:
        model_path = default_model_path()
    p = Path(model_path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return _load_hf_dir(p, model_path)
    parts = gguf_parts(p) if p.exists() else None
    if not parts:
        raise ValueError(
            f"model_path {model_path!r} is neither an HF model directory (config.json + "
            "*.safetensors) nor a GGUF checkpoint"
        )
    out = gguf_cache_dir(parts, cache_dir)
    if not (out / _DONE_MARKER).is_file():
        convert_gguf_to_hf_dir(parts, out)
    return _load_hf_dir(out, model_path)
