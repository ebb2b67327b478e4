"""Assemble an engine's parts from ServerArgs: load weights, size pools, pick the drafter."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dspark_sglang.core.req import Req
from dspark_sglang.entrypoints.metrics import EngineMetrics
from dspark_sglang.layers.attention.registry import resolve_attention_backend
from dspark_sglang.mem_cache.cache_manager import CacheManager
from dspark_sglang.model_executor.model_loader import (  # noqa: F401 - old import path
    build_target_model,
    resolve_device,
    resolve_dtype,
)
from dspark_sglang.model_executor.model_runner import ModelRunner
from dspark_sglang.models.config import ModelConfig
from dspark_sglang.scheduler.output_processor import OutputProcessor
from dspark_sglang.scheduler.scheduler import Scheduler
from dspark_sglang.server_args import ServerArgs
from dspark_sglang.speculative.context import DraftContext, SpeculativeConfig
from dspark_sglang.speculative.registry import create_draft_worker
from dspark_sglang.speculative.spec_decoder import SpecDecoder

logger = logging.getLogger(__name__)

@dataclass
class EngineParts:
    args: ServerArgs
    config: ModelConfig
    tokenizer: Any
    model_path: str
    is_default_model: bool
    context_len: int
    vocab_size: int
    runner: ModelRunner
    cache: CacheManager
    decoder: SpecDecoder
    output: OutputProcessor
    scheduler: Scheduler
    metrics: EngineMetrics
    load_seconds: float
    _grammar_backend: Any = None

    def grammar_backend(self) -> Any:
        """Lazily built grammar backend (compile happens on the caller's thread)."""
        if self._grammar_backend is None:
            from dspark_sglang.constrained.registry import get_grammar_backend
            from dspark_sglang.constrained.tokenizer_info import TokenizerInfo

            info = TokenizerInfo.from_tokenizer(
                self.tokenizer.hf, sorted(self.output.eos_token_ids), self.vocab_size)
            self._grammar_backend = get_grammar_backend(self.args.grammar_backend, info)
        return self._grammar_backend


def speculative_config(args: ServerArgs) -> SpeculativeConfig:
    """The ``speculative_*`` fields of ``args`` without their prefix."""
    return SpeculativeConfig(**{f.name: getattr(args, "speculative_" + f.name)
                                for f in dataclasses.fields(SpeculativeConfig)})


def load_target_model(model_path: str | None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The target alone (no engine), at its full context: for training and offline evaluation."""
    from dspark_sglang.models.loader import load_model_files

    loaded = load_model_files(model_path)
    return build_target_model(loaded.config, loaded.state_dict, dtype, device,
                              loaded.config.max_position_embeddings)


def build_engine_parts(args: ServerArgs, emit: Callable[[Req, bool], None]) -> EngineParts:
    from dspark_sglang.models.loader import load_model_files

    t0 = time.monotonic()
    loaded = load_model_files(args.model_path)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = loaded.config
    context_len = args.context_length or cfg.max_position_embeddings
    if context_len > cfg.max_position_embeddings:
        raise ValueError(f"context_length {context_len} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    model = build_target_model(cfg, loaded.state_dict, dtype, device, context_len + 64)
    quantization = "none"
    # auto: only with the paged CPU attention kernel, whose verified tokens are bitwise the
    # decoded ones (Q8 activations turn SDPA's last-bit differences into different logits)
    if ((args.quantization == "gguf"
         or (args.quantization == "auto"
             and resolve_attention_backend(args.attention_backend, device, dtype) == "cpu"))
            and device == "cpu" and dtype == torch.float32 and getattr(args, "tp_size", 1) == 1):
        from dspark_sglang.models.gguf_quant import apply_gguf_quantization

        # before the drafter shares lm_head
        if apply_gguf_quantization(model, loaded.model_path):
            quantization = "gguf"
    del loaded.state_dict
    tp_driver = None
    if args.tp_size > 1:
        from dspark_sglang.distributed.tp_driver import start_tp_driver

        tp_driver = start_tp_driver(args, model, device)  # spawns ranks 1.., shards ``model``
    runner = ModelRunner(model, args.max_total_tokens, dtype, args.attention_backend, device,
                         disable_cuda_graph=args.disable_cuda_graph or tp_driver is not None)
    runner.tp_driver = tp_driver
    runner.quantization = quantization  # resolved ("auto" -> what runs), for /server_info
    if quantization == "gguf":
        # row-independent forwards: block kernels and paged attention for prefill as well, so
        # a token's logits do not depend on batching or chunking (speculative greedy == plain
        # at any load); DSPARK_FLOAT_PREFILL=1 trades that for float32 prefill GEMMs
        runner.float_prefill = os.environ.get("DSPARK_FLOAT_PREFILL", "0") == "1"
        if hasattr(runner.attn, "extend_on_kernel"):
            runner.attn.extend_on_kernel = not runner.float_prefill
    cache = CacheManager(args.max_total_tokens, max(2 * args.max_running_requests, 8),
                         context_len, args.disable_radix_cache)
    tokenizer = loaded.tokenizer
    eos = set(cfg.eos_token_ids) | set(getattr(tokenizer, "eos_token_ids", []) or [])
    vocab_size = cfg.vocab_size
    draft_ctx = DraftContext(runner=runner, cache=cache, config=cfg,
                             num_slots=args.max_total_tokens, context_len=context_len,
                             model_path=loaded.model_path,
                             is_default_model=args.model_path is None)
    worker = create_draft_worker(draft_ctx, speculative_config(args))
    decoder = SpecDecoder(runner, cache, worker, eos, vocab_size)
    output = OutputProcessor(tokenizer, eos)
    scheduler = Scheduler(runner, cache, decoder, output, args.max_running_requests,
                          args.chunked_prefill_size, emit)
    parts = EngineParts(
        args=args, config=cfg, tokenizer=tokenizer, model_path=loaded.model_path,
        is_default_model=args.model_path is None, context_len=context_len,
        vocab_size=vocab_size, runner=runner, cache=cache, decoder=decoder, output=output,
        scheduler=scheduler, metrics=EngineMetrics(), load_seconds=time.monotonic() - t0,
    )
    logger.info("engine ready in %.2fs (model %s, %s, %s)", parts.load_seconds,
                loaded.model_path, dtype, device)
    return parts
