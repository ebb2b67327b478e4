"""Triton kernels of dspark_sglang, installed under the import name ``dspark_kernels``.

Modules (each holds a Triton wrapper and a torch reference with the same signature):

- ``verify_attention``: attention of new tokens over a paged KV pool with a custom mask
  (``verify_attention``, ``verify_attention_ref``, ``mask_indptr_from_extend_lens``);
- ``kv_store``: scatter K/V into slots (``store_kv``, ``store_kv_ref``);
- ``bitmask``: grammar token bitmask on logits (``apply_token_bitmask_inplace``,
  ``apply_token_bitmask_inplace_ref``, ``unpack_token_bitmask``).

Draft acceptance has no kernel: ``dspark_sglang/speculative/verify.py`` is the one library the
spec decoder runs (vectorised torch, on whatever device the logits are).

Importing this package or any of those modules does not import triton: the ``@triton.jit``
kernels live in ``dspark_kernels.jit`` and are imported on the first Triton call. The torch
references run anywhere. Triton wrappers need CUDA tensors, or CPU tensors with
``TRITON_INTERPRET=1`` set before triton is imported (tests). This package imports nothing from
``dspark_sglang``.
"""

from __future__ import annotations

import importlib.util
import sys


def has_triton() -> bool:
    """Whether ``triton`` can be imported (checked without importing it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


__all__ = ["has_triton"]
