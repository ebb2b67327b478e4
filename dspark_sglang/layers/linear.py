"""``nn.Linear`` with a faster CPU float32 path for the few-row matmuls of decode and verify.

Measured on this project's CPU box (AVX2, 2 threads, torch 2.13 CPU): ``F.linear`` on 1-8 rows
streams a large weight at about half the speed of the transposed product ``W @ X^T`` (the weight
as the GEMM's left operand, the few rows as its narrow right operand), and a single row takes a
matrix-vector path that is slower still; on SmolLM2-135M's 540 MB of fp32 weights a one-row pass
took 54 ms with ``F.linear`` and 26 ms as ``W @ [x, x]^T``, a two-row pass 89 ms vs 19 ms
(``docs/benchmarks.md``, "matmul shape"). So for at most ``SMALL_ROWS`` rows on CPU in float32
the product is computed as ``(W @ X^T)^T``, a single row duplicated into two columns; larger
inputs (prefill, training) and other devices / dtypes keep ``F.linear``. Results agree with
``F.linear`` to float32 rounding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# rows up to which the transposed product is used; DSPARK_SMALL_ROWS_LINEAR=0 turns it off (A/B)
SMALL_ROWS = int(os.environ.get("DSPARK_SMALL_ROWS_LINEAR", "32"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x: [..., in], weight: [out, in] -> [..., out]."""
    if x.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # [m, in]
    m = rows.shape[0]
    if m == 0 or m > SMALL_ROWS:
        return F.linear(x, weight, bias)
    cols = (rows if m > 1 else rows.expand(2, -1).contiguous()).t()  # [in, max(m, 2)]
    y = torch.mm(weight, cols)[:, :m].t().contiguous()  # [m, out]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters and state-dict keys) using :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
