"""Grammar backend registry with lazy imports.

Measured with ``python -m dspark_sglang.benchmark.grammar`` on the shared 2-core CPU box (busy:
numbers vary ~2x between runs), SmolLM2 vocab (49,152 tokens), torch on 1 thread. Medians in ms.
Schema: 4 properties incl. a string array; regex: ``[0-9]{4}-[0-9]{2}-[0-9]{2}``; long regex:
``[A-Za-z ,.]{1,400}``; mask = one ``fill_bitmask`` per token while walking a valid answer
("first" = first visit of the state); build = backend construction incl. the library import.

|backend   | build | JSON compile | JSON mask 1st/again | regex compile | regex mask | long regex |
|-----------|------:|-------------:|--------------------:|--------------:|-----------:|-----------:|
|llguidance|   560 |         7-12 |   0.04-0.08 / 0.03  |         1-1.5 |  0.01-0.03 |      1-1.5 |
|xgrammar  |  3300 |           33 |        0.03 / 0.02  |         0.6-2 |       0.02 |  5800-7600 |
|outlines  |   400 |      770-840 |        0.05 / 0.02  |         60-90 |       0.02 |  7600-8700 |

``copy()`` costs 2-6 us on all three.
(outlines builds a state's mask row from its allowed-token list on first visit, ~1-3 ms inside a
free string, then serves it from a per-grammar LRU; its "any JSON object" index takes ~12 s.)

Default: llguidance. It compiles every grammar in about a millisecond (xgrammar and outlines take
seconds on long bounded repeats, which would stall a request at admission), its masks cost about
as much as xgrammar's (all far below a decode step), and it covers regex, JSON schema and GBNF.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module stays light: ServerArgs reads the names
    from dspark_sglang.constrained.base import GrammarBackend
    from dspark_sglang.constrained.tokenizer_info import TokenizerInfo

DEFAULT_GRAMMAR_BACKEND = "llguidance"

_BACKENDS: dict[str, tuple[str, str]] = {
    "llguidance": ("dspark_sglang.constrained.llguidance_backend", "LLGuidanceBackend"),
    "xgrammar": ("dspark_sglang.constrained.xgrammar_backend", "XGrammarBackend"),
    "outlines": ("dspark_sglang.constrained.outlines_backend", "OutlinesBackend"),
}


def grammar_backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_grammar_backend(
    name: str, tokenizer_info: TokenizerInfo, **kwargs: object
) -> GrammarBackend:
    """Build the backend ``name`` ("default" means :data:`DEFAULT_GRAMMAR_BACKEND`) for a tokenizer.

    Building one converts the whole vocabulary (tens to hundreds of ms): do it once per model.
    """
    if name == "default":
        name = DEFAULT_GRAMMAR_BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; choose from {', '.join(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(tokenizer_info, **kwargs)
