"""Per-row logits adjustments shared by plain decoding, prefill sampling and verification.

A "row" is one position whose next token is decided: row ``j`` of a request in a verify pass
sees the request's output plus the first ``j`` draft tokens (``history_extra``). Every adjustment
that depends on history (penalties, ``min_new_tokens``, grammar) is applied per row, so speculative
and plain decoding see exactly the same distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dspark_sglang.core.req import Req


@dataclass
class RowSpec:
    req: Req
    history_extra: list[int]  # draft tokens between the request's output and this row
    grammar: Any = None  # matcher positioned at this row (a copy for speculative rows), or None


def needs_adjust(rows: list[RowSpec], logits_vocab: int, vocab_size: int) -> bool:
    """Whether ``adjust_logits_`` would change anything (skip the clone on the hot path)."""
    if logits_vocab > vocab_size:
        return True
    for r in rows:
        sp = r.req.sampling_params
        if r.grammar is not None or sp.min_new_tokens or sp.frequency_penalty \
                or sp.presence_penalty or sp.repetition_penalty != 1.0 or sp.logit_bias:
            return True
    return False


def adjust_logits_(logits: torch.Tensor, rows: list[RowSpec], eos_ids: set[int],
                   vocab_size: int) -> None:
    """In place on ``logits [len(rows), V]``: logit_bias, penalties, min_new_tokens, grammar
    masks (bias first, so a masked token stays masked). A grammar row whose matcher allows no
    token at all (a dead end) is left unmasked, so sampling stays defined there."""
    if logits.shape[-1] > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    for i, r in enumerate(rows):
        bias = r.req.sampling_params.logit_bias
        if bias:
            ids = torch.tensor([int(k) for k in bias])
            logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype)
    grammar_rows = [i for i, r in enumerate(rows) if r.grammar is not None]
    if grammar_rows:
        from dspark_sglang.constrained.base import allocate_bitmask, apply_bitmask_

        bitmask = allocate_bitmask(len(grammar_rows), logits.shape[-1])
        for k, i in enumerate(grammar_rows):
            g = rows[i].grammar
            if g.is_terminated():
                bitmask[k].fill_(0)
                for e in eos_ids:  # a finished grammar only allows ending
                    bitmask[k, e // 32] |= (1 << (e % 32)) if e % 32 != 31 else -(1 << 31)
            else:
                g.fill_bitmask(bitmask, k)
        # a dead end (a live state that allows no token) stays unmasked: the live matcher refuses
        # the token drawn there and OutputProcessor ends the request (finish_reason abort)
        bitmask[~bitmask.any(dim=1)] = -1
        sub = logits[grammar_rows]
        apply_bitmask_(sub, bitmask)
        logits[grammar_rows] = sub
    for i, r in enumerate(rows):
        sp = r.req.sampling_params
        n_out = len(r.req.output_ids) + len(r.history_extra)
        if sp.min_new_tokens and n_out < sp.min_new_tokens:
            ban = [t for t in (eos_ids | set(sp.stop_token_ids)) if t < logits.shape[-1]]
            logits[i, ban] = float("-inf")
        if sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0:
            hist = r.req.output_ids + r.history_extra
            if sp.frequency_penalty or sp.presence_penalty:
                if hist:
                    ids, counts = torch.tensor(hist, device=logits.device).unique(
                        return_counts=True)
                    logits[i, ids] -= sp.frequency_penalty * counts.to(logits.dtype) \
                        + sp.presence_penalty
            if sp.repetition_penalty != 1.0:
                ids = torch.tensor(sorted(set(r.req.origin_input_ids + hist)),
                                   device=logits.device)
                vals = logits[i, ids]
                logits[i, ids] = torch.where(vals > 0, vals / sp.repetition_penalty,
                                             vals * sp.repetition_penalty)


def sampling_info(reqs: list[Req]) -> Any:
    """``SamplingBatchInfo`` with one row per request."""
    from dspark_sglang.layers.sampler import SamplingBatchInfo

    sps = [r.sampling_params for r in reqs]
    return SamplingBatchInfo.from_lists(
        temperatures=[0.0 if sp.is_greedy else float(sp.temperature) for sp in sps],
        top_ks=[sp.top_k for sp in sps], top_ps=[float(sp.top_p) for sp in sps],
        min_ps=[float(sp.min_p) for sp in sps], generators=[r.generator for r in reqs])
