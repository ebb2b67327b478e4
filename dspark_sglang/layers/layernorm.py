"""RMSNorm shared by the target models and the DSpark drafter (HF numerics: fp32 statistics)."""

from __future__ import annotations

import torch
from torch import nn


def _cpu_ops() -> object | None:
    from dspark_kernels.cpu_ops import load_cpu_ops

    return load_cpu_ops()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if (x.is_cpu and self.weight.dtype == torch.float32 and not (torch.is_grad_enabled()
                                  and (x.requires_grad or self.weight.requires_grad))):
                ops = _cpu_ops()
                if ops is not None:  # one C++ call (F.rms_norm is ~8 ops on CPU), row-wise
                    return ops.rms_norm(x.contiguous(), self.weight, self.eps)  # type: ignore
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
