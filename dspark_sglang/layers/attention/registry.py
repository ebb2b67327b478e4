"""Attention backend names -> classes, imported on first use.

Importing this module imports nothing heavy (no torch, triton or flashinfer), so ``ServerArgs``
can list the names; ``base.create_attention_backend`` builds one.
"""

from __future__ import annotations

import importlib
from typing import Any

_BACKENDS: dict[str, str] = {
    "torch_native": "dspark_sglang.layers.attention.torch_native:TorchNativeAttnBackend",
    "cpu": "dspark_sglang.layers.attention.cpu_paged:CpuPagedAttnBackend",
    "triton": "dspark_sglang.layers.attention.triton_backend:TritonAttnBackend",
    "flashinfer": "dspark_sglang.layers.attention.flashinfer_backend:FlashInferAttnBackend",
}


def register_attention_backend(name: str, target: str) -> None:
    """``target`` is ``"package.module:Class"``, an ``AttentionBackend`` built with keywords."""
    if ":" not in target:
        raise ValueError(f"attention backend target must be 'module:Class', got {target!r}")
    _BACKENDS[name] = target


def attention_backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def attention_backend_class(name: str) -> Any:
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
