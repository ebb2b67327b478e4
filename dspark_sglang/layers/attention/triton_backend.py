"""Triton attention backend: ``dspark_kernels.store_kv`` + ``verify_attention`` for every mode.

One kernel serves EXTEND (causal over the new tokens, whole prefix visible), DECODE (one new token,
the causal case with ``extend_len == 1``) and TARGET_VERIFY (per-request custom
masks for chains and trees). ``init_forward_metadata`` builds, once per forward, the per-request
offsets and the flat custom mask (``[sum_i ext_i^2]``, row-major per request) on the device of the
KV pool; ``forward`` then launches two kernels per layer and reads nothing on the host.

This module is only imported through the backend registry, and it imports triton only on the
first kernel launch (inside ``dspark_kernels``). Kernels need CUDA tensors, or CPU tensors with
``TRITON_INTERPRET=1`` set before triton is imported (tests; slow).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from dspark_sglang.core.forward_batch import ForwardBatch
from dspark_sglang.layers.attention.base import AttentionBackend
from dspark_sglang.mem_cache.kv_pool import KVPool


def load_dspark_kernels() -> ModuleType:
    """The ``dspark_kernels`` package (installed beside ``dspark_sglang``, or the checkout's
    folder of that name, found through the same ``sys.path`` entry).

    Never imports triton (``dspark_kernels`` defers it to the first kernel launch).
    """
    return importlib.import_module("dspark_kernels")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_triton_usable(device: torch.device | str | None) -> None:
    """Raise a clear error when Triton kernels cannot run on ``device`` (None = this machine's
    default: CUDA when available)."""
    kernels = load_dspark_kernels()
    if not kernels.has_triton():
        raise RuntimeError("attention_backend='triton' needs the triton package (not importable)")
    dev = torch.device(device) if device is not None else None
    on_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    if not on_cuda and not _interpreting():
        raise RuntimeError(
            "attention_backend='triton' needs a CUDA device; on CPU use 'torch_native' (or set "
            "TRITON_INTERPRET=1 before triton is imported: tests only, very slow)")


def build_flat_custom_mask(
    custom_masks: list[torch.Tensor | None], extend_lens: list[int], device: torch.device,
) -> torch.Tensor:
    """Concatenate per-request ``[ext_i, ext_i]`` masks row-major into ``[sum_i ext_i^2]`` bool.

    A request without a mask (None) gets the causal block (lower triangle).
    """
    parts: list[torch.Tensor] = []
    for cm, ext in zip(custom_masks, extend_lens, strict=True):
        if cm is None:
            block = torch.ones(ext, ext, dtype=torch.bool).tril()
        else:
            assert tuple(cm.shape) == (ext, ext), (tuple(cm.shape), ext)
            block = cm.to(device="cpu", dtype=torch.bool)
        parts.append(block.reshape(-1))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    return flat.to(device)


@dataclass
class TritonAttnMetadata:
    """Per-forward kernel arguments, all on the KV pool's device."""

    req_to_token: torch.Tensor  # [rows, width] int64: fb.req_to_token, or a compact gather
    req_pool_indices: torch.Tensor  # [bs] int64, rows of req_to_token above
    seq_lens: torch.Tensor  # [bs] int64
    extend_lens: torch.Tensor  # [bs] int64
    extend_start: torch.Tensor  # [bs] int64, first row of each request in q
    out_cache_loc: torch.Tensor  # [num_tokens] int64
    custom_mask: torch.Tensor | None  # [sum_i ext_i^2] bool, None = causal for everyone
    mask_indptr: torch.Tensor | None  # [bs + 1] int64
    max_extend_len: int


class TritonAttnBackend(AttentionBackend):
    """Attention through the ``dspark_kernels`` Triton kernels (CUDA; CPU only when interpreting).

    ``device``: where the KV pool lives (default: CUDA when available). ``fb`` tensors may live
    on the host: the metadata is copied to ``device`` once per forward. When ``fb.req_to_token``
    already lives on ``device`` it is used in place (no gather), which CUDA graphs rely on.
    """

    def __init__(self, device: torch.device | str | None = None, **_: object) -> None:
        check_triton_usable(device)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        kernels = load_dspark_kernels()
        self._va = importlib.import_module(f"{kernels.__name__}.verify_attention")
        self._kvs = importlib.import_module(f"{kernels.__name__}.kv_store")

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = self.device
        seq_lens = fb.seq_lens_list or [int(x) for x in fb.seq_lens.tolist()]
        ext_lens = fb.extend_lens_list or [int(x) for x in fb.extend_lens.tolist()]
        starts = [0] * len(ext_lens)
        for i in range(1, len(ext_lens)):
            starts[i] = starts[i - 1] + ext_lens[i - 1]
        if fb.req_to_token.device == device:
            r2t, rows = fb.req_to_token, fb.req_pool_indices.to(device)
        else:  # host table: gather only the rows and columns this forward reads
            max_kv = max(seq_lens) if seq_lens else 0
            gathered = fb.req_to_token[fb.req_pool_indices.to(fb.req_to_token.device), :max_kv]
            r2t = gathered.to(device)  # [bs, max_kv]
            rows = torch.arange(len(seq_lens), dtype=torch.int64, device=device)
        custom_mask = mask_indptr = None
        if fb.custom_masks is not None:
            custom_mask = build_flat_custom_mask(fb.custom_masks, ext_lens, device)
            sizes = torch.tensor([0] + [e * e for e in ext_lens], dtype=torch.int64)
            mask_indptr = torch.cumsum(sizes, 0).to(device)
        fb.attn_metadata = TritonAttnMetadata(
            req_to_token=r2t,
            req_pool_indices=rows,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device),
            extend_lens=torch.tensor(ext_lens, dtype=torch.int64).to(device),
            extend_start=torch.tensor(starts, dtype=torch.int64).to(device),
            out_cache_loc=fb.out_cache_loc.to(device),
            custom_mask=custom_mask,
            mask_indptr=mask_indptr,
            max_extend_len=max(ext_lens) if ext_lens else 0,
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        # q [num_tokens, heads, d]; k, v [num_tokens, kv_heads, d] -> [num_tokens, heads, d]
        md: TritonAttnMetadata = fb.attn_metadata
        k_buf, v_buf = kv_pool.k_bufs[layer_id], kv_pool.v_bufs[layer_id]
        self._kvs.store_kv(k_buf, v_buf, md.out_cache_loc, k, v)
        qc = q if q.dtype == k_buf.dtype and q.stride(2) == 1 else q.to(k_buf.dtype).contiguous()
        out = self._va.verify_attention(
            qc, k_buf, v_buf, md.req_to_token, md.req_pool_indices, md.seq_lens,
            md.extend_lens, md.extend_start, md.custom_mask, md.mask_indptr, sm_scale,
            max_extend_len=md.max_extend_len,
        )
        return out if out.dtype == q.dtype else out.to(q.dtype)
