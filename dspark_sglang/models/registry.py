"""Model registry: HF ``architectures`` name -> model class, imported on first use.

Adding a model is one file under ``models/`` plus one ``register_model`` line here. The config
loader (``models/config.py``) maps a checkpoint's ``architectures[0]`` to a family;
``ModelConfig.hf_architecture`` names the registry entry that serves it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspark_sglang.models.config import ModelConfig

_MODELS: dict[str, str] = {}


def register_model(architecture: str, target: str) -> None:
    """Register ``"package.module:Class"`` for an HF architecture name (last registration wins).

    The class is built as ``Class(config, max_positions=...)`` and must offer
    ``load_hf_state_dict(state_dict, dtype)``, ``local_head_counts()`` and
    ``forward(fb, attn, kv_pool) -> ModelOutput`` (see ``models/llama.py``).
    """
    if ":" not in target:
        raise ValueError(f"model target must be 'module:Class', got {target!r}")
    _MODELS[architecture] = target


register_model("LlamaForCausalLM", "dspark_sglang.models.llama:LlamaForCausalLM")
register_model("MistralForCausalLM", "dspark_sglang.models.llama:LlamaForCausalLM")
register_model("Qwen2ForCausalLM", "dspark_sglang.models.llama:LlamaForCausalLM")
register_model("Qwen3ForCausalLM", "dspark_sglang.models.llama:LlamaForCausalLM")


def model_architectures() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def get_model_class(architecture: str) -> Any:
    """The class registered for ``architecture`` (imports its module on first use)."""
    if architecture not in _MODELS:
        raise ValueError(f"no model registered for architecture {architecture!r}; "
                         f"registered: {', '.join(model_architectures())}")
    module, cls = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module), cls)


def model_class_for(config: ModelConfig) -> Any:
    return get_model_class(config.hf_architecture)
