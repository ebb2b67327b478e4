"""Grammar backend registry with lazy imports.

Measured with ``python -m dspark_sglang.constrained.bench`` on the 2-core CPU box, SmolLM2 vocab
(49,152 tokens), one compile thread for xgrammar; "mask" is one ``fill_bitmask`` per token while
walking a valid answer (median ms), compile is the median of fresh compiles (no cache):

| backend    | compile JSON schema | mask JSON | compile date regex | mask regex | compile ``[A-Za-z ,.]{1,400}`` |
|------------|--------------------:|----------:|-------------------:|-----------:|-------------------------------:|
| xgrammar   |             ~8 ms   | ~0.01 ms  |           ~12 ms   | ~0.01 ms   |                        ~3.2 s  |
| llguidance |             ~1 ms   | ~0.02 ms  |           ~0.5 ms  | ~0.01 ms   |                        ~1 ms   |
| outlines   |            ~30 ms   | ~0.03 ms* |           ~15 ms   | ~0.02 ms*  |                        ~2.9 s  |

(* outlines: per-state rows cached; a state's first mask costs ~1-3 ms.) The numbers are
refreshed in the report of the change that last ran the benchmark. llguidance is the default: it
compiles every grammar in about a millisecond (xgrammar and outlines take seconds on long bounded
repeats, which would stall a request at admission), its masks cost about as much as xgrammar's, and
it has the widest grammar support (regex, JSON schema, Lark and GBNF).
"""

from __future__ import annotations

import importlib

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


def get_grammar_backend(name: str, tokenizer_info: TokenizerInfo, **kwargs: object) -> GrammarBackend:
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
