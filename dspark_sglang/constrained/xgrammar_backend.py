"""xgrammar backend: regex, JSON schema, JSON object and GBNF/EBNF grammars.

The vocabulary is handed to ``xgrammar.TokenizerInfo`` as raw entry strings with special tokens
blanked (xgrammar treats empty entries as special, so it never allows them), EOS ids as its stop
tokens, and the model's vocab size (ids past the tokenizer are padding, never allowed). EOS itself
is handled by :class:`~dspark_sglang.constrained.base.Grammar`, never fed to xgrammar.
"""

from __future__ import annotations

import torch
import xgrammar

from dspark_sglang.constrained.base import (
    CompiledGrammar,
    Grammar,
    GrammarBackend,
    GrammarError,
    check_regex,
    clean_backend_message,
    parse_json_schema,
)
from dspark_sglang.constrained.tokenizer_info import TokenizerInfo, VocabType

_VOCAB_TYPES = {
    VocabType.RAW: xgrammar.VocabType.RAW,
    VocabType.BYTE_FALLBACK: xgrammar.VocabType.BYTE_FALLBACK,
    VocabType.BYTE_LEVEL: xgrammar.VocabType.BYTE_LEVEL,
}


def build_xgrammar_tokenizer_info(info: TokenizerInfo) -> xgrammar.TokenizerInfo:
    encoded = list(info.vocab_strings)
    for idx in info.special_token_ids:
        if idx < len(encoded):
            encoded[idx] = ""
    return xgrammar.TokenizerInfo(
        encoded,
        _VOCAB_TYPES[info.vocab_type],
        vocab_size=info.vocab_size,
        stop_token_ids=list(info.eos_token_ids),
        add_prefix_space=info.add_prefix_space,
    )


class XGrammarGrammar(Grammar):
    def __init__(self, info: TokenizerInfo, matcher: xgrammar.GrammarMatcher) -> None:
        super().__init__(info)
        self._matcher = matcher

    def _accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    def _rollback(self, num_tokens: int) -> None:
        try:
            self._matcher.rollback(num_tokens)
        except RuntimeError as exc:  # more tokens than were accepted
            raise ValueError(clean_backend_message(str(exc))) from None

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def _is_accepting(self) -> bool:
        return bool(self._matcher.is_completed())

    def _copy(self) -> Grammar:
        return XGrammarGrammar(self.info, self._matcher.fork())

    def _forced_bytes(self) -> bytes:
        return self._matcher.find_jump_forward_string().encode("utf-8")


class XGrammarCompiled(CompiledGrammar):
    def __init__(self, kind: str, spec: str, info: TokenizerInfo, compiled: object) -> None:
        super().__init__(kind, spec)
        self._info = info
        self._compiled = compiled

    def new_matcher(self) -> Grammar:
        # unlimited rollback: speculative verification may undo a whole accepted run
        matcher = xgrammar.GrammarMatcher(self._compiled, max_rollback_tokens=-1)
        return XGrammarGrammar(self._info, matcher)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, info: TokenizerInfo, cache_size: int = 256, max_threads: int = 2) -> None:
        super().__init__(info, cache_size)
        self._compiler = xgrammar.GrammarCompiler(
            build_xgrammar_tokenizer_info(info), max_threads=max_threads, cache_enabled=False
        )

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        layout = {"any_whitespace": False, "separators": (", ", ": ")}
        try:
            if kind == "regex":
                compiled = self._compiler.compile_regex(spec)
            elif kind == "json_schema":
                compiled = self._compiler.compile_json_schema(parse_json_schema(spec), **layout)
            elif kind == "json_object":
                compiled = self._compiler.compile_json_schema(
                    '{"type": "object", "additionalProperties": true}', **layout)
            else:  # ebnf
                compiled = self._compiler.compile_grammar(spec)
        except GrammarError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError for user errors
            if kind == "regex":
                raise check_regex(spec, str(exc)) from None
            raise GrammarError(f"invalid {kind}: {clean_backend_message(str(exc))}") from None
        return XGrammarCompiled(kind, spec, self.info, compiled)
