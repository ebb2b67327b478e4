"""Grammar interface: a live matcher per request, compiled grammars, and a caching backend.

Contracts every backend keeps (tests/test_constrained.py checks them on each backend):

- Token ids are model vocab ids. The bitmask row of the NEXT token allows only tokens the grammar
  can extend with; special tokens and ids past the tokenizer's vocab are never allowed; the EOS ids
  are allowed exactly when the text so far is a complete match, and accepting one terminates the
  matcher. A terminated matcher allows nothing and accepts nothing.
- ``accept_token`` returns False for a token the grammar does not allow and leaves the state as it
  was. ``rollback(n)`` undoes the last ``n`` accepted tokens (EOS included) and restores exactly
  the earlier masks. ``copy()`` gives a matcher whose later changes do not affect this one (for
  speculative walks over drafts; the live ``Req.grammar`` is advanced only in output processing).
- ``find_jump_forward_tokens`` returns the tokens the grammar forces right now, as the tokenizer
  itself would split the forced text (nothing when a continuation could re-split the last chunk).
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict

import numpy as np
import torch

from dspark_sglang.constrained.bitmask import (  # noqa: F401 - re-exported helpers
    allocate_bitmask,
    apply_bitmask_,
    bitmask_to_bool,
    bitmask_width,
)
from dspark_sglang.constrained.schema_strict import strict_schema
from dspark_sglang.constrained.tokenizer_info import TokenizerInfo

GRAMMAR_KINDS: tuple[str, ...] = ("regex", "json_schema", "json_object", "ebnf")
_MAX_FORCED_BYTES = 4096


class GrammarError(ValueError):
    """The grammar spec is invalid or unsupported (the server answers HTTP 400 with the message)."""


def clean_backend_message(message: str) -> str:
    """Drop C++ log prefixes such as ``[10:39:29] /project/cpp/x.cc:94: `` from a library error."""
    text = re.sub(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ", "", str(message)).strip()
    return text or "invalid grammar"


class Grammar(ABC):
    """A live matcher for one request. Not thread-safe; one owner at a time.

    Subclasses implement the ``_``-hooks for non-EOS tokens only; this class owns EOS and
    termination so every backend treats them the same way.
    """

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        self._terminated = False
        self._num_tokens = 0  # accepted non-EOS tokens still in the history

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _accept(self, token: int) -> bool:
        """Advance by a non-special token id below the tokenizer vocab; False = state unchanged."""

    @abstractmethod
    def _rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` tokens accepted by :meth:`_accept`."""

    @abstractmethod
    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the full row (all ``W`` words) of allowed non-EOS tokens."""

    @abstractmethod
    def _is_accepting(self) -> bool:
        """Whether the text so far is a complete match (EOS may follow)."""

    @abstractmethod
    def _copy(self) -> Grammar:
        """An independent matcher in the same state, not terminated."""

    @abstractmethod
    def _forced_bytes(self) -> bytes:
        """The bytes every continuation starts with (empty when there is a choice)."""

    # -- public API ----------------------------------------------------------------------
    def accept_token(self, token: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""
        if self._terminated:
            return False
        token = int(token)
        if token in self.info.eos_token_ids:
            if self._is_accepting():
                self._terminated = True
                return True
            return False
        if not 0 <= token < self.info.tokenizer_vocab_size or token in self.info.special_token_ids:
            return False
        if not self._accept(token):
            return False
        self._num_tokens += 1
        return True

    def accept_tokens(self, tokens: list[int]) -> int:
        """Accept tokens left to right; returns how many were accepted (stops at the first no)."""
        for i, tok in enumerate(tokens):
            if not self.accept_token(tok):
                return i
        return len(tokens)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (an accepted EOS counts as one)."""
        if not 0 <= num_tokens <= self._num_tokens + self._terminated:
            raise ValueError(
                f"cannot roll back {num_tokens} of {self._num_tokens + self._terminated} tokens"
            )
        if num_tokens == 0:
            return
        if self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens:
            self._rollback(num_tokens)
            self._num_tokens -= num_tokens

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed NEXT tokens into ``bitmask[row]``; the matcher does not change.

        ``bitmask`` is CPU int32 ``[n_rows, ceil(vocab_size / 32)]`` (see ``allocate_bitmask``).
        """
        assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu", bitmask
        assert bitmask.dim() == 2 and bitmask.shape[1] == bitmask_width(self.info.vocab_size), (
            bitmask.shape,
            self.info.vocab_size,
        )
        assert bitmask.is_contiguous()
        if self._terminated:
            bitmask[row].zero_()
            return
        self._fill(bitmask, row)
        words = bitmask[row].numpy().view(np.uint32)  # [W] shares memory with the tensor
        accepting = self._is_accepting()
        for eos in self.info.eos_token_ids:
            bit = np.uint32(1 << (eos & 31))
            if accepting:
                words[eos >> 5] |= bit
            else:
                words[eos >> 5] &= ~bit

    def is_terminated(self) -> bool:
        """Whether an EOS token has been accepted."""
        return self._terminated

    def copy(self) -> Grammar:
        """An independent matcher in the same state (rollback history included where kept)."""
        other = self._copy()
        other._terminated = self._terminated
        other._num_tokens = self._num_tokens
        return other

    def find_jump_forward_tokens(self) -> list[int]:
        """Tokens the grammar forces now, in the tokenizer's own split; [] if none.

        The forced text is tokenised on its own; tokens of its last pre-tokenizer chunk are kept
        only when the grammar can do nothing but end after it. Each returned token is allowed in
        sequence (checked on a copy). The matcher does not change.
        """
        if self._terminated or self._is_accepting():
            return []
        forced = self._forced_bytes()
        if not forced:
            return []
        stable, tail = self.info.canonical_forced_tokens(forced)
        probe = self.copy()
        accepted = probe.accept_tokens(stable + tail)
        if accepted < len(stable):
            return stable[:accepted]
        if tail and accepted == len(stable) + len(tail) and probe._only_eos_allowed():
            return stable + tail
        return stable

    def _only_eos_allowed(self) -> bool:
        mask = allocate_bitmask(1, self.info.vocab_size)
        self._fill(mask, 0)
        words = mask[0].numpy().view(np.uint32).copy()
        for eos in self.info.eos_token_ids:
            words[eos >> 5] &= ~np.uint32(1 << (eos & 31))
        return not words.any()


class CompiledGrammar(ABC):
    """An immutable compiled grammar; cheap to share across requests and threads."""

    def __init__(self, kind: str, spec: str) -> None:
        self.kind = kind
        self.spec = spec

    @abstractmethod
    def new_matcher(self) -> Grammar:
        """A fresh matcher at the start of the grammar."""


class GrammarBackend(ABC):
    """Compiles grammar specs for one tokenizer, caching results by ``(kind, spec)`` (LRU).

    ``kind`` is one of :data:`GRAMMAR_KINDS`: ``regex`` (full match), ``json_schema`` (spec is the
    schema as a JSON string), ``json_object`` (any JSON object; spec ignored) and ``ebnf`` (a GBNF
    grammar with a ``root`` rule). JSON is laid out like ``json.dumps``: ``", "`` between items,
    ``": "`` after keys, no other whitespace, properties in schema order (outlines-core is looser:
    an optional space around every token). Invalid specs raise :class:`GrammarError` and are not
    cached. ``compile`` is thread-safe; a scheduler may call it from a worker thread.
    """

    name: str = ""
    supported_kinds: tuple[str, ...] = GRAMMAR_KINDS

    def __init__(self, info: TokenizerInfo, cache_size: int = 256,
                 cache_bytes: int = 512 << 20) -> None:
        self.info = info
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes  # bound on the summed memory cost of cached grammars
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cost: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Compile without caching; raise GrammarError on a bad spec. A backend that builds
        its automaton lazily builds the first mask here, so a grammar's memory (measured for the
        cache budget) and its resource-limit errors show on the caller's thread, not in a
        scheduler step."""

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        if kind not in self.supported_kinds:
            raise GrammarError(
                f"grammar kind {kind!r} is not supported by the {self.name} backend "
                f"(supported: {', '.join(self.supported_kinds)})"
            )
        if kind == "json_object":
            spec = ""
        key = (kind, spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        before = _rss_bytes()
        compiled = self._compile(kind, spec)  # a lazy backend builds its first mask in here
        _check_satisfiable(compiled, kind, self.info.vocab_size)
        cost = max(_rss_bytes() - before, 64 << 10)  # approximate: other threads allocate too
        with self._lock:
            self._cache[key] = compiled
            self._cost[key] = cost
            self._cache.move_to_end(key)
            while len(self._cache) > 1 and (len(self._cache) > self.cache_size
                                            or sum(self._cost.values()) > self.cache_bytes):
                old, _ = self._cache.popitem(last=False)
                self._cost.pop(old, None)
        return compiled

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def cache_cost_bytes(self) -> int:
        """Summed memory the cached grammars cost when compiled (RSS growth, approximate)."""
        with self._lock:
            return sum(self._cost.values())

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cost.clear()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0


def _check_satisfiable(compiled: CompiledGrammar, kind: str, vocab_size: int) -> None:
    """Raise GrammarError when no output can ever satisfy the grammar: its start state allows no
    token at all, not even end-of-sequence (e.g. regex ``[^\\s\\S]``). Decoding such a grammar
    would otherwise sample from an all-masked distribution."""
    try:
        m = compiled.new_matcher()
    except NotImplementedError:  # a compiled grammar that cannot make matchers decides nothing
        return
    if m.is_terminated():
        return
    bitmask = torch.zeros((1, bitmask_width(vocab_size)), dtype=torch.int32)
    m.fill_bitmask(bitmask, 0)
    if not bool(bitmask.any()):
        raise GrammarError(f"{kind} can never be satisfied: no token is allowed at the start")


def parse_json_schema(spec: str) -> str:
    """Check that ``spec`` is a JSON object or boolean schema; return it re-serialised, strict.

    If the ``jsonschema`` package is installed the schema is also checked against its meta-schema,
    so a schema like ``{"type": "foo"}`` gets a precise message. Object subschemas that say
    nothing about extra keys forbid them (:mod:`constrained.schema_strict`, SGLang's meaning).
    """
    import json

    try:
        schema = json.loads(spec)
    except (TypeError, json.JSONDecodeError) as exc:
        raise GrammarError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:
        return json.dumps(strict_schema(schema))
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise GrammarError(f"invalid json_schema at '{path}': {exc.message}") from None
    return json.dumps(strict_schema(schema))


def check_regex(spec: str, backend_message: str) -> GrammarError:
    """A GrammarError for a regex the backend rejected, worded by Python's parser when it can."""
    try:
        re.compile(spec)
    except re.error as exc:
        return GrammarError(f"invalid regex {spec!r}: {exc}")
    return GrammarError(f"invalid regex {spec!r}: {clean_backend_message(backend_message)}")
