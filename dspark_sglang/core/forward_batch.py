"""Device-side batch description that models and attention backends read.

Three batch levels flow one way: lists of ``Req`` (scheduler, CPU) -> ``ForwardBatch``
(tensors, this file) -> backend-private attention metadata (built once per forward by
``AttentionBackend.init_forward_metadata``). Models read only a ``ForwardBatch``; speculative state
never lives on a model object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class ForwardMode(enum.Enum):
    EXTEND = enum.auto()  # prefill (possibly on top of a cached prefix, possibly a chunk)
    DECODE = enum.auto()  # exactly one new token per request
    TARGET_VERIFY = enum.auto()  # [anchor, draft_1..draft_l] per request, custom mask allowed


@dataclass
class ForwardBatch:
    """One forward pass over ``bs`` requests, ``num_tokens`` new tokens in total.

    New tokens of request ``i`` occupy rows ``extend_start[i] : extend_start[i] + extend_lens[i]``
    of ``input_ids``/``positions``/``out_cache_loc``. Their K/V are written to the slots
    ``out_cache_loc`` before attention, so after the store, ``req_to_token[req_pool_indices[i],
    :seq_lens[i]]`` lists every slot request ``i`` attends to (prefix first, then the new tokens).

    Masking: every new token sees the whole prefix. Among the new tokens the mask is causal unless
    ``custom_masks[i]`` is given (bool ``[extend_lens[i], extend_lens[i]]``, True = may attend),
    which is how verification of chains and trees is expressed.
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, absolute position in the sequence
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slot of each new token
    req_pool_indices: torch.Tensor  # [bs] int64, row in req_to_token
    seq_lens: torch.Tensor  # [bs] int64, prefix + new tokens
    extend_lens: torch.Tensor  # [bs] int64, new tokens per request
    req_to_token: torch.Tensor  # [max_reqs, max_context] int64 (read only)
    custom_masks: list[torch.Tensor | None] | None = None  # per request [ext, ext] bool
    logits_indices: torch.Tensor | None = None  # [num_logits] rows to run the LM head on; None=all
    capture_layer_ids: tuple[int, ...] = ()  # layers whose output hidden states to return
    capture_final_hidden: bool = False  # also return final (post-norm) hidden states
    attn_metadata: Any = None  # set by the attention backend, private to it
    # host copies of small per-request lists (avoid device syncs in the scheduler / backends)
    seq_lens_list: list[int] = field(default_factory=list)
    extend_lens_list: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prefix_lens_list(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens_list, self.extend_lens_list)]


@dataclass
class ModelOutput:
    """What a model forward returns.

    ``logits``: ``[num_logits, vocab]`` float32 for the rows in ``ForwardBatch.logits_indices``.
    ``aux_hidden``: ``[num_tokens, len(capture_layer_ids) * hidden]`` concatenated hidden states of
    the captured layers (in ``capture_layer_ids`` order), or None.
    ``final_hidden``: ``[num_tokens, hidden]`` after the final norm, or None.
    """

    logits: torch.Tensor | None
    aux_hidden: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
