"""A :class:`~dspark_sglang.layers.linear.Linear` whose few-row products run on GGUF blocks.

``GGUFLinear`` keeps the float32 ``weight`` of the layer it replaces (so ``lm_head.weight``,
state dicts and training keep working unchanged) and adds the checkpoint's own quantised rows
(one or more parts stacked along the output dimension, e.g. q/k/v of a fused projection, each in
its own GGUF format; parts sharing one format are merged into one block matrix). Inputs of
at most ``max_quant_rows`` rows on CPU in float32 without autograd are computed by the C++
kernel ``dspark_kernels.cpu_ops`` on the blocks, which streams 4-8x fewer weight bytes;
everything else goes through the float32 path. A row's result does not depend on how many
rows are in the call, so decode and verification of the same tokens compute the same logits.

Two block kernels: Q4_0 / Q4_1 / Q8_0 parts use ``gguf_matmul_q8``, which quantises the activation
rows to Q8 blocks of 32 as llama.cpp does and takes integer dot products (its result equals a
float32 matmul of those Q8 activations with the dequantised weights, to float rounding);
K-quant parts use ``gguf_matmul``, which dequantises the weights to float32 (result equals a
float32 matmul on the dequantised weights). ``DSPARK_GGUF_ACT_Q8=0`` keeps float32 activations
for every format.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dspark_sglang.layers.linear import Linear, linear
from dspark_sglang.utils.env import env_on

# rows up to which the float-activation block kernel may be used (decode / verify / draft sizes)
MAX_QUANT_ROWS = 32
# the kernels take at most this many rows per call; longer inputs go in chunks
KERNEL_ROWS = 64
# max_quant_rows of a layer whose every part has the Q8-activation kernel: all rows
ALL_ROWS = 1 << 62
# ggml types with a Q8-activation integer kernel (Q4_0, Q4_1, Q8_0)
Q8_ACT_TYPES = frozenset({2, 3, 8})

_local = threading.local()


@contextmanager
def float_weights() -> Iterator[None]:
    """Within this block, this thread's ``GGUFLinear`` calls take the float32 path. The model
    runner wraps prefill (EXTEND) forwards in it only with ``DSPARK_FLOAT_PREFILL=1``: the
    float32 GEMM on many rows is about 2x faster than the block kernels (bench_offline), but its
    rows depend on the batch, so by default prefill stays on the blocks like decode and
    verification (row-independent forwards)."""
    prev = getattr(_local, "float", False)
    _local.float = True
    try:
        yield
    finally:
        _local.float = prev


def float_weights_active() -> bool:
    """This thread is inside :func:`float_weights`."""
    return bool(getattr(_local, "float", False))


def act_q8_enabled() -> bool:
    """``DSPARK_GGUF_ACT_Q8`` (default on): Q8 activations for Q4_0 / Q4_1 / Q8_0 parts."""
    return env_on("DSPARK_GGUF_ACT_Q8")


@dataclass(frozen=True)
class GGUFWeight:
    """One weight in a GGUF block format: ``data [out_features, row_bytes]`` uint8."""

    ggml_type: int
    data: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])


# bumped whenever what a GGUFLinear computes with may change (its parts, kernel plan, weight,
# activation mode or row limit) and when a decoder layer swaps a submodule: a C++ DecoderStack
# built from the projections (models/llama.py) is current while this number is unchanged
_generation = [0]
_WATCHED = frozenset({"parts", "_plan", "_packed_for", "act_q8", "max_quant_rows", "weight",
                      "bias"})


def linear_generation() -> int:
    return _generation[0]


def bump_linear_generation() -> None:
    _generation[0] += 1


class GGUFLinear(Linear):
    """Drop-in for a float ``Linear`` (same parameters) with GGUF block parts for few rows."""

    def __init__(self, base: Linear, parts: list[GGUFWeight], ops: object) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")
        self.weight = base.weight  # shared (tied embeddings stay tied)
        self.bias = base.bias
        if sum(p.out_features for p in parts) != base.out_features:
            raise ValueError("GGUF parts do not add up to the layer's output features")
        if any(p.in_features != base.in_features for p in parts):
            raise ValueError("GGUF parts do not match the layer's input features")
        if len(parts) > 1 and len({p.ggml_type for p in parts}) == 1:
            # parts in one format (q/k/v, gate/up of most checkpoints): one block matrix, one
            # kernel call (one parallel region) instead of one per part
            parts = [GGUFWeight(parts[0].ggml_type, torch.cat([p.data for p in parts]),
                                parts[0].in_features)]
        self.parts = parts
        self.ops = ops
        self._has_bias = base.bias is not None
        # the kernel calls of quant_forward (made by pack, on first use at the latest) and the
        # (act_q8, parts) they were made for
        self._plan: list[tuple[object, torch.Tensor, int, int]] = []
        self._packed_for: tuple[object, ...] = ()
        self.max_quant_rows = MAX_QUANT_ROWS
        self.act_q8 = act_q8_enabled()

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in _WATCHED:
            _generation[0] += 1

    def all_parts_q8(self) -> bool:
        """Every part runs the Q8-activation integer kernel."""
        return self.act_q8 and all(p.ggml_type in Q8_ACT_TYPES for p in self.parts)

    def quant_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d [m, in] float32 contiguous -> [m, out] on the blocks (no bias), in calls of at
        most ``KERNEL_ROWS`` rows (a row's result does not depend on the call's rows)."""
        m = x2d.shape[0]
        out = torch.empty(m, self.out_features, dtype=torch.float32)
        plan = self.plan()
        if m <= KERNEL_ROWS:
            for kernel, w, ggml_type, col in plan:
                kernel(x2d, w, ggml_type, out, col)
            return out
        for r0 in range(0, m, KERNEL_ROWS):
            xs, ys = x2d[r0:r0 + KERNEL_ROWS], out[r0:r0 + KERNEL_ROWS]
            for kernel, w, ggml_type, col in plan:
                kernel(xs, w, ggml_type, ys, col)
        return out

    def plan(self) -> list[tuple[object, torch.Tensor, int, int]]:
        """The kernel calls of :meth:`quant_forward`: per part (kernel, weight, ggml type,
        first output column), made by :meth:`pack` when missing or stale."""
        return self._plan if self._packed_for == (self.act_q8, id(self.parts)) else self.pack()

    def pack(self) -> list[tuple[object, torch.Tensor, int, int]]:
        """Repack the Q8-kernel parts (Q4_0 / Q4_1 / Q8_0 with ``act_q8``) into the layout the
        kernel reads (same bytes, once; the file-layout ``parts`` stay for slicing) and make the
        call plan: per part (kernel, weight, ggml type, first output column)."""
        from dspark_kernels.hugepages import to_hugepages

        ops = self.ops
        plan, col = [], 0
        for p in self.parts:
            if self.act_q8 and p.ggml_type in Q8_ACT_TYPES:
                # on 2 MiB pages: every decode step streams these (dspark_kernels/hugepages.py)
                packed = to_hugepages(ops.gguf_repack_q8(p.data, p.ggml_type))  # type: ignore
                plan.append((ops.gguf_matmul_q8, packed, p.ggml_type, col))  # type: ignore
            else:
                plan.append((ops.gguf_matmul, p.data, p.ggml_type, col))  # type: ignore
            col += p.out_features
        self._plan = plan
        self._packed_for = (self.act_q8, id(self.parts))
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        if (0 < m <= self.max_quant_rows and x.dtype == torch.float32 and x.is_cpu
                and not (x.requires_grad and torch.is_grad_enabled())
                and not getattr(_local, "float", False)):
            y = self.quant_forward(x if x.dim() == 2 and x.is_contiguous()
                                   else x.reshape(m, k).contiguous())
            if self._has_bias:
                y += self.bias
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        return linear(x, self.weight, self.bias)

    def quant_bytes(self) -> int:
        return sum(p.data.numel() for p in self.parts)


def q8_linear(base: Linear, ops: object, max_rows: int = KERNEL_ROWS,
              qtype: str = "Q8_0") -> GGUFLinear:
    """``base`` (float32, ``in_features`` a multiple of 32) also on GGUF blocks of ``qtype``
    (Q8_0, Q4_0 or Q4_1: the Q8 kernel's formats) quantised from its weight by gguf-py's
    reference quantiser: for the float linears of a model that runs next to a GGUF-block target
    (the DSpark drafter), at most ``max_rows`` rows on the Q8 kernel."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ValueError(f"q8_linear takes Q8_0, Q4_0 or Q4_1, not {qtype!r}")
    t = GGMLQuantizationType[qtype]
    w = base.weight.detach().to(torch.float32).cpu().numpy()
    data = torch.from_numpy(quantize(w, t))
    layer = GGUFLinear(base, [GGUFWeight(int(t), data, base.in_features)], ops)
    layer.act_q8 = True
    layer.max_quant_rows = max_rows
    return layer


def q8_linear_of(weight: torch.Tensor, ops: object, max_rows: int = KERNEL_ROWS,
                 qtype: str = "Q8_0") -> GGUFLinear:
    """:func:`q8_linear` of a bias-free linear whose weight ``[out, in]`` is ``weight``."""
    base = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    base.weight = torch.nn.Parameter(weight.detach().float(), requires_grad=False)
    return q8_linear(base, ops, max_rows, qtype)


def subset_rows(layer: GGUFLinear, rows: torch.Tensor) -> GGUFLinear | None:
    """A ``GGUFLinear`` of ``layer``'s output rows ``rows`` (its blocks, not re-quantised), or
    None when ``layer`` has several parts (the LM head has one)."""
    if len(layer.parts) != 1:
        return None
    part = layer.parts[0]
    base = Linear(layer.in_features, int(rows.numel()), bias=False, device="meta")
    base.weight = torch.nn.Parameter(layer.weight.detach()[rows].contiguous(),
                                     requires_grad=False)
    sub = GGUFLinear(base, [GGUFWeight(part.ggml_type, part.data[rows].contiguous(),
                                       part.in_features)], layer.ops)
    sub.act_q8 = layer.act_q8
    sub.max_quant_rows = layer.max_quant_rows
    return sub


def _time(fn: object, reps: int) -> float:
    fn()  # type: ignore[operator]
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def choose_quant_rows(layers: list[GGUFLinear]) -> dict[tuple[object, ...], int]:
    """Set each layer's ``max_quant_rows``: the row counts that run on its blocks.

    Layers whose parts all have the Q8-activation kernel use it for every row count
    (``ALL_ROWS``): measured inside decode steps it beats the float32 path (bench_step), its
    integer dot products keep it ahead at many rows, and one path for every batch makes
    speculative and plain greedy decoding compute identical logits at any load. Other layers
    (K-quants on the float-activation kernel): per distinct shape, time the block kernel
    against the float32 path on 1 and ``MAX_QUANT_ROWS`` rows and use ``MAX_QUANT_ROWS`` where
    the kernel is faster in total, else 0 (float32 for every row count); a layer uses one path
    for every row count up to ``MAX_QUANT_ROWS``. ``DSPARK_GGUF_MAX_ROWS=<n>`` skips all of
    this and uses ``n`` for every layer. Returns {shape key: chosen rows}.
    """
    forced = os.environ.get("DSPARK_GGUF_MAX_ROWS")
    chosen: dict[tuple[object, ...], int] = {}
    for layer in layers:
        key = (layer.in_features, tuple((p.ggml_type, p.out_features) for p in layer.parts))
        if forced is not None:
            chosen[key] = int(forced)
        elif layer.all_parts_q8():
            chosen[key] = ALL_ROWS
        elif key not in chosen:
            with torch.no_grad():
                t_q = t_f = 0.0
                for m in (1, MAX_QUANT_ROWS):
                    x = torch.randn(m, layer.in_features)
                    reps = max(1, min(20, (4 << 20) // max(layer.quant_bytes(), 1)))
                    t_q += _time(lambda x=x, f=layer.quant_forward: f(x), reps)
                    t_f += _time(lambda x=x, w=layer.weight: linear(x, w), reps)
            chosen[key] = MAX_QUANT_ROWS if t_q < t_f else 0
        layer.max_quant_rows = chosen[key]
    return chosen
