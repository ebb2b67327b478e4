"""A request as the scheduler sees it. Only the scheduler thread mutates a Req."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from dspark_sglang.core.sampling_params import SamplingParams


class ReqState(enum.Enum):
    WAITING = enum.auto()
    PREFILL = enum.auto()  # admitted, prompt (chunks) still being computed
    RUNNING = enum.auto()  # decoding / speculating
    FINISHED = enum.auto()


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    grammar: Any = None  # constrained.base.Grammar (live matcher) or None
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    state: ReqState = ReqState.WAITING
    # KV bookkeeping (see mem_cache/radix_cache.py region map)
    req_pool_idx: int | None = None
    prefix_len: int = 0  # tree-owned leading slots (locked through last_node)
    kv_len: int = 0  # tokens whose target KV (and draft ctx) are written
    last_node: Any = None
    cached_tokens: int = 0  # prefix-cache hit reported to the user
    generator: torch.Generator | None = None
    # finish
    finish_reason: dict[str, Any] | None = None
    # logprobs
    input_token_logprobs: list[Any] = field(default_factory=list)
    input_top_logprobs: list[Any] = field(default_factory=list)
    output_token_logprobs: list[Any] = field(default_factory=list)
    output_top_logprobs: list[Any] = field(default_factory=list)
    # speculation stats
    spec_verify_ct: int = 0
    spec_accepted_drafts: int = 0
    spec_draft_tokens: int = 0
    # streaming / output bookkeeping
    decoded_text: str = ""  # output decoded so far (complete characters; OutputProcessor)
    detokenizer: Any = None  # models.tokenizer.IncrementalDecoder behind decoded_text
    stop_offset: int | None = None  # where a matched stop string / regex starts in decoded_text
    sent_len: int = 0
    created_at: float = 0.0
    deadline: float | None = None  # time.monotonic() after which the scheduler aborts it (408)
    first_token_at: float | None = None
    callback: Any = None  # called (from the scheduler thread) with output dicts

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def prefill_target_len(self) -> int:
        """How many tokens the prefill must put in KV: the whole prompt for a fresh request; all
        but the last token for a request re-admitted after retraction (its last output token is the
        next decode input)."""
        return self.seqlen - 1 if self.output_ids else len(self.origin_input_ids)

    def draft_room(self, context_len: int | None = None) -> int:
        """How many draft tokens this request may verify in its next step: the step's own target
        token must still fit under ``max_new_tokens`` and, when ``context_len`` is given, every
        verified token under the context length (the KV holds ``kv_len`` tokens, the anchor is
        next)."""
        room = self.sampling_params.max_new_tokens - len(self.output_ids) - 1
        if context_len is not None:
            room = min(room, context_len - self.kv_len - 1)
        return max(0, room)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
