"""Structured generation: grammar matchers, their backends and token bitmasks.

Importing this package imports no grammar library (nor torch); ``get_grammar_backend`` loads a
backend on demand.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "GRAMMAR_KINDS": "base", "CompiledGrammar": "base", "Grammar": "base",
    "GrammarBackend": "base", "GrammarError": "base",
    "allocate_bitmask": "bitmask", "apply_bitmask_": "bitmask", "bitmask_to_bool": "bitmask",
    "bitmask_width": "bitmask", "bool_to_bitmask": "bitmask",
    "DEFAULT_GRAMMAR_BACKEND": "registry", "get_grammar_backend": "registry",
    "grammar_backend_names": "registry",
    "TokenizerInfo": "tokenizer_info", "VocabType": "tokenizer_info",
}


def __getattr__(name: str) -> Any:  # lazy: importing a submodule (the registry) stays light
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


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
