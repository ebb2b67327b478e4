"""DSpark drafter training over a target hidden-state cache (DeepSpec recipe, CPU or CUDA).

Per step: ``batch_seqs`` random cached sequences, ``anchors_per_seq`` random anchors each
(response positions by default), packed into one block batch (:mod:`training.blocks`); loss
``alpha_ce·CE + alpha_tv·L1 + alpha_conf·BCE`` with weights ``exp(-(k-1)/loss_decay_gamma)``
(:func:`training.losses.dspark_loss`). The target is frozen and not even loaded as a network:
only its ``embed_tokens`` and ``lm_head`` (shared with the drafter, frozen) are needed.

Outputs in ``out_dir``: ``train_state.pt`` (drafter + optimizer + step, for ``resume``),
``latest/`` (DeepSpec-layout export after every checkpoint), ``log.jsonl`` (losses), and after
the last step ``final/`` with STS calibration fitted on the held-out split.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.models.config import ModelConfig
from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.model import DSparkDrafter
from dspark_sglang.training.blocks import (
    BlockBatch,
    block_forward,
    block_forward_packed,
    build_block_batch,
    prev_tokens,
    sample_anchors,
    target_block_hidden,
    target_block_logits,
    truncate,
)
from dspark_sglang.training.calibration import fit_sts_calibration
from dspark_sglang.training.export import export_drafter
from dspark_sglang.training.fused_loss import fused_head_losses
from dspark_sglang.training.losses import dspark_loss, position_weights
from dspark_sglang.training.target_cache import CachedSequence

STATE_FILE = "train_state.pt"
_MAPS: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def train_vocab(cfg: TrainConfig, vocab_size: int, device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ids [Vm], pos [V])`` of ``cfg.token_map`` (``pos[t]`` = t's column in the map, -1
    outside it), or None when training over the whole vocabulary."""
    if not cfg.token_map:
        return None
    key = (cfg.token_map, vocab_size, str(device))
    if key not in _MAPS:
        from dspark_sglang.speculative.dspark.token_map import load_token_map

        ids = torch.tensor(load_token_map(cfg.token_map), dtype=torch.long)
        if int(ids.max()) >= vocab_size:
            raise ValueError(f"token map {cfg.token_map} has ids >= vocab size {vocab_size}")
        pos = torch.full((vocab_size,), -1, dtype=torch.long)
        pos[ids] = torch.arange(len(ids))
        _MAPS[key] = (ids.to(device), pos.to(device))
    return _MAPS[key]


def map_labels(labels: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids -> map columns (0 where outside the map) and the in-map mask."""
    cols = pos[labels.long()]
    return cols.clamp(min=0), cols >= 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_seqs: int = 8  # sequences per step
    anchors_per_seq: int = 8  # blocks per sequence per step
    max_seq_len: int = 512  # context truncation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    loss_decay_gamma: float = 4.0
    response_only: bool = True  # anchors only inside the regenerated response
    heldout_fraction: float = 0.05
    ckpt_every: int = 50
    log_every: int = 10
    seed: int = 0
    export_dtype: str = "bfloat16"
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    fused_loss: bool = True  # chunked LM head + loss (training/fused_loss.py); False = reference
    compute_dtype: str = "auto"  # matmul dtype: auto = bf16 where the hardware has it, else fp32
    loss_chunk: int = 128  # rows per chunk of the fused head
    # token map json (training.token_map): draft and target distributions, CE and held-out
    # acceptance over the map's tokens only, the vocabulary the served drafter proposes from
    # (the head costs len(map)/V of the full one); "" = the whole vocabulary
    token_map: str = ""
    # CE label: "data" = the sequence's next token (DeepSpec); "target" = the target's argmax at
    # that position, the token greedy verification accepts (differs from "data" on T=1-sampled
    # answers). Held-out acceptance and STS use the same label.
    ce_label: str = "data"
    # held-out sequences the post-training STS fit reads (0 = all): 256 give ~28k blocks, enough
    # for the fit, in ~1/3 of the time of the default 5 % split of a 15k-sequence cache
    calib_max_seqs: int = 256

    def __post_init__(self) -> None:
        if self.ce_label not in ("data", "target"):
            raise ValueError(f"ce_label must be 'data' or 'target', not {self.ce_label!r}")


def make_drafter_config(
    target: ModelConfig, target_layer_ids: Sequence[int], num_layers: int = 1,
    block_size: int = 7, markov_rank: int = 64, mask_token_id: int = 0,
    markov_head_type: str = "vanilla", confidence: bool = True, qk_norm: bool | None = None,
) -> DSparkConfig:
    """A drafter shaped like the target's layers (DeepSpec copies the target's config).

    ``qk_norm`` defaults to the target's; DeepSpec, upstream SGLang and llama.cpp build DSpark
    drafters from Qwen3 layers (per-head q/k RMSNorm), so a drafter meant for export to those
    engines needs ``qk_norm=True`` even for a Llama target."""
    return DSparkConfig(
        vocab_size=target.vocab_size, hidden_size=target.hidden_size,
        intermediate_size=target.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=target.num_attention_heads,
        num_key_value_heads=target.num_key_value_heads, head_dim=target.head_dim,
        block_size=block_size, target_layer_ids=tuple(target_layer_ids),
        mask_token_id=mask_token_id, markov_rank=markov_rank, markov_head_type=markov_head_type,
        enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and markov_rank > 0,
        target_hidden_size=target.hidden_size, num_target_layers=target.num_hidden_layers,
        rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
        rope_scaling=target.rope_scaling, max_position_embeddings=target.max_position_embeddings,
        attention_bias=target.attention_bias,
        qk_norm=target.qk_norm if qk_norm is None else qk_norm,
    )


@torch.no_grad()
def init_from_target(drafter: DSparkDrafter, target: nn.Module, layer_id: int) -> None:
    """Start every draft layer from target layer ``layer_id`` and the final norm from the
    target's; the Markov output projection starts at zero (no bias at step 0)."""
    src = target.layers[layer_id]
    cfg = drafter.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    wq, wk, wv = src.qkv_proj.weight.float().split([q, kv, kv])
    gate, up = src.gate_up_proj.weight.float().chunk(2)
    for layer in drafter.layers:
        a = layer.self_attn
        a.q_proj.weight.copy_(wq)
        a.k_proj.weight.copy_(wk)
        a.v_proj.weight.copy_(wv)
        a.o_proj.weight.copy_(src.o_proj.weight.float())
        layer.mlp.gate_proj.weight.copy_(gate)
        layer.mlp.up_proj.weight.copy_(up)
        layer.mlp.down_proj.weight.copy_(src.down_proj.weight.float())
        layer.input_layernorm.weight.copy_(src.input_layernorm.weight.float())
        layer.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight.float())
    drafter.norm.weight.copy_(target.norm.weight.float())
    if drafter.markov_head is not None:
        drafter.markov_head.markov_w2.weight.zero_()
        nn.init.normal_(drafter.markov_head.markov_w1.weight, std=0.02)


def split_heldout(seqs: Sequence[CachedSequence], fraction: float, seed: int
                  ) -> tuple[list[CachedSequence], list[CachedSequence]]:
    """Deterministic split by key: ``(train, heldout)``."""
    order = sorted(seqs, key=lambda s: s.key)
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(order))) if fraction > 0 else 0
    return order[n_held:], order[:n_held]


def resolve_compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with native bf16 dot products (AVX512-BF16 / AMX),
    where it runs several times faster than fp32; fp32 elsewhere (AVX2 emulates bf16)."""
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def step_loss(
    drafter: DSparkDrafter, lm_head: Callable[[torch.Tensor], torch.Tensor], batch: BlockBatch,
    cfg: TrainConfig, device: torch.device | str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one block batch: the fused chunked head (``cfg.fused_loss``) or the
    reference :func:`dspark_loss` over materialised logits; both give the same values."""
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    dev_type = torch.device(device).type
    with torch.autocast(dev_type, dtype=dtype, enabled=dtype != torch.float32):
        if cfg.fused_loss:
            return _fused_step_loss(drafter, lm_head, batch, cfg, device, dtype)
        return _reference_step_loss(drafter, lm_head, batch, cfg, device)


def _fused_step_loss(
    drafter: DSparkDrafter, lm_head: Callable[[torch.Tensor], torch.Tensor], batch: BlockBatch,
    cfg: TrainConfig, device: torch.device | str, dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = drafter.gamma
    hidden = block_forward_packed(drafter, batch, device)  # [N, g, H]
    prev = prev_tokens(batch).to(device)  # [N, g]
    valid = batch.valid.to(device)  # [N, g]
    conf = drafter.confidence_logits(hidden, prev)  # [N, g] or None
    u = w2 = None
    if drafter.markov_head is not None:
        u = drafter.markov_head.block_rank_input(prev, hidden)[valid]  # [M, r]
        w2 = drafter.markov_head.markov_w2.weight  # [V, r]
    tgt_h = target_block_hidden(batch, g).to(device)  # [N, g, H]
    head_w = lm_head.weight  # type: ignore[attr-defined]  # [V, H], frozen
    labels = batch.labels.to(device)[valid]
    sub = train_vocab(cfg, int(head_w.shape[0]), device)
    in_map = None
    if sub is not None:  # the map's rows of the frozen head and of W2 (W2's grad flows back)
        head_w = head_w.detach()[sub[0]]
        w2 = w2[sub[0]] if w2 is not None else None
        labels, in_map = map_labels(labels, sub[1])
    # "target": the argmax over the rows computed (the map's, with a map); the data token's
    # membership of the map stands in for the argmax's
    with torch.autocast(torch.device(device).type, enabled=False):
        l1_tok, ce_tok = fused_head_losses(
            hidden[valid], u, head_w, w2, tgt_h[valid],
            labels if cfg.ce_label == "data" else None,
            chunk=cfg.loss_chunk, matmul_dtype=dtype)  # [M] each
    if in_map is not None:
        ce_tok = ce_tok * in_map.to(ce_tok.dtype)
    w = position_weights(valid, cfg.loss_decay_gamma)[valid]  # [M]
    den = w.sum() + 1e-6
    ce = (ce_tok * w).sum() / den
    l1 = (l1_tok * w).sum() / den
    accept_v = (1.0 - 0.5 * l1_tok.detach()).clamp(0.0, 1.0)  # [M]
    loss_conf = ce.new_zeros(())
    if conf is not None:
        bce = F.binary_cross_entropy_with_logits(conf[valid].float(), accept_v, reduction="none")
        loss_conf = (bce * w).sum() / den
    total = cfg.alpha_ce * ce + cfg.alpha_tv * l1 + cfg.alpha_conf * loss_conf
    with torch.no_grad():
        accept = torch.zeros(valid.shape, device=accept_v.device)
        accept[valid] = accept_v
        blocks = valid.any(dim=-1)
        tau = 1.0 + accept.cumprod(dim=-1).sum(dim=-1)
        parts = {"ce": ce, "l1": l1, "tv": (0.5 * l1).detach(), "conf": loss_conf,
                 "accept_rate": accept_v.mean() if accept_v.numel() else ce.new_zeros(()),
                 "expected_tau": (tau * blocks).sum() / blocks.sum().clamp(min=1)}
    return total, parts


def _reference_step_loss(
    drafter: DSparkDrafter, lm_head: Callable[[torch.Tensor], torch.Tensor], batch: BlockBatch,
    cfg: TrainConfig, device: torch.device | str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = drafter.gamma
    hidden = block_forward(drafter, batch, device)  # [N, g, H]
    draft_logits, conf = drafter.train_heads(hidden, prev_tokens(batch).to(device))
    tgt = target_block_logits(lm_head, batch, g, device)  # [N, g, V]
    labels, in_map, draft_logits, tgt = _restrict(cfg, batch.labels.to(device), draft_logits,
                                                  tgt, device)
    return dspark_loss(draft_logits, tgt, conf, batch.valid.to(device), cfg.loss_decay_gamma,
                       cfg.alpha_ce, cfg.alpha_tv, cfg.alpha_conf,
                       target_ids=labels if cfg.ce_label == "data" else None,
                       ce_mask=in_map)


def _restrict(cfg: TrainConfig, labels: torch.Tensor, draft_logits: torch.Tensor,
              tgt: torch.Tensor, device: torch.device | str
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Materialised logits and labels restricted to ``cfg.token_map`` (unchanged without)."""
    sub = train_vocab(cfg, int(draft_logits.shape[-1]), device)
    if sub is None:
        return labels, None, draft_logits, tgt
    cols, in_map = map_labels(labels, sub[1])
    return cols, in_map, draft_logits[..., sub[0]], tgt[..., sub[0]]


def _random_batch(seqs: Sequence[CachedSequence], cfg: TrainConfig, gamma: int,
                  rng: random.Random) -> BlockBatch:
    chosen, anchors = [], []
    while len(chosen) < cfg.batch_seqs:
        s = truncate(seqs[rng.randrange(len(seqs))], cfg.max_seq_len)
        a = sample_anchors(s, cfg.anchors_per_seq, rng, cfg.response_only)
        if a:
            chosen.append(s)
            anchors.append(a)
    return build_block_batch(chosen, anchors, gamma)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def train_drafter(
    drafter: DSparkDrafter,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    train_seqs: Sequence[CachedSequence],
    cfg: TrainConfig,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``drafter`` in place; checkpoints to ``out_dir``; returns the last logged losses.

    With ``resume`` and an existing ``train_state.pt`` the drafter, optimizer and step are
    restored and training continues to ``cfg.steps``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step = 0
    state_path = out / STATE_FILE
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        drafter.load_state_dict(st["drafter"])
        opt.load_state_dict(st["optimizer"])
        step = int(st["step"])
    rng = random.Random(cfg.seed * 1_000_003 + step)
    torch.manual_seed(cfg.seed + step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    t0 = time.monotonic()
    last: dict[str, Any] = {}
    ema: dict[str, float] = {}
    log_f = (out / "log.jsonl").open("a")

    def checkpoint() -> None:
        torch.save({"drafter": drafter.state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "train_config": asdict(cfg)}, out / (STATE_FILE + ".tmp"))
        (out / (STATE_FILE + ".tmp")).replace(state_path)
        export_drafter(drafter, out / "latest", dtype=cfg.export_dtype)

    drafter.train()
    while step < cfg.steps:
        batch = _random_batch(train_seqs, cfg, drafter.gamma, rng)
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg)
        loss, parts = step_loss(drafter, lm_head, batch, cfg, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        vals = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        for k, v in vals.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema['loss']:.3f}", ce=f"{ema['ce']:.2f}",
                            acc=f"{ema['accept_rate']:.3f}", tau=f"{ema['expected_tau']:.2f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = {"step": step, "lr": _lr_at(step - 1, cfg),
                    "minutes": (time.monotonic() - t0) / 60, **{f"ema_{k}": v
                                                                for k, v in ema.items()}}
            log_f.write(json.dumps(last) + "\n")
            log_f.flush()
        out_of_time = cfg.max_minutes > 0 and (time.monotonic() - t0) / 60 > cfg.max_minutes
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            checkpoint()
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    log_f.close()
    drafter.eval()
    return last


@torch.no_grad()
def evaluate_blocks(
    drafter: DSparkDrafter, lm_head: Callable[[torch.Tensor], torch.Tensor],
    seqs: Sequence[CachedSequence], cfg: TrainConfig, device: torch.device | str = "cpu",
    anchors_per_seq: int = 16, seed: int = 1,
) -> dict[str, Any]:
    """Teacher-forced held-out metrics: mean losses, and per block the raw confidence logits
    and greedy acceptance flags (draft argmax with the true previous token == label; with
    ``cfg.token_map`` the argmax over the map, as served). The label is ``cfg.ce_label``'s: the
    data token, or the target's argmax over the whole vocabulary ("target": a draft whose token
    the target would not pick greedily is rejected even where a T=1 answer sampled it)."""
    rng = random.Random(seed)
    conf_rows, acc_rows, obs_rows = [], [], []
    sums: dict[str, float] = {}
    n = 0
    for s in seqs:
        s = truncate(s, cfg.max_seq_len)
        a = sample_anchors(s, anchors_per_seq, rng, cfg.response_only)
        if not a:
            continue
        batch = build_block_batch([s], [a], drafter.gamma)
        hidden = block_forward(drafter, batch, device)
        draft_logits, conf = drafter.train_heads(hidden, prev_tokens(batch).to(device))
        tgt = target_block_logits(lm_head, batch, drafter.gamma, device)
        labels = batch.labels.to(device)
        if cfg.ce_label == "target":
            labels = torch.where(batch.valid.to(device), tgt.argmax(-1), labels)
        labels, in_map, draft_logits, tgt = _restrict(cfg, labels, draft_logits, tgt, device)
        _, parts = dspark_loss(draft_logits, tgt, conf, batch.valid.to(device),
                               cfg.loss_decay_gamma, target_ids=labels, ce_mask=in_map)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        hit = draft_logits.argmax(-1) == labels  # a map column, with a map
        if in_map is not None:
            hit = hit & in_map
        acc_rows.append(hit.cpu() & batch.valid)
        obs_rows.append(batch.valid)
        if conf is not None:
            conf_rows.append(conf.cpu())
    return {
        "metrics": {k: v / max(n, 1) for k, v in sums.items()},
        "conf_logits": torch.cat(conf_rows).numpy() if conf_rows else None,
        "accepted": torch.cat(acc_rows).numpy() if acc_rows else np.zeros((0, drafter.gamma)),
        "observed": torch.cat(obs_rows).numpy() if obs_rows else None,
    }


def calibrate(drafter: DSparkDrafter, lm_head: Callable[[torch.Tensor], torch.Tensor],
              heldout: Sequence[CachedSequence], cfg: TrainConfig,
              device: torch.device | str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Fit STS on the held-out split (greedy teacher-forced acceptance) and install it; the
    first ``cfg.calib_max_seqs`` held-out sequences when that is set."""
    if cfg.calib_max_seqs:
        heldout = heldout[: cfg.calib_max_seqs]
    ev = evaluate_blocks(drafter, lm_head, heldout, cfg, device)
    if ev["conf_logits"] is None:
        return None, ev
    cal = fit_sts_calibration(ev["conf_logits"], ev["accepted"], ev["observed"],
                              dataset="heldout self-distillation (greedy, teacher-forced)")
    drafter.set_sts(cal)
    return cal, ev
