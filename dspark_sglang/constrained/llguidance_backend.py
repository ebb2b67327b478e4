"""llguidance backend: regex, JSON schema, JSON object and GBNF/Lark grammars.

``LLTokenizer`` is built from the tokenizer.json text of the Rust tokenizer (no transformers), with
the model's vocab size and the EOS ids. llguidance puts a matcher that sees a bad token into a
permanent error state, so tokens are validated before they are consumed; and it treats EOS after a
complete match as a no-op, so EOS is handled by :class:`~dspark_sglang.constrained.base.Grammar`.
"""

from __future__ import annotations

import llguidance
import torch

from dspark_sglang.constrained.base import (
    CompiledGrammar,
    Grammar,
    GrammarBackend,
    GrammarError,
    check_regex,
    clean_backend_message,
    parse_json_schema,
)
from dspark_sglang.constrained.bitmask import bitmask_width
from dspark_sglang.constrained.tokenizer_info import TokenizerInfo

_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class LLGuidanceGrammar(Grammar):
    def __init__(self, info: TokenizerInfo, matcher: llguidance.LLMatcher) -> None:
        super().__init__(info)
        self._matcher = matcher

    def _accept(self, token: int) -> bool:
        if self._matcher.validate_tokens([token]) != 1:
            return False
        ok = self._matcher.consume_token(token)
        if not ok:  # pragma: no cover - validated above
            raise RuntimeError(
                f"llguidance rejected a validated token: {self._matcher.get_error()}"
            )
        return True

    def _rollback(self, num_tokens: int) -> None:
        if not self._matcher.rollback(num_tokens):
            raise ValueError(f"llguidance cannot roll back {num_tokens} tokens")

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]  # [W] int32, contiguous view
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def _is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def _copy(self) -> Grammar:
        return LLGuidanceGrammar(self.info, self._matcher.deep_copy())

    def _forced_bytes(self) -> bytes:
        return bytes(self._matcher.compute_ff_bytes())


class LLGuidanceCompiled(CompiledGrammar):
    """Holds a pristine matcher (llguidance compiles inside the matcher) and hands out copies."""

    def __init__(
        self, kind: str, spec: str, info: TokenizerInfo, pristine: llguidance.LLMatcher
    ) -> None:
        super().__init__(kind, spec)
        self._info = info
        self._pristine = pristine

    def new_matcher(self) -> Grammar:
        return LLGuidanceGrammar(self._info, self._pristine.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, info: TokenizerInfo, cache_size: int = 256) -> None:
        super().__init__(info, cache_size)
        self.lltokenizer = llguidance.LLTokenizer(
            info.tokenizer_json, n_vocab=info.vocab_size, eos_token=list(info.eos_token_ids)
        )
        assert bitmask_width(self.lltokenizer.vocab_size) == bitmask_width(info.vocab_size)

    def _grammar_text(self, kind: str, spec: str) -> str:
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "ebnf":
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                lark = any_to_lark(spec)
            except Exception as exc:  # noqa: BLE001 - converter raises assorted errors
                raise GrammarError(f"invalid ebnf: {exc}") from None
            return llguidance.LLMatcher.grammar_from_lark(lark)
        schema = (parse_json_schema(spec) if kind == "json_schema"
                  else '{"type": "object", "additionalProperties": true}')
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_LAYOUT)
        except ValueError as exc:
            raise GrammarError(f"invalid json_schema: {exc}") from None

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        grammar = self._grammar_text(kind, spec)
        probe = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if not probe.is_error():  # build the lexer for the start state now (see _compile)
            mask = torch.zeros(bitmask_width(self.info.vocab_size), dtype=torch.int32)
            probe.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if probe.is_error():
            raw = probe.get_error()
            if "NoExtensionBias" in raw:  # the start state allows nothing, not even the end
                raise GrammarError(f"{kind} can never be satisfied: no token is allowed at the "
                                   "start")
            message = clean_backend_message(raw)
            if kind == "regex":
                raise check_regex(spec, message)
            raise GrammarError(f"invalid {kind}: {message}")
        return LLGuidanceCompiled(kind, spec, self.info, probe)
