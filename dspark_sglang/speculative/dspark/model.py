"""The DSpark drafter network: context injection, parallel block backbone, chain sampling.

Data flow for one request whose target has computed tokens ``0 .. p-1`` and just produced the
anchor ``x_p`` (not yet run through the target)::

    target hidden of token i at target_layer_ids ──► project_context ──► H_ctx[i]  (fc + RMSNorm)
    H_ctx[i] ──► context_kv(positions=i) ──► per draft layer (K_i, V_i)   stored per KV slot
    [x_p, MASK, ..., MASK] at positions p .. p+gamma-1 ──► forward_block(ctx K/V of 0..p-1)
        every block row attends to all valid context entries and to every block row
    block_hidden ──► base_logits U_k (shared lm_head) ──► sample_chain (Markov bias, grammar mask)

Block row ``k`` (0-based) predicts the token at ``p + k + 1``: a block of ``gamma`` rows yields up
to ``gamma`` drafts (DeepSpec ``build_dspark_proposal`` proposes ``block_size`` tokens).

Parameter names match DeepSpec's ``Qwen3DSparkModel`` state dict, minus ``embed_tokens`` and
``lm_head``, which are the target's modules, held by reference and never saved here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.layers.coupling import gumbel_argmax, position_gumbel
from dspark_sglang.layers.layernorm import RMSNorm
from dspark_sglang.layers.linear import Linear
from dspark_sglang.layers.rotary import rope_inv_freq
from dspark_sglang.layers.sampler import draw_uniforms, sample_with_uniforms
from dspark_sglang.speculative.dspark.confidence import (
    ConfidenceHead,
    StsCalibration,
    apply_sts_torch,
    mask_adjusted_confidence,
)
from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.markov import MarkovHead, build_markov_head
from dspark_sglang.speculative.dspark.token_map import DraftVocab
from dspark_sglang.utils.env import env_on

# the all-greedy chain over a vanilla Markov head on Q8 blocks as one C++ call
# (DSPARK_CHAIN_KERNEL=0: the Python loop)
CHAIN_KERNEL = env_on("DSPARK_CHAIN_KERNEL")
# memory for the C++ chain's Markov-bias rows cached by previous token (0: no cache); 64 MB is
# 2,048 rows of an 8,192-id map
BIAS_CACHE_BYTES = int(os.environ.get("DSPARK_BIAS_CACHE_MB", "64")) << 20

# mask_fn(k, prev_tokens [bs]) -> additive mask [bs, V] (0 = allowed, -inf = banned) or None
MaskFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


# (cos, sin) of rope_cos_sin: computed once per forward, shared by q and k of every layer
CosSin = tuple[torch.Tensor, torch.Tensor]


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> CosSin:
    """``positions [...]`` -> ``(cos, sin)``, each ``[..., 1, d]`` in ``dtype``."""
    angles = positions.float().unsqueeze(-1) * inv_freq.float()  # [..., d/2]
    emb = torch.cat([angles, angles], dim=-1).unsqueeze(-2)  # [..., 1, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cs: CosSin) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., heads, d]`` with ``rope_cos_sin``'s tables."""
    cos, sin = cs
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. ``x [..., heads, d]``, ``positions [...]`` -> ``[..., heads, d]``."""
    return rotate(x, rope_cos_sin(positions, inv_freq, x.dtype))


class DraftAttention(nn.Module):
    """GQA attention whose keys/values are ``[context ; block]``; no causal mask."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, d)
        self.q_proj = Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = Linear(self.num_heads * d, h, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project_kv(
        self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
        cs: CosSin | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., H]``, ``positions [...]`` -> roped ``k``, ``v``: ``[..., kv_heads, d]``
        (``cs``: ``rope_cos_sin(positions, ...)`` when the caller has it)."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        k = self.k_proj(x).view(shape)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if cs is None:
            cs = rope_cos_sin(positions, inv_freq, k.dtype)
        return rotate(k, cs), self.v_proj(x).view(shape)

    def forward(
        self,
        x: torch.Tensor,  # [bs, g, H], already input-normed
        positions: torch.Tensor,  # [bs, g]
        ctx_k: torch.Tensor,  # [bs, L, kv_heads, d]
        ctx_v: torch.Tensor,  # [bs, L, kv_heads, d]
        attn_mask: torch.Tensor,  # [bs, 1, g, L + g] bool, True = attend
        inv_freq: torch.Tensor,
        cs: CosSin | None = None,  # rope_cos_sin(positions, ...) when the caller has it
    ) -> torch.Tensor:
        bs, g, _ = x.shape
        q = self.q_proj(x).view(bs, g, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if cs is None:
            cs = rope_cos_sin(positions, inv_freq, q.dtype)
        q = rotate(q, cs)
        k_blk, v_blk = self.project_kv(x, positions, inv_freq, cs)
        k = torch.cat([ctx_k.to(k_blk.dtype), k_blk], dim=1).transpose(1, 2)  # [bs, kvh, L+g, d]
        v = torch.cat([ctx_v.to(v_blk.dtype), v_blk], dim=1).transpose(1, 2)
        # GQA inside SDPA: no repeat_interleave copies of the context's keys and values
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(bs, g, self.num_heads * self.head_dim))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class DraftChain:
    """One left-to-right draft chain per request.

    ``probs[r, k]`` is the distribution draft ``k`` was drawn from (Markov bias, grammar mask and
    the row's temperature applied; one-hot for greedy rows): the ``q`` of rejection sampling.
    ``confidences[r, k]``: calibrated (STS, then mask-corrected) probability that draft ``k`` is
    accepted given drafts ``< k`` were; ``confidence_logits`` are the raw head logits (None
    without a head, in which case ``confidences`` is the largest temperature-1 masked draft
    probability). Confidences never depend on the token drawn at ``k`` (non-anticipating), so a
    verify length chosen from them keeps rejection sampling lossless.
    """

    tokens: torch.Tensor  # [bs, k] int64
    confidences: torch.Tensor  # [bs, k] float32
    confidence_logits: torch.Tensor | None = None  # [bs, k] float32
    # [bs, k, V] float32; None: every row is greedy and probs is the one-hot of tokens over
    # _vocab, built on first access (an all-greedy chain's caller never reads it)
    _probs: torch.Tensor | None = None
    _vocab: int = 0

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            bs, k = self.tokens.shape
            self._probs = torch.zeros(bs, k, self._vocab, device=self.tokens.device).scatter_(
                2, self.tokens.unsqueeze(-1), 1.0)
        return self._probs


class DSparkDrafter(nn.Module):
    """DSpark drafter over a frozen target's ``embed_tokens`` and ``lm_head``.

    ``embed_tokens`` / ``lm_head`` are held by reference (not registered as submodules), so they
    appear in neither ``parameters()`` nor ``state_dict()`` and are never trained or saved here.
    """

    def __init__(
        self,
        config: DSparkConfig,
        embed_tokens: nn.Embedding,
        lm_head: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = Linear(config.ctx_input_size, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList([DraftLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.markov_head: MarkovHead | None = build_markov_head(
            config.markov_head_type, config.vocab_size, config.markov_rank, h)
        self.confidence_head = (
            ConfidenceHead(config.confidence_input_size) if config.enable_confidence_head else None)
        self._shared = (embed_tokens, lm_head)  # a tuple: not registered
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
            persistent=False)
        self.register_buffer("sts_temperatures", torch.ones(config.block_size), persistent=False)
        self.draft_vocab: DraftVocab | None = None  # token map (set_token_map); None = full
        self._w1_float: tuple[torch.Tensor, torch.Tensor] | None = None  # (W1, float32 W1)
        # the C++ chain's cache of Markov-bias rows by previous token: (W1, W2 blocks, rows, tags)
        self._bias_cache: tuple[torch.Tensor, ...] | None = None

    @property
    def gamma(self) -> int:
        return self.config.block_size

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._shared[0]

    @property
    def lm_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._shared[1]

    def set_sts(self, calibration: StsCalibration | Sequence[float] | None) -> None:
        """Install per-position STS temperatures (None = identity)."""
        temps = [1.0] * self.gamma if calibration is None else (
            calibration.temperatures if isinstance(calibration, StsCalibration)
            else list(calibration))
        if len(temps) != self.gamma or any(not t > 0 for t in temps):
            raise ValueError(f"need {self.gamma} positive STS temperatures, got {temps}")
        self.sts_temperatures.copy_(torch.tensor(temps, dtype=torch.float32))

    def set_token_map(self, token_ids: Sequence[int] | None, dtype: str | None = None) -> None:
        """Draft over ``token_ids`` only (token_map.py); None restores the full vocabulary."""
        if token_ids is None:
            self.draft_vocab = None
            return
        weight = getattr(self.lm_head, "weight", None)
        if weight is None:
            raise ValueError("a token map needs an lm_head with a .weight")
        markov = self.markov_head.markov_w2.weight if self.markov_head is not None else None
        from dspark_sglang.layers.quantized_linear import GGUFLinear

        blocks = self.lm_head if isinstance(self.lm_head, GGUFLinear) else None
        self.draft_vocab = DraftVocab(token_ids, weight, markov, dtype=dtype, block_head=blocks)

    def sts_calibration(self) -> StsCalibration:
        return StsCalibration(temperatures=[float(t) for t in self.sts_temperatures.tolist()])

    # ---- context -------------------------------------------------------------------------

    def project_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """``H_ctx = RMSNorm(fc(target_hidden))``: ``[n, m * H_target] -> [n, H]``."""
        return self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))

    def context_kv(
        self, h_ctx: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer ``(k, v)``, each ``[n, kv_heads, d]``; ``k`` is roped at ``positions``.

        These depend only on the token's own target hidden state and position, so the engine
        computes them once when the target computes a token and keeps them per KV slot.
        """
        cs = rope_cos_sin(positions, self.inv_freq, h_ctx.dtype)
        return [layer.self_attn.project_kv(h_ctx, positions, self.inv_freq, cs)
                for layer in self.layers]

    # ---- block backbone -------------------------------------------------------------------

    def block_input_ids(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """``[anchor, mask, ..., mask]``: ``[bs] -> [bs, gamma]``."""
        ids = torch.full((anchor_ids.shape[0], self.gamma), self.config.mask_token_id,
                         dtype=torch.long, device=anchor_ids.device)
        ids[:, 0] = anchor_ids.long()
        return ids

    def forward_block(
        self,
        anchor_ids: torch.Tensor,  # [bs] int64
        anchor_positions: torch.Tensor,  # [bs] int64
        ctx_k: Sequence[torch.Tensor],  # per layer [bs, Lmax, kv_heads, d]
        ctx_v: Sequence[torch.Tensor],  # per layer [bs, Lmax, kv_heads, d]
        ctx_valid: torch.Tensor,  # [bs, Lmax] bool
    ) -> torch.Tensor:
        """Run one block per request; returns the final-normed ``block_hidden [bs, gamma, H]``."""
        bs, g = anchor_ids.shape[0], self.gamma
        assert len(ctx_k) == len(ctx_v) == len(self.layers), "one ctx K/V per draft layer"
        x = self.embed_tokens(self.block_input_ids(anchor_ids)).to(self.fc.weight.dtype)
        positions = anchor_positions.long().unsqueeze(1) + torch.arange(g, device=x.device)
        lmax = ctx_valid.shape[1]
        attn_mask = torch.cat(
            [ctx_valid.bool().view(bs, 1, 1, lmax).expand(bs, 1, g, lmax),
             torch.ones(bs, 1, g, g, dtype=torch.bool, device=x.device)], dim=-1)
        cs = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for layer, k_l, v_l in zip(self.layers, ctx_k, ctx_v):
            attn = layer.self_attn(layer.input_layernorm(x), positions, k_l, v_l, attn_mask,
                                   self.inv_freq, cs)
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def base_logits(self, block_hidden: torch.Tensor, full_vocab: bool = False,
                    in_map: bool = False) -> torch.Tensor:
        """``U_k`` through the shared lm_head: ``[..., H] -> [..., V]`` float32; with a token
        map (and not ``full_vocab``) only its rows are computed, the rest are ``-inf``; with
        ``in_map`` only the map's columns are returned (``[..., len(map)]``, in map order),
        which ``sample_chain`` takes as well (it never builds vocabulary-wide rows then)."""
        if self.draft_vocab is not None and not full_vocab:
            if in_map:
                return self.draft_vocab.logits(block_hidden, scatter=False)
            return self.draft_vocab.logits(block_hidden)
        return self.lm_head(block_hidden).float()

    def _to_vocab(self, x: torch.Tensor, ids: torch.Tensor, fill: float) -> torch.Tensor:
        """Map-space columns ``[..., len(map)]`` -> vocabulary-wide ``[..., V]`` (``fill``)."""
        out = torch.full((*x.shape[:-1], self.config.vocab_size), fill, dtype=x.dtype,
                         device=x.device)
        out[..., ids] = x
        return out

    # ---- heads ----------------------------------------------------------------------------

    def _greedy_chain_fast(self, block_hidden: torch.Tensor, base_logits: torch.Tensor,
                           anchor_ids: torch.Tensor, temperature: torch.Tensor, k_total: int
                           ) -> DraftChain | None:
        """``sample_chain`` for an all-greedy batch without a grammar mask whose chain runs in
        C++ (``_chain_kernel``: the loop's kernels, so the loop's tokens), with the loop's
        batched confidence ops on the same values and no per-position lists (a decode step's
        draft at batch 1 spent ~0.7 ms of its ~4 ms on them on an AVX2 host). None when the
        Python loop applies."""
        sub = self.draft_vocab
        if sub is None or base_logits.shape[-1] != len(sub) or len(sub) == self.config.vocab_size:
            return None
        if bool((temperature > 0).any()):
            return None
        device = base_logits.device
        ids = sub.token_ids.to(device)
        chain_op = self._chain_kernel(base_logits, ids)
        if chain_op is None:
            return None
        op, w1, w2, w2_type, cache, tags = chain_op
        prev = anchor_ids.long().to(device)
        toks = op(base_logits.float().contiguous(), k_total, w1, w2, w2_type, ids.long(),
                  prev.cpu(), cache, tags)  # [bs, k]
        prevs = torch.cat([prev[:, None], toks[:, :-1]], dim=1)
        z_all = self.confidence_logits(block_hidden[:, :k_total], prevs)
        assert z_all is not None
        return DraftChain(tokens=toks, _probs=None, _vocab=self.config.vocab_size,
                          confidences=apply_sts_torch(z_all, self.sts_temperatures).float(),
                          confidence_logits=z_all.float())

    def confidence_logits(
        self, block_hidden: torch.Tensor, prev_tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """Raw confidence logits ``z``: ``block_hidden [..., H]``, ``prev_tokens [...]``."""
        if self.confidence_head is None:
            return None
        feats = block_hidden
        if self.config.confidence_head_with_markov:
            assert self.markov_head is not None
            e = self.markov_head.prev_embedding(prev_tokens).to(block_hidden.dtype)
            feats = torch.cat([block_hidden, e], dim=-1)
        return self.confidence_head(feats)

    def train_heads(
        self, block_hidden: torch.Tensor, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced training outputs for whole blocks.

        ``block_hidden [..., k, H]``; ``prev_tokens [..., k]`` = ``[anchor, x_1, ..., x_{k-1}]``
        (the true previous tokens). Returns ``draft_logits [..., k, V]`` (base + Markov bias)
        and raw ``confidence_logits [..., k]`` (or None).
        """
        logits = self.base_logits(block_hidden, full_vocab=True)
        if self.markov_head is not None:
            logits = logits + self.markov_head.block_bias(prev_tokens, block_hidden).float()
        return logits, self.confidence_logits(block_hidden, prev_tokens)

    # ---- chain sampling -------------------------------------------------------------------

    def _chain_kernel(self, base_logits: torch.Tensor, ids: torch.Tensor | None
                      ) -> tuple[Any, torch.Tensor, torch.Tensor, int, torch.Tensor,
                                 torch.Tensor] | None:
        """(op, W1 float32, W2 map blocks, their type, bias-cache rows, tags) for
        ``markov_greedy_chain`` when the all-greedy chain can run in C++: CPU, map space, a
        vanilla Markov head whose map rows are on one Q8-kernel block matrix; else None. The
        cache (``BIAS_CACHE_BYTES`` of W2 e rows keyed by the previous token, kept while W1 and
        W2 are the same tensors) saves the one small matmul per drafted position for tokens seen
        before: the bias depends on the previous token only."""
        sub, head = self.draft_vocab, self.markov_head
        if (not CHAIN_KERNEL or ids is None or sub is None or sub.markov_blocks is None
                or head is None or head.head_type != "vanilla" or base_logits.device.type != "cpu"):
            return None
        blocks = sub.markov_blocks
        plan = blocks.plan()
        op = getattr(blocks.ops, "markov_greedy_chain", None)
        if op is None or len(plan) != 1 or plan[0][0] is not blocks.ops.gguf_matmul_q8:
            return None
        w1 = head.markov_w1.weight
        if self._w1_float is None or self._w1_float[0] is not w1:
            self._w1_float = (w1, w1.detach().float().contiguous())
        w2 = plan[0][1]
        bc = self._bias_cache
        if bc is None or bc[0] is not w1 or bc[1] is not w2:
            vm = int(w2.shape[0])
            rows = max(0, min(4096, BIAS_CACHE_BYTES // (4 * max(vm, 1))))
            bc = self._bias_cache = (w1, w2, torch.empty(rows, vm),
                                     torch.full((rows,), -1, dtype=torch.long))
        return op, self._w1_float[1], w2, plan[0][2], bc[2], bc[3]

    @torch.no_grad()
    def sample_chain(
        self,
        block_hidden: torch.Tensor,  # [bs, gamma, H]
        base_logits: torch.Tensor,  # [bs, gamma, V]
        anchor_ids: torch.Tensor,  # [bs]
        temperature: torch.Tensor,  # [bs], 0 = greedy
        generators: Sequence[torch.Generator | None] | None = None,
        mask_fn: MaskFn | None = None,
        num_tokens: int | None = None,
        coupling: Sequence[tuple[int, int] | None] | None = None,
    ) -> DraftChain:
        """Draw ``num_tokens`` (default gamma) drafts left to right.

        Row ``k``: ``logits = U_k + markov_bias(x_{k-1})`` (``x_0`` = anchor), plus the additive
        mask from ``mask_fn(k, prev_tokens)`` when it returns one; greedy rows take the argmax
        (first maximum), others sample from ``softmax(logits / T)`` with one uniform per
        non-greedy row per step from that row's generator (or the global RNG). A mask must leave
        at least one token allowed per row. Masked tokens get probability 0 and are never drawn.
        ``coupling[r] = (seed, position)`` makes sampled row ``r`` draw draft ``k`` by Gumbel-max
        with the noise of output position ``position + k`` (layers/coupling.py), the noise the
        target's own sample there uses, which maximises agreement. With a token map the Markov
        bias is computed on the map's rows only (``base_logits`` is ``-inf`` elsewhere, or
        holds the map's columns only: ``base_logits(..., in_map=True)``, the fast path, same
        draws), and a mask must leave at least one token of the map allowed per row.
        """
        bs, gamma, _ = block_hidden.shape
        k_total = gamma if num_tokens is None else int(num_tokens)
        assert 0 <= k_total <= gamma, f"num_tokens must be in [0, {gamma}]"
        device = base_logits.device
        if mask_fn is None and k_total and self.confidence_head is not None:
            fast = self._greedy_chain_fast(block_hidden, base_logits, anchor_ids, temperature,
                                           k_total)
            if fast is not None:
                return fast
        temperature = temperature.to(device=device, dtype=torch.float32)
        greedy = temperature <= 0
        safe_t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
        sampled_rows = [i for i, t in enumerate(temperature.tolist()) if t > 0]
        gens = list(generators) if generators is not None else [None] * bs
        sampled_gens = [gens[i] for i in sampled_rows]
        sampled_idx = torch.tensor(sampled_rows, dtype=torch.long, device=device)

        prev = anchor_ids.long().to(device)
        state = (self.markov_head.init_state((bs,), block_hidden)
                 if self.markov_head is not None else None)
        sub = self.draft_vocab
        vocab = self.config.vocab_size
        # in the map's space: column j is token ids[j] (tokens and probs are mapped back)
        ids = (sub.token_ids.to(device) if sub is not None
               and base_logits.shape[-1] == len(sub) != vocab else None)
        tokens, probs, confs, conf_logits = [], [], [], []
        # with a confidence head and no grammar mask, every position's confidence is computed
        # after the loop in one call (it reads h_k and x_{k-1} only, both known by then)
        batch_conf = mask_fn is None and self.confidence_head is not None
        # (an all-greedy chain that the C++ kernel can draw took _greedy_chain_fast above)
        for k in range(k_total):
            h_k = block_hidden[:, k]
            logits = base_logits[:, k].float()  # [bs, V]
            if self.markov_head is not None:
                if sub is not None:
                    u, state = self.markov_head.rank_step(prev, h_k, state)
                    bias = sub.markov_bias(u, scatter=ids is None)
                else:
                    bias, state = self.markov_head.step(prev, h_k, state)
                logits = logits + bias.float()
            mask = mask_fn(k, prev) if mask_fn is not None else None
            if mask is not None and ids is not None:
                mask = mask[:, ids]
            masked = logits if mask is None else logits + mask.to(logits)
            argmax = masked.argmax(dim=-1)  # [bs] (column; a token id unless in map space)
            tok = argmax if ids is None else ids[argmax]
            if sampled_rows:
                one_hot = F.one_hot(argmax, masked.shape[-1]).to(torch.float32)
                q = torch.softmax(masked / safe_t, dim=-1)  # [bs, V] (or [bs, len(map)])
                u = torch.stack(draw_uniforms(sampled_gens, [1] * len(sampled_rows), device))
                tok = tok.clone()
                col = sample_with_uniforms(q[sampled_idx], u.squeeze(1))
                tok[sampled_idx] = col if ids is None else ids[col]
                for r in sampled_rows:
                    if coupling is not None and coupling[r] is not None:
                        seed, pos = coupling[r]
                        q_r = q[r] if ids is None else self._to_vocab(q[r], ids, 0.0)
                        tok[r] = gumbel_argmax(q_r, position_gumbel(seed, pos + k, vocab,
                                                                    q.device))
                probs.append(torch.where(greedy.unsqueeze(1), one_hot, q))
            # (all greedy: the draft distribution is one-hot, DraftChain builds it on demand)

            # The confidence decides whether draft k is verified, so it may use only what is
            # known before x_k is drawn (DSpark App. A): the distribution, never the sampled
            # token. Both fallbacks read the draft's mode, which for greedy rows is x_k itself.
            if not batch_conf:
                z = self.confidence_logits(h_k, prev)
                if z is None:
                    c = torch.softmax(masked, dim=-1).max(dim=-1).values
                else:
                    c = apply_sts_torch(z, self.sts_temperatures[k : k + 1])
                    if mask is not None:
                        c = mask_adjusted_confidence(c, logits, masked, argmax)
                    conf_logits.append(z.float())
                confs.append(c.float())
            tokens.append(tok)
            prev = tok
        if batch_conf and k_total:
            toks = torch.stack(tokens, 1)  # [bs, k]
            prevs = torch.cat([anchor_ids.long().to(device)[:, None], toks[:, :-1]], dim=1)
            z_all = self.confidence_logits(block_hidden[:, :k_total], prevs)
            assert z_all is not None
            conf_logits = list(z_all.float().unbind(1))
            confs = list(apply_sts_torch(z_all, self.sts_temperatures).float().unbind(1))

        if ids is None:
            vocab = base_logits.shape[-1]
        probs_t = torch.stack(probs, 1) if probs else None
        if probs_t is not None and ids is not None:
            probs_t = self._to_vocab(probs_t, ids, 0.0)
        return DraftChain(
            tokens=torch.stack(tokens, 1) if tokens else torch.empty(bs, 0, dtype=torch.long,
                                                                      device=device),
            _probs=probs_t, _vocab=vocab,
            confidences=torch.stack(confs, 1) if confs else torch.empty(bs, 0, device=device),
            confidence_logits=(torch.stack(conf_logits, 1) if conf_logits
                               else (torch.empty(bs, 0, device=device)
                                     if self.confidence_head is not None else None)),
        )
