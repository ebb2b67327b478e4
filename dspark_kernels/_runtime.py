"""Shared launch checks for the Triton wrappers (no triton import here)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on these tensors.

    CUDA tensors always can (given a GPU build of triton); CPU tensors only in the interpreter.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}); on CPU use the *_ref function "
            "or set TRITON_INTERPRET=1 before importing triton (tests only: slow)"
        )


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``tl.dot`` operands are upcast to fp32.

    fp32 inputs always (with IEEE precision, no TF32); everything in the interpreter, whose bf16
    ``tl.dot`` is wrong. On GPU, fp16/bf16 use tensor cores with fp32 accumulation.
    """
    return dtype == torch.float32 or device.type != "cuda"
