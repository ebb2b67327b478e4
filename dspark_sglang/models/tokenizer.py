"""Tokenizer wrapper over a HF ``tokenizers.Tokenizer`` (no ``transformers`` at runtime).

A tokenizer directory holds ``tokenizer.json`` and optionally ``tokenizer_config.json`` (special
token strings, ``add_bos_token``, ``chat_template``), ``chat_template.jinja``,
``generation_config.json`` and ``config.json`` (both may name EOS ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from dspark_sglang.models.config import ModelConfig

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def byte_to_unicode_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 onward
    in increasing byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _token_str(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """Text <-> token ids, chat templates and byte-exact token spellings.

    ``encode(add_special_tokens=True)`` adds what the tokenizer's post-processor adds, plus a BOS
    when ``add_bos`` is set and the post-processor does not add one itself (old tokenizer files).
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._hf = hf
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        bos = bos_token_id
        if bos is None and "bos_token" in self.special_tokens:
            bos = hf.token_to_id(self.special_tokens["bos_token"])
        self.bos_token_id: int | None = bos
        eos = list(eos_token_ids)
        eos_str = self.special_tokens.get("eos_token")
        eos_tok = hf.token_to_id(eos_str) if eos_str else None
        if eos_tok is not None and eos_tok not in eos:
            eos.append(eos_tok)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        added = hf.encode("", add_special_tokens=True).ids
        post_adds_bos = bos is not None and added[:1] == [bos]
        self._prepend_bos = bool(add_bos_token) and bos is not None and not post_adds_bos
        self.add_bos: bool = post_adds_bos or self._prepend_bos

    # ---- construction -----------------------------------------------------------------------

    @staticmethod
    def from_dir(path: str | Path, config: ModelConfig | None = None) -> Tokenizer:
        """Load ``path/tokenizer.json`` and its side files; ``config`` adds its BOS/EOS ids."""
        d = Path(path)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"no tokenizer.json in {str(d)!r}")
        hf = tokenizers.Tokenizer.from_file(str(tok_file))
        tcfg = _read_json(d / "tokenizer_config.json")
        special = {k: s for k in _SPECIAL_KEYS if (s := _token_str(tcfg.get(k))) is not None}
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        eos: list[int] = []
        for ids in (
            list(config.eos_token_ids) if config else [],
            _as_id_list(_read_json(d / "generation_config.json").get("eos_token_id")),
            [] if config else _as_id_list(_read_json(d / "config.json").get("eos_token_id")),
        ):
            eos += [i for i in ids if i not in eos]
        return Tokenizer(
            hf,
            special_tokens=special,
            add_bos_token=tcfg.get("add_bos_token"),
            chat_template=template,
            bos_token_id=config.bos_token_id if config and "bos_token" not in special else None,
            eos_token_ids=eos,
        )

    # ---- basic API --------------------------------------------------------------------------

    @property
    def hf(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (shared, do not mutate)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary + added tokens)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    # ---- byte spellings (grammar backends need them) ----------------------------------------

    @cached_property
    def _byte_decoder(self) -> tuple[str, dict[str, int]]:
        spec = json.loads(self._hf.to_str())
        dec = spec.get("decoder") or {}
        kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
        if "ByteLevel" in kinds:
            return "byte_level", {c: b for b, c in byte_to_unicode_table().items()}
        return "sentencepiece", {}

    @cached_property
    def _added_ids(self) -> dict[int, str]:
        return {i: t.content for i, t in self._hf.get_added_tokens_decoder().items()}

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token ``token_id`` contributes to decoded text (special tokens: their
        literal spelling). Byte-level BPE maps each character back through GPT-2's table;
        sentencepiece maps ``<0xAB>`` byte-fallback tokens to one byte and U+2581 to a space."""
        if token_id in self._added_ids:
            return self._added_ids[token_id].encode("utf-8")
        tok = self._hf.id_to_token(token_id)
        if tok is None:
            return b""
        kind, inverse = self._byte_decoder
        if kind == "byte_level":
            return bytes(inverse[c] for c in tok) if all(c in inverse for c in tok) else (
                tok.encode("utf-8")
            )
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            return bytes([int(tok[3:5], 16)])
        return tok.replace("\u2581", " ").encode("utf-8")

    def all_token_bytes(self) -> list[bytes]:
        """``id_to_token_bytes`` for every id in ``range(vocab_size)``."""
        return [self.id_to_token_bytes(i) for i in range(self.vocab_size)]

    # ---- chat template ----------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii,
                              separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(self.chat_template or "")

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's Jinja chat template (as transformers renders it:
        trim_blocks, lstrip_blocks, ``tojson``, ``raise_exception``). Raises ValueError when the
        model ships no template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        context = dict(self.special_tokens)
        context.update(kwargs)
        return self._compiled_template.render(
            messages=list(messages),
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    @cached_property
    def _template_variables(self) -> frozenset[str]:
        from jinja2 import meta

        ast = self._compiled_template.environment.parse(self.chat_template or "")
        return frozenset(meta.find_undeclared_variables(ast))

    def template_reads(self, name: str) -> bool:
        """Whether the chat template reads the variable ``name`` (``tools``: it renders tool
        signatures itself)."""
        return name in self._template_variables

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Streaming detokenisation: feed ids, get only new, complete text.

    Keeps two offsets into the ids seen so far: text up to ``read_offset`` has been emitted, and
    decoding restarts at ``prefix_offset`` (the previous read offset) so that decoders which look
    at neighbouring tokens (leading-space rules, multi-token UTF-8 characters) see context. Text
    ending in U+FFFD (an incomplete UTF-8 sequence) is held back until more ids arrive or
    ``finish`` is called. The concatenation of all returned pieces equals ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _delta(self, flush: bool) -> str:
        prefix_text = self._tok.decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        full_text = self._tok.decode(self.ids[self._prefix_offset:], self._skip)
        if not flush and (full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return full_text[len(prefix_text):]

    def step(self, new_ids: Iterable[int]) -> str:
        """Append ``new_ids``; return the newly completed text (possibly empty)."""
        self.ids.extend(int(i) for i in new_ids)
        return self._delta(flush=False)

    def finish(self) -> str:
        """Return whatever is still held back (may end in U+FFFD if the ids end mid-character)."""
        return self._delta(flush=True)
