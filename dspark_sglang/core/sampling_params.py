"""Per-request sampling parameters, in SGLang's names, with validation."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

_MAX_STOP_STRINGS = 64


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    n: int = 1
    seed: int | None = None
    stop_regex: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> added to its logit
    custom_params: dict[str, Any] | None = None

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> SamplingParams:
        """Build from a request dict; unknown keys raise ValueError (as upstream SGLang does)."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling_params field(s): {unknown}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if d.get("stop") is None:
            d.pop("stop", None)
        if d.get("stop_token_ids") is None:
            d.pop("stop_token_ids", None)
        if isinstance(d.get("json_schema"), (dict, list)):
            d["json_schema"] = json.dumps(d["json_schema"])
        if d.get("top_k") is None:
            d.pop("top_k", None)
        return SamplingParams(**d)

    def normalize_and_validate(self, vocab_size: int, max_context_len: int) -> None:
        """Raise ValueError naming the offending field. Mutates nothing but type coercion."""
        def _num(name: str, kinds: tuple[type, ...]) -> Any:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise ValueError(f"sampling_params.{name} must be a number, got {v!r}")
            return v

        mnt = _num("max_new_tokens", (int,))
        if mnt < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {mnt}")
        if mnt > max_context_len:
            raise ValueError(
                f"sampling_params.max_new_tokens={mnt} exceeds the context length "
                f"{max_context_len}")
        if _num("min_new_tokens", (int,)) < 0 or self.min_new_tokens > mnt:
            raise ValueError("sampling_params.min_new_tokens must be in [0, max_new_tokens]")
        t = _num("temperature", (int, float))
        if not 0.0 <= t <= 100.0:
            raise ValueError(f"sampling_params.temperature must be in [0, 100], got {t}")
        p = _num("top_p", (int, float))
        if not 0.0 < p <= 1.0:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {p}")
        k = _num("top_k", (int,))
        if k < -1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {k}")
        if k == 0:
            self.top_k = -1
        mp = _num("min_p", (int, float))
        if not 0.0 <= mp <= 1.0:
            raise ValueError(f"sampling_params.min_p must be in [0, 1], got {mp}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= _num(name, (int, float)) <= 2.0:
                raise ValueError(f"sampling_params.{name} must be in [-2, 2]")
        if not 0.0 < _num("repetition_penalty", (int, float)) <= 2.0:
            raise ValueError("sampling_params.repetition_penalty must be in (0, 2]")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("sampling_params.stop must be a string or a list of strings")
        if len(self.stop) > _MAX_STOP_STRINGS or any(s == "" for s in self.stop):
            raise ValueError("sampling_params.stop: at most 64 non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(i, int) and 0 <= i < vocab_size for i in self.stop_token_ids
        ):
            raise ValueError(f"sampling_params.stop_token_ids must be ids in [0, {vocab_size})")
        if not isinstance(self.n, int) or not 1 <= self.n <= 64:
            raise ValueError(f"sampling_params.n must be in [1, 64], got {self.n!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"sampling_params.seed must be an integer, got {self.seed!r}")
        kinds = [x for x in (self.regex, self.json_schema, self.ebnf) if x is not None]
        if len(kinds) > 1:
            raise ValueError("only one of sampling_params.regex / json_schema / ebnf may be set")
        for name in ("regex", "json_schema", "ebnf"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"sampling_params.{name} must be a string")
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        for pattern in self.stop_regex or []:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("sampling_params.stop_regex must be a non-empty string or list")
            try:
                re.compile(pattern)
            except (re.error, RecursionError) as e:
                raise ValueError(f"sampling_params.stop_regex {pattern!r} is invalid: {e}") \
                    from None
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
                    for v in bias.values()):
                raise ValueError("sampling_params.logit_bias must map token ids to numbers "
                                 "in [-100, 100]")
            try:
                ids = [int(k) for k in bias]
            except (TypeError, ValueError):
                raise ValueError("sampling_params.logit_bias keys must be token ids") from None
            if any(not 0 <= i < vocab_size for i in ids):
                raise ValueError(f"sampling_params.logit_bias ids must be in [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def grammar_spec(self) -> tuple[str, str] | None:
        if self.regex is not None:
            return ("regex", self.regex)
        if self.json_schema is not None:
            return ("json_schema", self.json_schema)
        if self.ebnf is not None:
            return ("ebnf", self.ebnf)
        return None
