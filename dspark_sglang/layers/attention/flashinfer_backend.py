"""FlashInfer attention backend (CUDA only; ``flashinfer-python`` is an optional extra).

The KV pool is viewed as a paged cache with page size 1 (one slot = one page, NHD layout), so a
request's page indices are exactly its ``req_to_token`` row. Per forward, planned once in
``init_forward_metadata``:

- DECODE (one new token per request, no custom mask): ``BatchDecodeWithPagedKVCacheWrapper``;
- EXTEND without masks: ``BatchPrefillWithPagedKVCacheWrapper`` with
  ``causal=True`` (FlashInfer aligns the causal diagonal to the end of the KV, i.e. the whole
  prefix is visible);
- TARGET_VERIFY or any batch with ``custom_masks``: the same prefill wrapper with a flat custom
  mask of ``sum_i ext_i * seq_i`` booleans, row-major per request: prefix columns all True, then
  the request's ``[ext_i, ext_i]`` block (None = causal). FlashInfer packs it
  (``segment_packbits``, little bit order) inside ``plan``.

One workspace buffer is allocated at construction and shared by both wrappers. FlashInfer kernels
take fp16 / bf16 only: a float32 KV pool is refused with a clear error. ``sm_scale`` is fixed at
plan time; a layer asking for another scale gets its queries rescaled (exact up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode
from dspark_sglang.layers.attention.base import AttentionBackend
from dspark_sglang.mem_cache.kv_pool import KVPool

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def _import_flashinfer() -> Any:
    try:
        import flashinfer
    except ImportError as e:
        raise ImportError("attention_backend='flashinfer' needs the optional flashinfer-python "
                          "package (pip install 'flashinfer-python==0.7.2.post1')") from e
    return flashinfer


def build_verify_mask(
    custom_masks: list[torch.Tensor | None], seq_lens: list[int], extend_lens: list[int],
) -> torch.Tensor:
    """FlashInfer's flat custom mask (host bool ``[sum_i ext_i * seq_i]``): per request, rows =
    new tokens, columns = all keys; the prefix is visible, the new-token block is the request's
    mask (causal when None)."""
    parts: list[torch.Tensor] = []
    for cm, seq, ext in zip(custom_masks, seq_lens, extend_lens, strict=True):
        block = (torch.ones(ext, ext, dtype=torch.bool).tril() if cm is None
                 else cm.to(device="cpu", dtype=torch.bool))
        assert tuple(block.shape) == (ext, ext), (tuple(block.shape), ext)
        rows = torch.ones(ext, seq, dtype=torch.bool)
        rows[:, seq - ext :] = block
        parts.append(rows.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _indptr(lens: list[int], device: torch.device) -> torch.Tensor:
    """``[len(lens) + 1]`` int32 exclusive prefix sums."""
    return torch.cumsum(torch.tensor([0, *lens], dtype=torch.int32), 0, dtype=torch.int32).to(
        device)


@dataclass
class FlashInferMetadata:
    use_decode: bool
    out_cache_loc: torch.Tensor  # [num_tokens] int64 on the device
    qo_indptr: torch.Tensor  # [bs + 1] int32
    kv_indptr: torch.Tensor  # [bs + 1] int32
    kv_indices: torch.Tensor  # [sum(seq_lens)] int32 slot (= page) ids
    last_page_len: torch.Tensor  # [bs] int32, all ones (page size 1)
    custom_mask: torch.Tensor | None  # [sum ext_i * seq_i] bool on the device, or None
    planned: bool = False


class FlashInferAttnBackend(AttentionBackend):
    """``device``: the CUDA device of the KV pool (default ``cuda``). ``num_heads``,
    ``num_kv_heads``, ``head_dim`` and ``dtype`` let ``init_forward_metadata`` plan before layer
    0; when not given, the plan happens in layer 0's ``forward`` (still once per forward)."""

    def __init__(
        self, device: torch.device | str | None = None, num_heads: int | None = None,
        num_kv_heads: int | None = None, head_dim: int | None = None,
        dtype: torch.dtype | None = None, workspace_bytes: int = 256 << 20, **_: object,
    ) -> None:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("attention_backend='flashinfer' needs a CUDA device (FlashInfer "
                               "has no CPU kernels); on CPU use 'torch_native'")
        if dtype is not None and dtype not in _SUPPORTED_DTYPES:
            raise RuntimeError(f"attention_backend='flashinfer' supports float16/bfloat16, got "
                               f"{dtype}; use 'triton' or 'torch_native' for float32")
        self._fi = _import_flashinfer()
        self.device = dev
        self.heads = (num_heads, num_kv_heads, head_dim)
        self.dtype = dtype
        self.sm_scale: float | None = head_dim**-0.5 if head_dim else None
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
        self.prefill = self._fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        dev = self.device
        seq_lens = fb.seq_lens_list or [int(x) for x in fb.seq_lens.tolist()]
        ext_lens = fb.extend_lens_list or [int(x) for x in fb.extend_lens.tolist()]
        bs = len(seq_lens)
        max_kv = max(seq_lens) if seq_lens else 0
        r2t = fb.req_to_token
        rows = r2t[fb.req_pool_indices.to(r2t.device), :max_kv]  # [bs, max_kv]
        valid = torch.arange(max_kv, device=r2t.device)[None, :] < torch.tensor(
            seq_lens, device=r2t.device)[:, None]
        kv_indices = rows[valid].to(device=dev, dtype=torch.int32)  # row-major = per request
        use_decode = (fb.mode == ForwardMode.DECODE and fb.custom_masks is None
                      and all(e == 1 for e in ext_lens))
        custom_mask = None
        if fb.custom_masks is not None:
            custom_mask = build_verify_mask(fb.custom_masks, seq_lens, ext_lens).to(dev)
        fb.attn_metadata = FlashInferMetadata(
            use_decode=use_decode,
            out_cache_loc=fb.out_cache_loc.to(dev),
            qo_indptr=_indptr(ext_lens, dev),
            kv_indptr=_indptr(seq_lens, dev),
            kv_indices=kv_indices,
            last_page_len=torch.ones(bs, dtype=torch.int32, device=dev),
            custom_mask=custom_mask,
        )
        if None not in self.heads and self.dtype is not None:
            self._plan(fb.attn_metadata, self.dtype)

    def _plan(self, md: FlashInferMetadata, dtype: torch.dtype) -> None:
        num_heads, num_kv_heads, head_dim = self.heads
        assert num_heads is not None and num_kv_heads is not None and head_dim is not None
        if dtype not in _SUPPORTED_DTYPES:
            raise RuntimeError(f"attention_backend='flashinfer' supports float16/bfloat16 KV "
                               f"pools, got {dtype}; use 'triton' or 'torch_native'")
        if self.sm_scale is None:
            self.sm_scale = head_dim**-0.5
        if md.use_decode:
            self.decode.plan(
                md.kv_indptr, md.kv_indices, md.last_page_len, num_heads, num_kv_heads,
                head_dim, 1, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.sm_scale)
        else:
            self.prefill.plan(
                md.qo_indptr, md.kv_indptr, md.kv_indices, md.last_page_len, num_heads,
                num_kv_heads, head_dim, 1, custom_mask=md.custom_mask,
                causal=md.custom_mask is None, sm_scale=self.sm_scale, q_data_type=dtype,
                kv_data_type=dtype)
        md.planned = True

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        # q [num_tokens, heads, d]; k, v [num_tokens, kv_heads, d] -> [num_tokens, heads, d]
        md: FlashInferMetadata = fb.attn_metadata
        k_buf, v_buf = kv_pool.k_bufs[layer_id], kv_pool.v_bufs[layer_id]
        if not md.planned:
            if None in self.heads:
                self.heads = (q.shape[1], k_buf.shape[1], q.shape[2])
            self._plan(md, k_buf.dtype)
        kv_pool.store(layer_id, md.out_cache_loc, k, v)
        qc = q.to(k_buf.dtype)
        assert self.sm_scale is not None
        if sm_scale != self.sm_scale:  # planned with another scale: fold the ratio into q
            qc = qc * (sm_scale / self.sm_scale)
        cache = (k_buf.unsqueeze(1), v_buf.unsqueeze(1))  # [slots, page=1, kv_heads, d]
        wrapper = self.decode if md.use_decode else self.prefill
        out = wrapper.run(qc.contiguous(), cache)  # [num_tokens, heads, d]
        return out.to(q.dtype)
