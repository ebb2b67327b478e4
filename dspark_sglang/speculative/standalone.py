"""STANDALONE drafting: a small LM with the target's tokenizer drafts ``k`` tokens autoregressively.

The draft model has its own KV pool indexed by the shared slot allocator. Its KV for committed
tokens is (re)computed over exactly the target's forward batches (prefill chunks and verify
passes, same slots, same masks) in ``on_target_forward``; the k decode steps of ``propose`` write
to scratch slots that are freed before verification.
"""

from __future__ import annotations

import torch

from dspark_sglang.constrained.draft_walk import valid_draft_prefix
from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput
from dspark_sglang.core.req import Req
from dspark_sglang.model_executor.model_loader import build_target_model
from dspark_sglang.model_executor.model_runner import (
    BatchRequestSpec,
    ModelRunner,
    build_forward_batch,
)
from dspark_sglang.models.loader import load_model_files
from dspark_sglang.speculative.context import DraftContext, SpeculativeConfig
from dspark_sglang.speculative.worker import Draft, DraftWorker


class StandaloneWorker(DraftWorker):
    name = "STANDALONE"

    def __init__(self, ctx: DraftContext, cfg: SpeculativeConfig) -> None:
        if cfg.draft_model_path is None:
            raise ValueError("STANDALONE needs speculative_draft_model_path")
        loaded = load_model_files(cfg.draft_model_path)
        if loaded.config.vocab_size != ctx.config.vocab_size:
            raise ValueError("the STANDALONE draft model must share the target's vocabulary "
                             f"({loaded.config.vocab_size} != {ctx.config.vocab_size})")
        target = ctx.runner
        model = build_target_model(loaded.config, loaded.state_dict, target.dtype, target.device,
                                   ctx.context_len + 64)
        self.runner = ModelRunner(model, ctx.num_slots, target.dtype, "torch_native",
                                  target.device)
        self.cache = ctx.cache
        self.k = cfg.num_draft_tokens or 4
        self.context_len = ctx.context_len

    def max_draft_len(self) -> int:
        return self.k

    @torch.inference_mode()
    def on_target_forward(self, fb: ForwardBatch, out: ModelOutput) -> None:
        mirror = ForwardBatch(
            mode=fb.mode, input_ids=fb.input_ids, positions=fb.positions,
            out_cache_loc=fb.out_cache_loc, req_pool_indices=fb.req_pool_indices,
            seq_lens=fb.seq_lens, extend_lens=fb.extend_lens, req_to_token=fb.req_to_token,
            custom_masks=fb.custom_masks, logits_indices=torch.empty(0, dtype=torch.int64),
            seq_lens_list=fb.seq_lens_list, extend_lens_list=fb.extend_lens_list)
        self.runner.forward(mirror)

    @torch.inference_mode()
    def propose(self, reqs: list[Req]) -> list[Draft]:
        rooms = [min(self.k, r.draft_room(self.context_len)) for r in reqs]
        k = max(rooms)
        if k == 0:
            return [Draft() for _ in reqs]
        scratch = self.cache.alloc_slots(k * len(reqs))
        if scratch is None:
            return [Draft() for _ in reqs]
        try:
            drafts: list[list[int]] = [[] for _ in reqs]
            last = [r.output_ids[-1] for r in reqs]
            for step in range(k):
                specs = []
                for i, r in enumerate(reqs):
                    loc = scratch[i * k + step : i * k + step + 1]
                    self.cache.req_to_token_pool.write(r.req_pool_idx, r.kv_len + step, loc)
                    specs.append(BatchRequestSpec(r.req_pool_idx, [last[i]], r.kv_len + step,
                                                  loc))
                fb = build_forward_batch(ForwardMode.DECODE, specs, self.cache.req_to_token)
                logits = self.runner.forward(fb).logits
                assert logits is not None
                nxt = logits.argmax(dim=-1).tolist()
                for i in range(len(reqs)):
                    drafts[i].append(nxt[i])
                last = nxt
        finally:
            self.cache.free_slots(scratch)
        return [Draft(tokens=valid_draft_prefix(r.grammar, d[: rooms[i]]))
                for i, (r, d) in enumerate(zip(reqs, drafts))]
