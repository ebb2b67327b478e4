"""CUDA graphs for decode batches and fixed verify shapes (Triton attention backend only).

A graph replays one model forward over static buffers. A shape is ``(mode, padded_bs, q_len)``:
DECODE batches (``q_len == 1``) are padded up to the next size in ``capture_bs``; TARGET_VERIFY
batches run when every request has the same ``q_len`` (one of ``verify_lens``), with or without
custom masks (their content changes per replay, their size does not). Graphs are captured lazily
on the first batch of a shape (``capture_decode`` captures the decode sizes up front).

Per replay, outside the graph: the new tokens, positions and slots are copied into the static
buffers; the rows of ``req_to_token`` the batch reads are copied into a static device table
``[padded_bs, max_context]`` (so the host-side table can stay where the cache manager keeps it);
the flat custom mask is copied. Padding requests have ``seq_len = extend_len = 0`` (the kernel
skips them) and write their K/V to slot 0, the allocator's padding slot.

Results (``ModelOutput`` tensors) are views of the graph's static outputs: valid until the next
replay of any graph of this runner; clone them to keep them longer.

Wiring (in ``ModelRunner.forward``)::

    if self.graphs.can_run(fb):
        return self.graphs.replay(fb)

``use_graphs=False`` runs the same static-buffer path eagerly (no capture): tests use it on CPU
with the Triton interpreter to check padding and buffer bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput
from dspark_sglang.layers.attention.base import AttentionBackend
from dspark_sglang.mem_cache.kv_pool import KVPool

DEFAULT_CAPTURE_BS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class _PrebuiltMetadata(AttentionBackend):
    """Delegates ``forward`` to the real backend; ``init_forward_metadata`` keeps the static
    metadata already on the ForwardBatch (it is refreshed outside the graph)."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        assert fb.attn_metadata is not None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
        fb: ForwardBatch, kv_pool: KVPool, sm_scale: float,
    ) -> torch.Tensor:
        return self.inner.forward(q, k, v, layer_id, fb, kv_pool, sm_scale)


@dataclass
class _Graph:
    fb: ForwardBatch  # static buffers (on the device); attn_metadata is the static metadata
    kv_table: torch.Tensor  # [bs, max_context] int64, the static req_to_token the kernel reads
    graph: Any  # torch.cuda.CUDAGraph, or None when use_graphs=False
    output: ModelOutput | None  # static outputs of the captured forward
    bs: int
    q_len: int


class CudaGraphRunner:
    """Captures and replays forwards of fixed shapes for one ``ModelRunner``.

    ``model_runner`` needs ``.model``, ``.kv_pool``, ``.attn`` (a ``TritonAttnBackend``) and
    ``.device``. ``enabled`` is False (and ``can_run`` always False) on CPU, when ``disable`` is
    set, or with another attention backend.
    """

    def __init__(
        self, model_runner: Any, capture_bs: tuple[int, ...] = DEFAULT_CAPTURE_BS,
        verify_lens: tuple[int, ...] = (), max_context: int = 4096, disable: bool = False,
        use_graphs: bool = True,
    ) -> None:
        from dspark_sglang.layers.attention.triton_backend import TritonAttnBackend

        self.runner = model_runner
        self.device = torch.device(model_runner.device)
        self.capture_bs = tuple(sorted(set(capture_bs)))
        self.verify_lens = tuple(verify_lens)
        self.max_context = max_context
        self.use_graphs = use_graphs
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.enabled = (not disable and isinstance(model_runner.attn, TritonAttnBackend)
                        and (on_cuda or not use_graphs))
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.enabled and use_graphs else None
        self.num_replays = 0

    # ---- selection -------------------------------------------------------------------------
    def _padded_bs(self, bs: int) -> int | None:
        return next((b for b in self.capture_bs if b >= bs), None)

    def _key(self, fb: ForwardBatch) -> tuple[Any, ...] | None:
        ext = fb.extend_lens_list
        if not ext or fb.logits_indices is not None or max(fb.seq_lens_list) > self.max_context:
            return None
        q_len = ext[0]
        if any(e != q_len for e in ext):
            return None
        is_decode = fb.mode == ForwardMode.DECODE and q_len == 1 and fb.custom_masks is None
        is_verify = fb.mode == ForwardMode.TARGET_VERIFY and q_len in self.verify_lens
        if not (is_decode or is_verify):
            return None
        bs = self._padded_bs(fb.batch_size)
        if bs is None:
            return None
        return (fb.mode, bs, q_len, fb.custom_masks is not None, fb.capture_layer_ids,
                fb.capture_final_hidden)

    def can_run(self, fb: ForwardBatch) -> bool:
        """Whether ``replay(fb)`` applies: graphs enabled and a capturable shape."""
        return self.enabled and self._key(fb) is not None

    # ---- capture ---------------------------------------------------------------------------
    def capture_decode(self) -> None:
        """Capture every DECODE size in ``capture_bs`` now (server start)."""
        for bs in self.capture_bs:
            self._get((ForwardMode.DECODE, bs, 1, False, (), False))

    def _get(self, key: tuple[Any, ...]) -> _Graph:
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        return self._graphs[key]

    def _capture(self, mode: ForwardMode, bs: int, q_len: int, has_mask: bool,
                 capture_layer_ids: tuple[int, ...], capture_final_hidden: bool) -> _Graph:
        from dspark_sglang.layers.attention.triton_backend import TritonAttnMetadata

        dev, n = self.device, bs * q_len

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=dev)

        kv_table = zeros(bs, self.max_context)
        ext = torch.full((bs,), q_len, dtype=torch.int64)
        md = TritonAttnMetadata(
            req_to_token=kv_table,
            req_pool_indices=torch.arange(bs, dtype=torch.int64, device=dev),
            seq_lens=zeros(bs),  # all padding until a replay fills them
            extend_lens=zeros(bs),
            extend_start=(torch.arange(bs, dtype=torch.int64) * q_len).to(dev),
            out_cache_loc=zeros(n),
            custom_mask=torch.zeros(n * q_len, dtype=torch.bool, device=dev) if has_mask
            else None,
            mask_indptr=torch.cat([zeros(1).cpu(), torch.cumsum(ext * q_len, 0)]).to(dev)
            if has_mask else None,
            max_extend_len=q_len,
        )
        fb = ForwardBatch(
            mode=mode, input_ids=zeros(n), positions=zeros(n), out_cache_loc=md.out_cache_loc,
            req_pool_indices=md.req_pool_indices, seq_lens=md.seq_lens,
            extend_lens=md.extend_lens, req_to_token=kv_table, custom_masks=None,
            capture_layer_ids=capture_layer_ids, capture_final_hidden=capture_final_hidden,
            attn_metadata=md, seq_lens_list=[q_len] * bs, extend_lens_list=[q_len] * bs,
        )
        entry = _Graph(fb=fb, kv_table=kv_table, graph=None, output=None, bs=bs, q_len=q_len)
        if not self.use_graphs:
            return entry
        model, pool, attn = self.runner.model, self.runner.kv_pool, _PrebuiltMetadata(
            self.runner.attn)
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up: Triton autotune / JIT and allocator state
                model(fb, attn, pool)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            entry.output = model(fb, attn, pool)
        entry.graph = graph
        return entry

    # ---- replay ----------------------------------------------------------------------------
    def replay(self, fb: ForwardBatch) -> ModelOutput:
        """Run ``fb`` through its graph (capturing it on first use); see the module docstring
        for how long the returned tensors stay valid."""
        key = self._key(fb)
        if not self.enabled or key is None:
            raise ValueError("this ForwardBatch cannot run as a CUDA graph (check can_run)")
        g = self._get(key)
        self._fill(g, fb)
        self.num_replays += 1
        if g.graph is None:  # eager static path (use_graphs=False)
            with torch.inference_mode():
                out = self.runner.model(g.fb, _PrebuiltMetadata(self.runner.attn),
                                        self.runner.kv_pool)
        else:
            g.graph.replay()
            out = g.output
            assert out is not None
        n = fb.num_tokens
        return replace(
            out,
            logits=None if out.logits is None else out.logits[:n],
            aux_hidden=None if out.aux_hidden is None else out.aux_hidden[:n],
            final_hidden=None if out.final_hidden is None else out.final_hidden[:n],
        )

    def _fill(self, g: _Graph, fb: ForwardBatch) -> None:
        md = g.fb.attn_metadata
        bs, n = fb.batch_size, fb.num_tokens
        seqs = fb.seq_lens_list
        max_kv = max(seqs)
        rows = fb.req_to_token[fb.req_pool_indices.to(fb.req_to_token.device), :max_kv]
        g.kv_table[:bs, :max_kv].copy_(rows, non_blocking=True)  # [bs, max_kv]
        g.fb.input_ids[:n].copy_(fb.input_ids, non_blocking=True)
        g.fb.positions[:n].copy_(fb.positions, non_blocking=True)
        md.out_cache_loc[:n].copy_(fb.out_cache_loc, non_blocking=True)
        md.seq_lens[:bs].copy_(fb.seq_lens, non_blocking=True)
        md.extend_lens[:bs].copy_(fb.extend_lens, non_blocking=True)
        if n < g.fb.num_tokens:  # padding requests: nothing to attend, K/V to slot 0
            g.fb.input_ids[n:].zero_()
            g.fb.positions[n:].zero_()
            md.out_cache_loc[n:].zero_()
            md.seq_lens[bs:].zero_()
            md.extend_lens[bs:].zero_()
        if md.custom_mask is not None:
            from dspark_sglang.layers.attention.triton_backend import build_flat_custom_mask

            assert fb.custom_masks is not None
            flat = build_flat_custom_mask(fb.custom_masks, fb.extend_lens_list, torch.device(
                "cpu"))
            md.custom_mask[: flat.numel()].copy_(flat, non_blocking=True)
