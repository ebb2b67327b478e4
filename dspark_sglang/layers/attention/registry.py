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
    """Every accepted ``--attention-backend`` value (``auto`` picks one per machine)."""
    return ("auto", *_BACKENDS)


def resolve_attention_backend(name: str, device: str, dtype: Any) -> str:
    """``auto`` -> ``cpu`` on a CPU with a float32 KV pool when the C++ kernels build (decode
    1.1-2.1x faster than ``torch_native`` in the runs measured, docs/benchmarks.md), else
    ``torch_native``; any other name is returned unchanged."""
    if name != "auto":
        return name
    import torch

    if device == "cpu" and dtype == torch.float32:
        from dspark_kernels.cpu_ops import load_cpu_ops

        if load_cpu_ops() is not None:
            return "cpu"
    return "torch_native"


def attention_backend_class(name: str) -> Any:
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
