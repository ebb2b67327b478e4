"""The tensor-parallel group of one server: ``TPGroup`` (rank, size, collectives).

One group per server process tree. Collectives on activations use the backend of the device
(NCCL on CUDA, gloo on CPU); control messages (the ForwardBatch each step) always travel over a
gloo group on CPU, so pickled objects never need a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    """Rank ``rank`` of ``size``; rank 0 is the driver (scheduler, sampling, drafter)."""

    rank: int
    size: int
    device: str
    cpu_group: Any = None  # gloo group for objects

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks in place; returns ``x``."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` joined on the last dim in rank order: [..., d] -> [..., t*d]."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj``; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]


def init_tp_group(rank: int, size: int, init_method: str, device: str,
                  timeout_s: float = 600.0) -> TPGroup:
    """Join the default process group (NCCL on CUDA, gloo on CPU) plus a gloo control group."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return TPGroup(rank, size, device, cpu_group)


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
