"""What the grammar backends need to know about a tokenizer (from a HF ``tokenizers.Tokenizer``).

Run time never imports ``transformers``: every backend is built from the Rust tokenizer object, the
model's vocab size (the LM head may be wider than the tokenizer; the extra ids are never allowed)
and the EOS ids (allowed exactly when a grammar can terminate).

``token_bytes[i]`` is the byte string token ``i`` stands for once decoded, for the three vocabulary
encodings in use: byte-level BPE (GPT-2 style, ``Ġ`` = space), SentencePiece-style byte fallback
(``<0x0A>`` tokens, ``▁`` = space) and raw UTF-8. Special (control) tokens have ``None``: no grammar
ever allows them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import tokenizers

_META_SPACE = "\u2581"  # "▁"


class VocabType(enum.Enum):
    RAW = "raw"  # token text is the UTF-8 it decodes to
    BYTE_FALLBACK = "byte_fallback"  # SentencePiece: "▁" is a space, "<0xNN>" is one byte
    BYTE_LEVEL = "byte_level"  # GPT-2: each byte is drawn as one printable unicode char


def _byte_level_char_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes are drawn as the
    characters U+0100 onwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_LEVEL_TABLE = _byte_level_char_to_byte()


def _component_types(node: Any) -> list[str]:
    """Types of a tokenizer.json component, flattening ``Sequence`` nodes."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        out: list[str] = []
        for key in ("decoders", "pretokenizers", "normalizers"):
            for child in node.get(key, []) or []:
                out.extend(_component_types(child))
        return out
    return [str(node.get("type"))]


def detect_vocab_type(tokenizer_json: dict[str, Any]) -> VocabType:
    """Vocabulary encoding, read from the decoder (and the model's byte_fallback flag)."""
    decoders = _component_types(tokenizer_json.get("decoder"))
    model = tokenizer_json.get("model") or {}
    if "ByteLevel" in decoders:
        return VocabType.BYTE_LEVEL
    if "ByteFallback" in decoders or model.get("byte_fallback"):
        return VocabType.BYTE_FALLBACK
    return VocabType.RAW


def decode_token(text: str, vocab_type: VocabType) -> bytes:
    """Bytes that the vocabulary entry ``text`` stands for."""
    if vocab_type is VocabType.BYTE_LEVEL:
        if all(ch in _BYTE_LEVEL_TABLE for ch in text):
            return bytes(_BYTE_LEVEL_TABLE[ch] for ch in text)
        return text.encode("utf-8")  # an added, non-byte-level token
    if vocab_type is VocabType.BYTE_FALLBACK:
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                pass
        return text.replace(_META_SPACE, " ").encode("utf-8")
    return text.replace(_META_SPACE, " ").encode("utf-8")


@dataclass(frozen=True, eq=False)
class TokenizerInfo:
    """A tokenizer as the grammar subsystem sees it. Immutable; build once per model.

    ``vocab_size`` is the model's vocab (the LM head width, the bitmask width in bits); it must be
    at least the tokenizer's vocab. ``eos_token_ids`` end generation and are handled by the
    :class:`~dspark_sglang.constrained.base.Grammar` itself, not by the backends.
    """

    tokenizer: tokenizers.Tokenizer
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: tokenizers.Tokenizer,
        eos_token_ids: Sequence[int] | int,
        vocab_size: int | None = None,
    ) -> TokenizerInfo:
        eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
        if not eos:
            raise ValueError("at least one EOS token id is needed")
        tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        size = tok_vocab if vocab_size is None else int(vocab_size)
        if size < tok_vocab:
            raise ValueError(f"model vocab_size {size} is smaller than the tokenizer's {tok_vocab}")
        if any(not 0 <= e < size for e in eos):
            raise ValueError(f"EOS ids {eos} out of range for vocab_size {size}")
        return cls(tokenizer, size, eos)

    @cached_property
    def tokenizer_json(self) -> str:
        """The tokenizer serialised as tokenizer.json text (llguidance reads this)."""
        return self.tokenizer.to_str()

    @cached_property
    def tokenizer_vocab_size(self) -> int:
        """One past the largest token id the tokenizer knows."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max(len(vocab), max(vocab.values()) + 1)

    @cached_property
    def vocab_type(self) -> VocabType:
        return detect_vocab_type(json.loads(self.tokenizer_json))

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Added tokens marked special, plus the EOS ids: never produced by a grammar's text."""
        added = self.tokenizer.get_added_tokens_decoder()
        return frozenset(i for i, tok in added.items() if tok.special) | frozenset(
            self.eos_token_ids
        )

    @cached_property
    def vocab_strings(self) -> list[str]:
        """Vocabulary entry text by id, ``""`` for ids the tokenizer does not know."""
        out = [""] * self.tokenizer_vocab_size
        for text, idx in self.tokenizer.get_vocab(with_added_tokens=True).items():
            out[idx] = text
        return out

    @cached_property
    def token_bytes(self) -> list[bytes | None]:
        """Decoded bytes by id (length ``tokenizer_vocab_size``); None for special/unknown ids."""
        special = self.special_token_ids
        vt = self.vocab_type
        return [
            None if (i in special or not text) else decode_token(text, vt)
            for i, text in enumerate(self.vocab_strings)
        ]

    @cached_property
    def add_prefix_space(self) -> bool:
        """Whether encoding prepends a space to the text (SentencePiece "▁" prefix)."""
        ids = self.tokenizer.encode("a", add_special_tokens=False).ids
        if not ids:
            return False
        first = self.token_bytes[ids[0]]
        return bool(first) and first.startswith(b" ")

    @cached_property
    def single_byte_token(self) -> list[int]:
        """For each byte value, one token id that decodes to exactly that byte, or -1."""
        out = [-1] * 256
        for i, b in enumerate(self.token_bytes):
            if b is not None and len(b) == 1 and out[b[0]] < 0:
                out[b[0]] = i
        return out

    def canonical_forced_tokens(self, forced: bytes) -> tuple[list[int], list[int]]:
        """Tokenise forced text the way the tokenizer would, split by how safe each token is.

        Returns ``(stable, tail)``: ``stable`` are the tokens before the last pre-tokenizer
        chunk, which no continuation can change; ``tail`` are the tokens of the last chunk, which
        a continuation could merge into a longer token. Both are empty if ``forced`` is not
        complete UTF-8 or the tokenizer does not reproduce it byte for byte (e.g. it adds a
        prefix space). The text is tokenised in isolation from what came before it.
        """
        try:
            text = forced.decode("utf-8")
        except UnicodeDecodeError:
            return [], []
        if not text:
            return [], []
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if b"".join(self.token_bytes[i] or b"\x00\xff" for i in ids) != forced:
            return [], []
        pre = self.tokenizer.pre_tokenizer
        last_start = pre.pre_tokenize_str(text)[-1][1][0] if pre is not None else 0
        n_stable = sum(1 for _, end in enc.offsets if end <= last_start)
        return ids[:n_stable], ids[n_stable:]
