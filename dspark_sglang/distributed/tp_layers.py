"""Tensor-parallel layers and the in-place sharding of a loaded ``LlamaForCausalLM``.

Megatron layout, per decoder layer:

    qkv_proj      column-parallel: rank r keeps q heads [r*H/t, (r+1)*H/t) and the same slice of
                  k and v heads (kv heads must divide by t), re-fused as [q_r | k_r | v_r]
    attention     local heads only (KV pool and backend sized by the local head counts)
    o_proj        row-parallel: input columns of rank r's heads; partial sums all-reduced
    gate_up_proj  column-parallel: rows [r*I/t, (r+1)*I/t) of gate and of up, re-fused
    down_proj     row-parallel over the same I/t slice; all-reduced

so there is one all-reduce after attention and one after the MLP. The embedding is
vocab-parallel (rank r embeds ids in its vocab slice, zeros elsewhere, all-reduce) and the LM
head is vocab-parallel (rank r computes its slice of logits; all-gather). Every rank ends each
layer with the full residual stream, so captured hidden states (the drafter's input) are the
same as without TP up to float rounding of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.distributed.parallel_state import TPGroup
from dspark_sglang.layers.linear import linear


def _split(n: int, size: int, what: str) -> int:
    if n % size:
        raise ValueError(f"{what} ({n}) must be divisible by tp_size ({size})")
    return n // size


class ColumnParallelLinear(nn.Module):
    """Holds rows ``[out_r]`` of a weight; output stays sharded (no communication)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [out/t, in]
        self.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds columns ``[in_r]`` of a weight; partial products are summed over ranks."""

    def __init__(self, weight: torch.Tensor, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [out, in/t]
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, in/t] -> [n, out]
        return self.group.all_reduce(linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V/t)`` of the embedding; other ids embed to zero, then all-reduce."""

    def __init__(self, weight: torch.Tensor, start: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [V/t, H]
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, H]
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        x = x * inside.unsqueeze(-1).to(x.dtype)
        return self.group.all_reduce(x)


class VocabParallelLMHead(nn.Module):
    """Rows ``[V/t]`` of the LM head; logits all-gathered in vocab order on every rank."""

    def __init__(self, weight: torch.Tensor, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [V/t, H]
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, V]
        return self.group.all_gather_last(linear(h, self.weight))


class TPShards(nn.Module):
    """The vocab-parallel embedding and LM head a sharded model uses in ``forward``."""

    def __init__(self, embed: VocabParallelEmbedding, lm_head: VocabParallelLMHead) -> None:
        super().__init__()
        self.embed, self.lm_head = embed, lm_head


def shard_llama_(model: nn.Module, group: TPGroup) -> None:
    """Shard a loaded ``LlamaForCausalLM`` for ``group`` in place (weights already in dtype).

    The full ``embed_tokens`` / ``lm_head`` stay on the model for the driver's drafter (which
    runs unsharded on rank 0); ``model.tp_shards`` holds the parallel ones ``forward`` uses.
    """
    t, r = group.size, group.rank
    cfg = model.config
    vocab_shard = _split(cfg.vocab_size, t, "vocab_size")
    for layer in model.layers:
        hq = _split(layer.num_heads, t, "num_attention_heads")
        hkv = _split(layer.num_kv_heads, t, "num_key_value_heads")
        d = layer.head_dim
        w = layer.qkv_proj.weight
        b = layer.qkv_proj.bias
        q, k, v = w.split([layer.q_size, layer.kv_size, layer.kv_size])
        pieces = [q[r * hq * d:(r + 1) * hq * d], k[r * hkv * d:(r + 1) * hkv * d],
                  v[r * hkv * d:(r + 1) * hkv * d]]
        bias = None
        if b is not None:
            bq, bk, bv = b.split([layer.q_size, layer.kv_size, layer.kv_size])
            bias = torch.cat([bq[r * hq * d:(r + 1) * hq * d], bk[r * hkv * d:(r + 1) * hkv * d],
                              bv[r * hkv * d:(r + 1) * hkv * d]])
        layer.qkv_proj = ColumnParallelLinear(torch.cat(pieces), bias)
        layer.o_proj = RowParallelLinear(
            layer.o_proj.weight[:, r * hq * d:(r + 1) * hq * d], group)
        inter = layer.gate_up_proj.weight.shape[0] // 2
        ish = _split(inter, t, "intermediate_size")
        gate, up = layer.gate_up_proj.weight.split([inter, inter])
        layer.gate_up_proj = ColumnParallelLinear(
            torch.cat([gate[r * ish:(r + 1) * ish], up[r * ish:(r + 1) * ish]]), None)
        layer.down_proj = RowParallelLinear(
            layer.down_proj.weight[:, r * ish:(r + 1) * ish], group)
        layer.num_heads, layer.num_kv_heads = hq, hkv
        layer.q_size, layer.kv_size = hq * d, hkv * d
    start = r * vocab_shard
    model.tp_shards = TPShards(
        VocabParallelEmbedding(model.embed_tokens.weight[start:start + vocab_shard], start, group),
        VocabParallelLMHead(model.lm_head.weight[start:start + vocab_shard], group))
