"""OpenAI tool calling over the Hermes / Qwen2.5 ``<tool_call>{json}</tool_call>`` format.

What a chat request with ``tools`` goes through:

1. ``resolve_tool_choice`` turns ``tool_choice`` into a mode: ``none`` (tools are not shown to the
   model, nothing is parsed), ``auto`` (the model may answer or call), ``required`` or a named
   function (the output is constrained).
2. ``prepare_messages`` makes the conversation renderable: assistant ``tool_calls`` get their
   ``arguments`` as objects, ``content: null`` becomes ``""``. When the chat template does not read
   ``tools`` itself (SmolLM2's does not, Qwen2.5's does), the tools are described in the system
   message in the Hermes format, earlier calls are written back as ``<tool_call>`` blocks and tool
   results become user turns wrapped in ``<tool_response>``.
3. ``call_schema`` gives the JSON schema that ``required`` / named calls are constrained with
   (through the ordinary grammar path, so speculation and jump-forward apply): one call object
   ``{"name": <const>, "arguments": <the function's parameters>}`` for a named function, a
   non-empty array of such objects (any of the tools) for ``required``.
4. ``ToolCallParser`` turns generated text into content and calls. It is incremental (streaming
   feeds it deltas) and the non-streaming path feeds it the whole text, so both agree by
   construction.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from dspark_sglang.entrypoints.protocol import ApiError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_SYSTEM_BLOCK = (
    "# Tools\n\n"
    "You may call functions to help with the user's request. Their signatures are listed, one "
    "JSON object per line, between <tools> and </tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with a JSON object holding its name and arguments between "
    "<tool_call> and </tool_call> tags, one block per call:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n"
    "</tool_call>"
)


@dataclass(frozen=True)
class ToolMode:
    """``kind``: "none" | "auto" | "required" | "named"; ``name`` set for "named"."""

    kind: str
    name: str | None = None

    @property
    def constrained(self) -> bool:
        return self.kind in ("required", "named")


def _function_of(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ApiError(400, f"tools[{index}]: only tools of type 'function' are supported",
                       param="tools")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ApiError(400, f"tools[{index}].function.name is required", param="tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ApiError(400, f"tools[{index}].function.parameters must be a JSON schema object",
                       param="tools")
    return fn


def tool_functions(tools: list[Any] | None) -> list[dict[str, Any]]:
    """The ``function`` objects of ``tools`` (validated; names unique)."""
    fns = [_function_of(t, i) for i, t in enumerate(tools or [])]
    names = [f["name"] for f in fns]
    if len(set(names)) != len(names):
        raise ApiError(400, "tool function names must be unique", param="tools")
    return fns


def resolve_tool_choice(tool_choice: Any, tools: list[Any] | None) -> ToolMode:
    """Validate ``tool_choice`` against ``tools``; ApiError(400) when they do not fit."""
    names = [f["name"] for f in tool_functions(tools)]
    if tool_choice is None:
        return ToolMode("auto" if names else "none")
    if tool_choice == "none":
        return ToolMode("none")
    if not names:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if tool_choice in ("auto", "required"):
        return ToolMode(tool_choice)
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not in tools",
                           param="tool_choice")
        return ToolMode("named", name)
    raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                   "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def call_schema(tools: list[Any], mode: ToolMode, parallel: bool | None) -> dict[str, Any]:
    """The JSON schema a constrained (``required`` / named) answer must match."""

    def one(fn: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"name": {"const": fn["name"]},
                               "arguments": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}

    fns = tool_functions(tools)
    if mode.kind == "named":
        return one(next(f for f in fns if f["name"] == mode.name))
    items = one(fns[0]) if len(fns) == 1 else {"anyOf": [one(f) for f in fns]}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


# ---- rendering ---------------------------------------------------------------------------------

def _arguments_object(arguments: Any) -> Any:
    """Templates write ``arguments | tojson``: give them the object, not its JSON string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_block(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    body = {"name": fn.get("name"), "arguments": _arguments_object(fn.get("arguments", {}))}
    return f"{CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_CLOSE}"


def prepare_messages(messages: list[dict[str, Any]], tools: list[Any] | None,
                     template_reads_tools: bool) -> list[dict[str, Any]]:
    """Messages the chat template can render (see the module docstring); inputs are not mutated.

    ``tools`` is None when the tools must not be shown (mode ``none`` or no tools)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        calls = m.get("tool_calls") or []
        if m["role"] == "assistant" and calls:
            m["tool_calls"] = [{**c, "function": {**(c.get("function") or {}), "arguments":
                                _arguments_object((c.get("function") or {}).get("arguments"))}}
                               for c in calls]
            if not template_reads_tools:
                parts = [m["content"]] if m["content"] else []
                m["content"] = "\n".join([*parts, *(_call_block(c) for c in calls)])
                del m["tool_calls"]
        if m["role"] == "tool" and not template_reads_tools:
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + block
                continue
            m = {"role": "user", "content": block, "_tool_turn": True}
        out.append(m)
    for m in out:
        m.pop("_tool_turn", None)
    if tools and not template_reads_tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = _SYSTEM_BLOCK.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


# ---- parsing -----------------------------------------------------------------------------------

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    """``{"name", "arguments"}`` (``parameters`` accepted too) -> an OpenAI tool call, or None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_constrained(text: str, tools: list[Any]) -> list[dict[str, Any]]:
    """Calls from a ``required`` / named answer (a call object or an array of them); [] when the
    text is not complete JSON (for example the answer hit ``max_tokens``)."""
    names = {f["name"] for f in tool_functions(tools)}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    objs = value if isinstance(value, list) else [value]
    calls = [_as_call(o, names) for o in objs]
    return [c for c in calls if c is not None]


def _holdback(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallParser:
    """Incremental parser for ``auto`` mode: ``feed(delta)`` / ``finish()`` return events, each
    ``("content", text)`` or ``("call", tool_call_dict)`` (with ``index`` among the calls).

    Text outside ``<tool_call>`` blocks is content; whitespace next to a block is dropped, a
    possible start of ``<tool_call>`` is held back until it is decided. A block whose body is not
    a call of a known tool stays content, verbatim. An unclosed last block is accepted at
    ``finish`` when its body is a complete call.
    """

    def __init__(self, tools: list[Any]) -> None:
        self.names = {f["name"] for f in tool_functions(tools)}
        self.pending = ""  # undecided text: outside a block (may end in a partial tag) or inside
        self.in_block = False
        self.after_block = False
        self.num_calls = 0

    def _call(self, body: str) -> dict[str, Any] | None:
        try:
            call = _as_call(json.loads(body), self.names)
        except json.JSONDecodeError:
            return None
        if call is not None:
            call["index"] = self.num_calls
            self.num_calls += 1
        return call

    def _scan(self, final: bool) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while True:
            if self.in_block:
                end = self.pending.find(CALL_CLOSE)
                if end == -1 and not final:
                    return events
                body = self.pending if end == -1 else self.pending[:end]
                rest = "" if end == -1 else self.pending[end + len(CALL_CLOSE):]
                call = self._call(body)
                closed = CALL_CLOSE if end != -1 else ""
                events.append(("call", call) if call is not None
                              else ("content", CALL_OPEN + body + closed))
                self.pending, self.in_block = rest, False
                self.after_block = call is not None
                continue
            if self.after_block:  # whitespace right after a call is dropped
                self.pending = self.pending.lstrip()
                if not self.pending and not final:
                    return events
                self.after_block = False
            start = self.pending.find(CALL_OPEN)
            if start != -1:
                before = self.pending[:start].rstrip()
                if before:
                    events.append(("content", before))
                self.pending = self.pending[start + len(CALL_OPEN):].lstrip()
                self.in_block = True
                continue
            if final:
                rest = self.pending.rstrip() if self.num_calls else self.pending
                if rest:
                    events.append(("content", rest))
                self.pending = ""
                return events
            safe = self.pending[:len(self.pending) - _holdback(self.pending, CALL_OPEN)]
            body = safe.rstrip()  # trailing whitespace waits: it is dropped if a block follows
            if body:
                events.append(("content", body))
                self.pending = self.pending[len(body):]
            return events

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        self.pending += delta
        return self._scan(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._scan(final=True)


def parse_auto(text: str, tools: list[Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content or None, calls) of a whole ``auto``-mode answer."""
    parser = ToolCallParser(tools)
    events = parser.feed(text) + parser.finish()
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "call"]
    return (content or None) if calls else content, calls
