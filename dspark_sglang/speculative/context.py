"""What a draft worker is given: the engine's live parts (``DraftContext``) and its settings
(``SpeculativeConfig``). ``entrypoints/model_setup.py`` builds both from ``ServerArgs``; nothing
under ``speculative/`` reads ``ServerArgs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dspark_sglang.mem_cache.cache_manager import CacheManager
    from dspark_sglang.model_executor.model_runner import ModelRunner
    from dspark_sglang.models.config import ModelConfig


@dataclass(frozen=True)
class SpeculativeConfig:
    """The ``--speculative-*`` flags without their prefix (``ServerArgs`` documents each)."""

    algorithm: str = "NONE"
    draft_model_path: str | None = None
    draft_model_quantization: str | None = None
    num_draft_tokens: int | None = None
    eagle_topk: int = 4
    dspark_block_size: int | None = None
    dspark_sps_table_path: str | None = None
    dspark_confidence_sts_path: str | None = None
    dspark_disable_draft_budget: bool = False
    token_map: str | None = None
    token_map_size: int | None = None
    ngram_max_match: int = 4


@dataclass(frozen=True)
class DraftContext:
    """The target side a draft worker may use, fully built before the worker is.

    ``runner`` is the target's (its model, dtype, device; a worker may read the model's shared
    embedding / LM head, never mutate it); ``cache`` owns the slot allocator every pool shares
    (``num_slots`` slots) and ``req_to_token``; ``context_len`` bounds every request's tokens.
    """

    runner: ModelRunner
    cache: CacheManager
    config: ModelConfig  # the target's
    num_slots: int
    context_len: int
    model_path: str
    is_default_model: bool
