"""Request checks that run before a request reaches the scheduler (on the caller's thread).

Everything a scheduler step would trip over is rejected here with a ``ValueError`` that names the
field: values of the wrong type (``"no"`` for a boolean), integers that do not fit in int64 (seeds:
uint64), text that cannot be encoded (lone surrogates), grammars whose expansion is too large to
build within the limits, JSON nested deeper than :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import json
from typing import Any

from dspark_sglang.core.sampling_params import SamplingParams

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
MAX_JSON_DEPTH = 64
# product of nested bounded repeat counts, summed over the pattern: ``(a{1000}){1000}`` = 10^6
MAX_REGEX_EXPANSION = 50_000
MAX_GRAMMAR_CHARS = 200_000
MAX_STOP_CHARS = 1_000

_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                "no_stop_trim")
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty")


def check_text(value: str, name: str) -> None:
    """``value`` must encode as UTF-8 (JSON allows lone surrogates such as ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: {e.reason} at position {e.start} "
                         f"(a lone surrogate)") from None


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean (true/false), got {value!r:.40}")
    return value


def check_int(value: Any, name: str, lo: int = -INT64_MAX - 1, hi: int = INT64_MAX) -> int:
    """An ``int`` (not a bool) in ``[lo, hi]`` (default: int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v)
    return depth


def regex_expansion(pattern: str) -> int:
    """How many characters a lexer may have to unroll for ``pattern``: a bounded repeat
    ``{lo,hi}`` multiplies its body by ``hi``; an unbounded one counts its body once (a loop)."""
    import re._constants as c
    import re._parser as p

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT))
    parsed = p.parse(pattern)

    def size(items: Any) -> int:
        total = 0
        for op, arg in items:
            if op in repeats:
                lo, hi, body = arg
                times = max(lo, 1) if hi == c.MAXREPEAT else hi
                total += times * size(body)
            elif op == c.SUBPATTERN:
                total += size(arg[-1])
            elif op == c.BRANCH:
                total += sum(size(b) for b in arg[1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                total += size(arg[1])
            elif op == getattr(c, "ATOMIC_GROUP", None):
                total += size(arg)
            else:
                total += 1
            if total > 1 << 62:
                return total
        return total

    return size(parsed)


def check_regex(pattern: str, name: str) -> None:
    if len(pattern) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{name} is longer than {MAX_GRAMMAR_CHARS} characters")
    try:
        n = regex_expansion(pattern)
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply") from None
    except Exception:  # noqa: BLE001 - not a Python regex: the grammar backend words the error
        return
    if n > MAX_REGEX_EXPANSION:
        raise ValueError(f"{name} is too large to compile: its repeats expand to about {n} "
                         f"characters (limit {MAX_REGEX_EXPANSION}); use '*' or '+' instead")


def check_json_schema(spec: str, name: str) -> None:
    """Depth limit and ``pattern`` sizes; the grammar backend checks the rest."""
    if len(spec) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{name} is longer than {MAX_GRAMMAR_CHARS} characters")
    try:
        schema = json.loads(spec)
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply (limit {MAX_JSON_DEPTH})") from None
    except json.JSONDecodeError:
        return  # the backend reports the syntax error
    if json_depth(schema) > MAX_JSON_DEPTH:
        raise ValueError(f"{name} is nested too deeply (limit {MAX_JSON_DEPTH})")
    stack = [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for key, x in v.items():
                if key == "pattern" and isinstance(x, str):
                    check_regex(x, f"{name} pattern {x[:40]!r}")
                elif key in ("maxLength", "maxItems", "minLength", "minItems") and \
                        isinstance(x, int) and x > MAX_REGEX_EXPANSION:
                    raise ValueError(f"{name}: {key}={x} exceeds {MAX_REGEX_EXPANSION}")
                else:
                    stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)


def validate_sampling_params(sp: SamplingParams, vocab_size: int) -> None:
    """Type and range checks :meth:`SamplingParams.normalize_and_validate` leaves out; also
    normalises ``top_k >= vocab_size`` to -1 (no top-k). Raises ValueError naming the field."""
    pre = "sampling_params."
    for name in _BOOL_FIELDS:
        check_bool(getattr(sp, name), pre + name)
    for name in _INT_FIELDS:
        check_int(getattr(sp, name), pre + name)
    for name in _FLOAT_FIELDS:
        v = getattr(sp, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{pre}{name} must be a number, got {v!r:.40}")
        if isinstance(v, int) and abs(v) > INT64_MAX:
            raise ValueError(f"{pre}{name} is out of range: {v}")
    if sp.top_k >= vocab_size:
        sp.top_k = -1
    if sp.seed is not None:
        check_int(sp.seed, pre + "seed", 0, UINT64_MAX)
    if isinstance(sp.stop, str):
        sp.stop = [sp.stop]
    if isinstance(sp.stop, list):
        for s in sp.stop:
            if isinstance(s, str):
                check_text(s, pre + "stop")
                if len(s) > MAX_STOP_CHARS:
                    raise ValueError(f"{pre}stop strings must be at most {MAX_STOP_CHARS} chars")
    if isinstance(sp.stop_token_ids, list):
        for t in sp.stop_token_ids:
            check_int(t, pre + "stop_token_ids", 0, vocab_size - 1)
    if sp.custom_params is not None and not isinstance(sp.custom_params, dict):
        raise ValueError(f"{pre}custom_params must be an object")
    for name in ("regex", "json_schema", "ebnf"):
        v = getattr(sp, name)
        if isinstance(v, str):
            check_text(v, pre + name)
            if len(v) > MAX_GRAMMAR_CHARS:
                raise ValueError(f"{pre}{name} is longer than {MAX_GRAMMAR_CHARS} characters")
    if isinstance(sp.regex, str):
        check_regex(sp.regex, pre + "regex")
    if isinstance(sp.json_schema, str):
        check_json_schema(sp.json_schema, pre + "json_schema")
