"""outlines-core backend: regex and JSON schema (through its schema -> regex translation).

outlines-core compiles a regex into an immutable token-level ``Index`` (a DFA whose edges are
tokens). A matcher is a list of DFA states, so ``copy`` and ``rollback`` are list operations. The
index only lists allowed tokens per state, so the packed mask row of a state is built once with
numpy and kept in a bounded per-grammar LRU. JSON uses outlines' own layout: an optional single
space around every structural token (``json.dumps`` output is one of the allowed layouts).
No EBNF: outlines-core has no context-free grammars.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import outlines_core
import torch
from outlines_core.json_schema import build_regex_from_schema

from dspark_sglang.constrained.base import (
    _MAX_FORCED_BYTES,
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


def build_outlines_vocabulary(info: TokenizerInfo) -> outlines_core.Vocabulary:
    """Decoded token bytes -> ids, special tokens (EOS included) left out."""
    by_bytes: dict[bytes, list[int]] = {}
    for idx, data in enumerate(info.token_bytes):
        if data:
            by_bytes.setdefault(data, []).append(idx)
    return outlines_core.Vocabulary(info.eos_token_ids[0], by_bytes)


class OutlinesCompiled(CompiledGrammar):
    """An ``Index`` plus a bounded cache of packed mask rows by DFA state (thread-safe)."""

    def __init__(
        self, kind: str, spec: str, info: TokenizerInfo, index: outlines_core.Index, cache: int
    ) -> None:
        super().__init__(kind, spec)
        self.info = info
        self.index = index
        self._width = bitmask_width(info.vocab_size)
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_states = cache
        self._lock = threading.Lock()
        single = np.asarray(info.single_byte_token, dtype=np.int64)  # [256], -1 = none
        self._has_byte_token = single >= 0  # [256] bool
        self._byte_tokens = np.where(self._has_byte_token, single, 0)  # [256]
        # tokens starting with a byte that has no single-byte token of its own
        self._orphan_tokens = np.asarray(
            [
                i
                for i, data in enumerate(info.token_bytes)
                if data and not self._has_byte_token[data[0]]
            ],
            dtype=np.int64,
        )

    def new_matcher(self) -> Grammar:
        return OutlinesGrammar(self, [self.index.get_initial_state()])

    def mask_row(self, state: int) -> np.ndarray:
        """Packed allowed tokens of ``state`` as uint32 ``[W]`` (read only, shared)."""
        with self._lock:
            row = self._rows.get(state)
            if row is not None:
                self._rows.move_to_end(state)
                return row
        allowed = np.asarray(self.index.get_allowed_tokens(state), dtype=np.int64)
        flags = np.zeros(self._width * 32, dtype=bool)
        flags[allowed] = True
        row = np.packbits(flags, bitorder="little").view(np.uint32)  # [W]
        row.setflags(write=False)
        with self._lock:
            self._rows[state] = row
            while len(self._rows) > self._cache_states:
                self._rows.popitem(last=False)
        return row

    def forced_bytes(self, state: int) -> bytes:
        """Bytes every continuation from ``state`` starts with.

        A byte ``b`` is forced when the state is not final, ``b``'s single-byte token is the only
        single-byte token allowed, and no allowed token starts with a byte that lacks a
        single-byte token. The index keeps only live edges, so any allowed token's first byte
        has its single-byte token allowed too (when the vocab has one): the test is exact for
        bytes with single-byte tokens and conservative (nothing forced) for the others.
        """
        out = bytearray()
        tokens = self._byte_tokens
        shifts = (tokens & 31).astype(np.uint32)
        orphans = self._orphan_tokens
        orphan_shifts = (orphans & 31).astype(np.uint32)
        while len(out) < _MAX_FORCED_BYTES and not self.index.is_final_state(state):
            row = self.mask_row(state)
            bits = ((row[tokens >> 5] >> shifts) & 1).astype(bool) & self._has_byte_token
            candidates = np.flatnonzero(bits)
            if len(candidates) != 1 or ((row[orphans >> 5] >> orphan_shifts) & 1).any():
                break
            byte = int(candidates[0])
            nxt = self.index.get_next_state(state, int(tokens[byte]))
            if nxt is None:  # pragma: no cover - an allowed edge always exists
                break
            out.append(byte)
            state = nxt
        return bytes(out)


class OutlinesGrammar(Grammar):
    def __init__(self, compiled: OutlinesCompiled, states: list[int]) -> None:
        super().__init__(compiled.info)
        self._compiled = compiled
        self._states = states  # states[0] is the initial state, states[-1] the current one

    def _accept(self, token: int) -> bool:
        nxt = self._compiled.index.get_next_state(self._states[-1], token)
        if nxt is None:
            return False
        self._states.append(nxt)
        return True

    def _rollback(self, num_tokens: int) -> None:
        if num_tokens >= len(self._states):
            raise ValueError(f"cannot roll back {num_tokens} of {len(self._states) - 1} tokens")
        del self._states[-num_tokens:]

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].numpy().view(np.uint32)[:] = self._compiled.mask_row(self._states[-1])

    def _is_accepting(self) -> bool:
        return bool(self._compiled.index.is_final_state(self._states[-1]))

    def _copy(self) -> Grammar:
        return OutlinesGrammar(self._compiled, list(self._states))

    def _forced_bytes(self) -> bytes:
        return self._compiled.forced_bytes(self._states[-1])


class OutlinesBackend(GrammarBackend):
    name = "outlines"
    supported_kinds = ("regex", "json_schema", "json_object")

    def __init__(self, info: TokenizerInfo, cache_size: int = 256, mask_cache: int = 1024) -> None:
        super().__init__(info, cache_size)
        self.vocabulary = build_outlines_vocabulary(info)
        self.mask_cache = mask_cache

    def _to_regex(self, kind: str, spec: str) -> str:
        if kind == "regex":
            return spec
        schema = (parse_json_schema(spec) if kind == "json_schema"
                  else '{"type": "object", "additionalProperties": true}')
        try:
            return build_regex_from_schema(schema)
        except (ValueError, TypeError) as exc:
            raise GrammarError(
                f"unsupported json_schema: {clean_backend_message(str(exc))}"
            ) from None

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        regex = self._to_regex(kind, spec)
        try:
            index = outlines_core.Index(regex, self.vocabulary)
        except (ValueError, TypeError) as exc:
            if kind == "regex":
                raise check_regex(spec, str(exc)) from None
            raise GrammarError(f"invalid {kind}: {clean_backend_message(str(exc))}") from None
        return OutlinesCompiled(kind, spec, self.info, index, self.mask_cache)
