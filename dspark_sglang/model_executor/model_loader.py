"""Device / dtype resolution and target-model construction (below ``speculative/``).

Both the engine (``entrypoints/model_setup.py``), a STANDALONE draft worker and the
tensor-parallel follower ranks build models here; the class comes from ``models/registry.py``.
"""

from __future__ import annotations

import torch

from dspark_sglang.models.config import ModelConfig
from dspark_sglang.models.registry import model_class_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is visible, else ``cpu``; ``cuda`` without one
    raises ValueError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[dtype]


def build_target_model(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                       dtype: torch.dtype, device: str, max_positions: int) -> torch.nn.Module:
    """The registered model for ``config``, loaded from HF-named ``state_dict``, cast to
    ``dtype``, on ``device``, in eval mode (RoPE tables sized for ``max_positions``)."""
    model = model_class_for(config)(config, max_positions=max_positions)
    model.load_hf_state_dict(state_dict, dtype)
    return model.to(device).eval()
