"""Structured generation: grammar matchers, their backends and token bitmasks.

Importing this package imports no grammar library; ``get_grammar_backend`` loads one on demand.
"""

from __future__ import annotations

from dspark_sglang.constrained.base import (
    GRAMMAR_KINDS,
    CompiledGrammar,
    Grammar,
    GrammarBackend,
    GrammarError,
)
from dspark_sglang.constrained.bitmask import (
    allocate_bitmask,
    apply_bitmask_,
    bitmask_to_bool,
    bitmask_width,
    bool_to_bitmask,
)
from dspark_sglang.constrained.registry import (
    DEFAULT_GRAMMAR_BACKEND,
    get_grammar_backend,
    grammar_backend_names,
)
from dspark_sglang.constrained.tokenizer_info import TokenizerInfo, VocabType

__all__ = [
    "DEFAULT_GRAMMAR_BACKEND",
    "GRAMMAR_KINDS",
    "CompiledGrammar",
    "Grammar",
    "GrammarBackend",
    "GrammarError",
    "TokenizerInfo",
    "VocabType",
    "allocate_bitmask",
    "apply_bitmask_",
    "bitmask_to_bool",
    "bitmask_width",
    "bool_to_bitmask",
    "get_grammar_backend",
    "grammar_backend_names",
]
