"""Llama-family decoder (Llama, Qwen2 with qkv bias, Qwen3 with q/k norm) reading a ForwardBatch.

Weights use HF names (``model.layers.N.self_attn.q_proj.weight`` ...). At load, q/k/v and
gate/up projections are fused into one matmul each (fewer kernel launches per layer on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.core.forward_batch import ForwardBatch, ModelOutput
from dspark_sglang.layers.attention.base import AttentionBackend
from dspark_sglang.layers.attention.cpu_paged import CpuPagedAttnBackend
from dspark_sglang.layers.layernorm import RMSNorm
from dspark_sglang.layers.linear import Linear
from dspark_sglang.layers.quantized_linear import (
    ALL_ROWS,
    GGUFLinear,
    bump_linear_generation,
    float_weights_active,
    linear_generation,
)
from dspark_sglang.layers.rotary import RotaryEmbedding, apply_rotary
from dspark_sglang.mem_cache.kv_pool import KVPool
from dspark_sglang.models.config import ModelConfig
from dspark_sglang.utils.env import env_on

_EMPTY = torch.empty(0)
# the whole decoder stack in one C++ call where it applies (DSPARK_DECODER_STACK=0: per-layer)
DECODER_STACK = env_on("DSPARK_DECODER_STACK")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):  # a swapped projection / norm: rebuild the stack
            bump_linear_generation()

    def forward(self, x: torch.Tensor, fb: ForwardBatch,
                rope_cs: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend,
                kv_pool: KVPool) -> torch.Tensor:
        # x: [n, hidden] (residual stream)
        n = x.shape[0]
        h = self.input_layernorm(x)
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope_cs), apply_rotary(k, *rope_cs)
        o = attn.forward(q, k, v, self.layer_id, fb, kv_pool, self.scale)
        x = x + self.o_proj(o.reshape(n, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor, fb: ForwardBatch,
                      rope_cs: tuple[torch.Tensor, torch.Tensor], attn: CpuPagedAttnBackend,
                      kv_pool: KVPool, ops: Any) -> torch.Tensor:
        """:meth:`forward` with the small ops fused in C++ (CPU float32, paged attention
        kernel): RMSNorm, q/k/v split + q/k norm + rotary + KV store in one call, SiLU*mul.
        Every op is row-wise, so a token's result does not depend on the batch."""
        n = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        qn, kn = self.q_norm, self.k_norm
        q = ops.qkv_rope_store(
            qkv, rope_cs[0], rope_cs[1], qn.weight if qn is not None else _EMPTY,
            kn.weight if kn is not None else _EMPTY, qn.eps if qn is not None else 0.0,
            kv_pool.k_bufs[self.layer_id], kv_pool.v_bufs[self.layer_id], fb.out_cache_loc,
            self.num_heads, self.num_kv_heads)
        o = attn.paged_forward(q, self.layer_id, fb, kv_pool, self.scale)
        x = x + self.o_proj(o.view(n, self.q_size))
        return x + self.down_proj(ops.silu_mul(self.gate_up_proj(
            self.post_attention_layernorm(x))))


class LlamaForCausalLM(nn.Module):
    """Serves ``llama``, ``qwen2`` and ``qwen3`` architectures."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                                    cfg.rope_theta, cfg.rope_scaling)
        self.tp_shards: nn.Module | None = None  # set by distributed.tp_layers.shard_llama_
        self._stack: Any = None  # C++ DecoderStack (see _decoder_stack) and what it was built for
        self._stack_key: tuple[object, ...] = ()

    def local_head_counts(self) -> tuple[int, int]:
        """(attention heads, KV heads) this rank computes: all of them unless sharded."""
        return self.layers[0].num_heads, self.layers[0].num_kv_heads

    @torch.no_grad()
    def forward(self, fb: ForwardBatch, attn: AttentionBackend, kv_pool: KVPool) -> ModelOutput:
        attn.init_forward_metadata(fb)
        tp = self.tp_shards
        x = (self.embed_tokens if tp is None else tp.embed)(fb.input_ids)  # [n, hidden]
        rope_cs = self.rope.cos_sin(fb.positions, x.dtype)  # gathered once, used by every layer
        captured: dict[int, torch.Tensor] = {}
        stack_aux = None
        ops = (attn.fused_layer_ops(fb, kv_pool)
               if tp is None and x.dtype == torch.float32 and isinstance(attn, CpuPagedAttnBackend)
               else None)
        stack = self._decoder_stack(attn, kv_pool, ops) if ops is not None else None
        if stack is not None:  # every layer in one C++ call (same kernels, same order)
            md = fb.attn_metadata
            res = stack.forward(x, rope_cs[0], rope_cs[1], fb.out_cache_loc, fb.req_to_token,
                                md.req_pool_indices, md.seq_lens, md.ext_lens, md.q_start,
                                md.mask_flat, md.mask_offsets, list(fb.capture_layer_ids))
            x = res[0]
            stack_aux = res[1] if fb.capture_layer_ids else None  # [n, layers * hidden]
        else:
            for layer in self.layers:
                if ops is not None:
                    x = layer.forward_fused(x, fb, rope_cs, attn, kv_pool, ops)
                else:
                    x = layer(x, fb, rope_cs, attn, kv_pool)
                if layer.layer_id in fb.capture_layer_ids:
                    captured[layer.layer_id] = x
        h = self.norm(x)
        rows = h if fb.logits_indices is None else h[fb.logits_indices]
        head = self.lm_head if tp is None else tp.lm_head
        logits = head(rows).float() if rows.shape[0] else None
        aux = stack_aux
        if aux is None and fb.capture_layer_ids:
            aux = torch.cat([captured[i] for i in fb.capture_layer_ids], dim=-1)
        return ModelOutput(logits=logits, aux_hidden=aux,
                           final_hidden=h if fb.capture_final_hidden else None)

    def _decoder_stack(self, attn: CpuPagedAttnBackend, kv_pool: KVPool, ops: Any) -> Any:
        """The C++ ``DecoderStack`` of this model (built once, rebuilt when a projection, its
        kernel plan or the KV pool changes) when every projection of every layer is one
        Q8-kernel block matrix taken for any row count, else None (the fused Python path)."""
        if not DECODER_STACK or float_weights_active():
            return None
        # one number tracks every projection's kernel inputs and every submodule swap (this
        # runs on every forward: keying on the 120 projections' plans cost ~0.1 ms per step)
        if (id(kv_pool), id(ops), linear_generation()) == self._stack_key:
            return self._stack
        self._stack = self._build_stack(kv_pool, ops)
        # keyed after building: making a plan (pack) bumps the generation
        self._stack_key = (id(kv_pool), id(ops), linear_generation())
        return self._stack

    def _build_stack(self, kv_pool: KVPool, ops: Any) -> Any:
        lins = [(m["qkv_proj"], m["o_proj"], m["gate_up_proj"], m["down_proj"])
                for m in (lyr._modules for lyr in self.layers)]
        plans = []
        for quad in lins:
            calls = []
            for i, li in enumerate(quad):
                if not (isinstance(li, GGUFLinear) and li.max_quant_rows >= ALL_ROWS
                        and (i == 0 or li.bias is None)):
                    return None
                plan = li.plan()
                if len(plan) != 1 or plan[0][0] is not ops.gguf_matmul_q8:
                    return None
                calls.append(plan[0])
            plans.append(calls)
        stack = ops.DecoderStack()
        for lyr, quad in zip(self.layers, plans):
            qn, kn = lyr.q_norm, lyr.k_norm
            bias = lyr.qkv_proj.bias
            (_, w_qkv, t_qkv, _), (_, w_o, t_o, _), (_, w_gu, t_gu, _), (_, w_d, t_d, _) = quad
            stack.add_layer(
                lyr.input_layernorm.weight, lyr.post_attention_layernorm.weight,
                lyr.input_layernorm.eps, qn.weight if qn is not None else _EMPTY,
                kn.weight if kn is not None else _EMPTY, qn.eps if qn is not None else 0.0,
                w_qkv, t_qkv, bias if bias is not None else _EMPTY, w_o, t_o, w_gu, t_gu, w_d,
                t_d, lyr.num_heads, lyr.num_kv_heads, lyr.scale,
                kv_pool.k_bufs[lyr.layer_id], kv_pool.v_bufs[lyr.layer_id])
        return stack

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Copy HF-named weights in (fusing q/k/v and gate/up), then cast to ``dtype``."""
        own: dict[str, torch.Tensor] = {}
        get = sd.__getitem__
        own["embed_tokens.weight"] = get("model.embed_tokens.weight")
        own["norm.weight"] = get("model.norm.weight")
        own["lm_head.weight"] = sd.get("lm_head.weight", own["embed_tokens.weight"])
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            own[f"layers.{i}.qkv_proj.weight"] = torch.cat(
                [get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")])
            if self.config.attention_bias:
                own[f"layers.{i}.qkv_proj.bias"] = torch.cat(
                    [get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")])
            own[f"layers.{i}.o_proj.weight"] = get(a + "o_proj.weight")
            own[f"layers.{i}.gate_up_proj.weight"] = torch.cat(
                [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            own[f"layers.{i}.down_proj.weight"] = get(p + "mlp.down_proj.weight")
            own[f"layers.{i}.input_layernorm.weight"] = get(p + "input_layernorm.weight")
            own[f"layers.{i}.post_attention_layernorm.weight"] = get(
                p + "post_attention_layernorm.weight")
            if self.config.qk_norm:
                own[f"layers.{i}.q_norm.weight"] = get(a + "q_norm.weight")
                own[f"layers.{i}.k_norm.weight"] = get(a + "k_norm.weight")
        missing, unexpected = self.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"weight mismatch: missing={missing} unexpected={unexpected}")
        if self.config.tie_word_embeddings or "lm_head.weight" not in sd:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(dtype)
        self.requires_grad_(False)
