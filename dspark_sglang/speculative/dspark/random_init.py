"""Randomly initialised DSpark checkpoints for a given target (tests, smoke runs)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dspark_sglang.models.config import ModelConfig
from dspark_sglang.speculative.dspark.checkpoint import save_dspark_checkpoint
from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.model import DSparkDrafter


def random_dspark_config(target: ModelConfig, block_size: int = 4, num_layers: int = 1,
                         markov_rank: int = 8, markov_head_type: str = "vanilla",
                         target_layer_ids: tuple[int, ...] | None = None,
                         confidence: bool = True) -> DSparkConfig:
    n = target.num_hidden_layers
    ids = target_layer_ids or tuple(sorted({0, n // 2, n - 1}))
    return DSparkConfig(
        vocab_size=target.vocab_size, hidden_size=target.hidden_size,
        intermediate_size=target.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=target.num_attention_heads,
        num_key_value_heads=target.num_key_value_heads, head_dim=target.head_dim,
        block_size=block_size, target_layer_ids=ids, mask_token_id=0,
        markov_rank=markov_rank, markov_head_type=markov_head_type,
        enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and markov_rank > 0,
        rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
        max_position_embeddings=target.max_position_embeddings)


def write_random_dspark_checkpoint(out_dir: str | Path, target: ModelConfig, seed: int = 0,
                                   **kw: object) -> Path:
    cfg = random_dspark_config(target, **kw)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    embed = nn.Embedding(target.vocab_size, target.hidden_size)
    head = nn.Linear(target.hidden_size, target.vocab_size, bias=False)
    drafter = DSparkDrafter(cfg, embed, head)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    return save_dspark_checkpoint(out_dir, drafter)
