"""What an object schema without ``additionalProperties`` means for constrained decoding.

JSON Schema itself allows undeclared keys unless a schema says otherwise. SGLang's default
backend (xgrammar, strict mode) and OpenAI's strict structured outputs forbid them, and so do we
by default: a small model given the choice invents keys until ``max_new_tokens``. Every backend
gets the same meaning because the schema itself is rewritten before compiling:

- :func:`strict_schema` sets ``additionalProperties: false`` on every object subschema that says
  nothing about extra keys (no ``additionalProperties``, ``patternProperties`` or
  ``unevaluatedProperties``);
- :func:`lenient_schema` sets ``additionalProperties: true`` there instead (spec-lenient mode,
  e.g. OpenAI ``response_format.json_schema.strict: false``), which :func:`strict_schema` then
  leaves alone.
"""

from __future__ import annotations

from typing import Any

# keywords whose value is one schema / a list of schemas / a map of name -> schema
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
        "additionalProperties", "unevaluatedItems", "unevaluatedProperties")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_EXTRA_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def _is_object_schema(s: dict[str, Any]) -> bool:
    t = s.get("type")
    return t == "object" or (isinstance(t, list) and "object" in t) or "properties" in s


def _fill(schema: Any, value: bool) -> Any:
    """Copy of ``schema`` with ``additionalProperties: value`` where extra keys are unspecified."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _ONE:
        if isinstance(out.get(k), dict):
            out[k] = _fill(out[k], value)
    for k in _MANY:
        if isinstance(out.get(k), list):
            out[k] = [_fill(x, value) for x in out[k]]
    for k in _MAP:
        if isinstance(out.get(k), dict):
            out[k] = {name: _fill(x, value) for name, x in out[k].items()}
    if _is_object_schema(out) and not any(k in out for k in _EXTRA_KEYS):
        out["additionalProperties"] = value
    return out


def strict_schema(schema: Any) -> Any:
    return _fill(schema, False)


def lenient_schema(schema: Any) -> Any:
    return _fill(schema, True)
