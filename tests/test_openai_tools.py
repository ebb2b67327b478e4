"""Tool calling through /v1/chat/completions with the real ``openai`` client, on tiny models.

A random model never calls a tool by itself, so ``auto`` mode is driven with the ``regex``
extension (the output is forced into the Hermes format and must be parsed back); ``required`` and
named calls are constrained by the server itself, under plain decoding and under DSPARK.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
import torch

from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.http_server import BackgroundServer
from dspark_sglang.entrypoints.openai_api import render_chat
from dspark_sglang.entrypoints.protocol import ApiError, ChatCompletionRequest
from dspark_sglang.entrypoints.tool_calls import (
    ToolCallParser,
    ToolMode,
    parse_auto,
    resolve_tool_choice,
)
from dspark_sglang.models.tokenizer import Tokenizer
from dspark_sglang.server_args import ServerArgs
from dspark_sglang.speculative.dspark.random_init import write_random_dspark_checkpoint

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
FORCED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _widen_context(d: Path, positions: int = 2048) -> None:
    """Tool descriptions take ~600 tiny-BPE tokens: give the tiny model a longer context."""
    cfg_file = d / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["max_position_embeddings"] = positions
    cfg_file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    torch.set_num_threads(1)
    d: Path = tmp_path_factory.mktemp("tiny_tools")
    cfg = make_tiny_model(d, seed=5)
    _widen_context(d)
    drafter = write_random_dspark_checkpoint(tmp_path_factory.mktemp("drafter_tools"), cfg,
                                             block_size=4)
    started: list[tuple[Engine, BackgroundServer]] = []
    out: dict[str, str] = {}
    for algo in ("NONE", "DSPARK"):
        args = ServerArgs(model_path=str(d), port=_free_port(), max_total_tokens=4096,
                          num_threads=1, grammar_backend="llguidance", served_model_name="tiny",
                          speculative_algorithm=algo,
                          speculative_draft_model_path=str(drafter) if algo == "DSPARK" else None)
        engine = Engine(server_args=args)
        srv = BackgroundServer(engine, args)
        started.append((engine, srv))
        out[algo] = srv.url
    yield out
    for engine, srv in started:
        srv.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def client(urls: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=urls["NONE"] + "/v1", api_key="unused", max_retries=0)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- parsing and rendering (no server) ----------------------------------------------------------

def test_parser_stream_equals_whole_text() -> None:
    text = f"Let me check.\n{FORCED}\n{FORCED.replace('Paris', 'Rome')}\n"
    content, calls = parse_auto(text, TOOLS)
    assert content == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"},
                                                                         {"city": "Rome"}]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    for step in (1, 2, 3, 7):
        p = ToolCallParser(TOOLS)
        events = [e for i in range(0, len(text), step) for e in p.feed(text[i:i + step])]
        events += p.finish()
        assert "".join(v for k, v in events if k == "content") == "Let me check."
        assert [v["index"] for k, v in events if k == "call"] == [0, 1]
    # not a call of a known tool: stays content; a partial tag at the end is flushed as text
    assert parse_auto('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', TOOLS)[1] == []
    assert parse_auto("a <tool_ca", TOOLS) == ("a <tool_ca", [])
    # an unclosed final block with a complete call is accepted
    assert len(parse_auto(FORCED.removesuffix("\n</tool_call>"), TOOLS)[1]) == 1


def test_tool_choice_validation() -> None:
    assert resolve_tool_choice(None, TOOLS) == ToolMode("auto")
    assert resolve_tool_choice(None, None) == ToolMode("none")
    assert resolve_tool_choice("none", TOOLS) == ToolMode("none")
    assert resolve_tool_choice({"type": "function", "function": {"name": "get_time"}},
                               TOOLS) == ToolMode("named", "get_time")
    for bad, tools in (("required", None), ({"type": "function", "function": {"name": "x"}},
                                            TOOLS), ("sometimes", TOOLS)):
        with pytest.raises(ApiError):
            resolve_tool_choice(bad, tools)
    with pytest.raises(ApiError):
        resolve_tool_choice("auto", [{"type": "function", "function": {}}])


# An own Hermes-style template that renders tools itself (as Qwen2.5's does).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

LOOP = [*USER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]


def test_render_with_and_without_template_tool_support(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, seed=1)
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.template_reads("tools")
    body = ChatCompletionRequest.model_validate({"messages": LOOP, "tools": TOOLS})
    text = render_chat(tok, body, ToolMode("auto"))
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_time"' in text
    assert FORCED in text  # the earlier call, written back in the Hermes format
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    none = render_chat(tok, ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": TOOLS, "tool_choice": "none"}), ToolMode("none"))
    assert "# Tools" not in none
    tok.chat_template = TOOL_TEMPLATE
    tok.__dict__.pop("_compiled_template", None)
    tok.__dict__.pop("_template_variables", None)
    assert tok.template_reads("tools")
    text = render_chat(tok, body, ToolMode("auto"))
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;get_time;<|im_end|>")
    # arguments reach the template as an object, not a JSON string
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in text


# ---- over HTTP ----------------------------------------------------------------------------------

def test_auto_parses_forced_call_stream_and_not(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "messages": USER, "tools": TOOLS, "max_tokens": 200,
          "temperature": 0, "extra_body": {"regex": "Sure\\. " + FORCED.replace("{", "\\{")
                                           .replace("}", "\\}")}}
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Sure."
    [call] = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Sure."
    tc = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert tc[0].id and tc[0].function.name == "get_weather" and tc[0].function.arguments == ""
    assert "".join(t.function.arguments or "" for t in tc) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice none: tools are not rendered, nothing is parsed
    r = client.chat.completions.create(**{**kw, "tool_choice": "none"})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert FORCED in r.choices[0].message.content


def test_required_and_named_are_constrained(client: openai.OpenAI) -> None:
    named = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    ch = named.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    [call] = ch.message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    req = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=120, temperature=0,
        tool_choice="required", parallel_tool_calls=False)
    [call] = req.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    # streamed: the same call, assembled from deltas by the openai client helper
    with client.chat.completions.stream(
            model="tiny", messages=USER, tools=TOOLS, max_tokens=80, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_time"}}) as stream:
        final = stream.get_final_completion()
    got = final.choices[0].message.tool_calls[0].function
    assert (got.name, got.arguments) == ("get_time", call_args(named))


def call_args(resp: object) -> str:
    return resp.choices[0].message.tool_calls[0].function.arguments  # type: ignore[attr-defined]


def test_multi_turn_loop_with_tool_results(client: openai.OpenAI) -> None:
    messages: list[dict] = list(USER)
    prompt_tokens = []
    for _ in range(2):
        r = client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, max_tokens=80, temperature=0,
            tool_choice="required")
        prompt_tokens.append(r.usage.prompt_tokens)
        msg = r.choices[0].message
        assert msg.tool_calls
        messages.append(msg.model_dump(exclude_none=True))
        for tc in msg.tool_calls:
            messages.append({"role": "tool", "tool_call_id": tc.id, "content": "sunny"})
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                           max_tokens=5, temperature=0)
    assert final.choices[0].message.role == "assistant"
    assert prompt_tokens[1] > prompt_tokens[0] and final.usage.prompt_tokens > prompt_tokens[1]


def test_tool_errors(urls: dict[str, str]) -> None:
    url = urls["NONE"] + "/v1/chat/completions"
    for body in ({"tools": TOOLS, "tool_choice": {"type": "function",
                                                  "function": {"name": "missing"}}},
                 {"tool_choice": "required"},
                 {"tools": [{"type": "retrieval"}]},
                 {"tools": TOOLS, "tool_choice": "required",
                  "response_format": {"type": "json_object"}}):
        r = requests.post(url, json={"messages": USER, "max_tokens": 4, **body}, timeout=30)
        assert r.status_code == 400, (body, r.text)


def test_constrained_calls_identical_under_dspark(urls: dict[str, str]) -> None:
    outs = {}
    for algo, url in urls.items():
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=120,
                                      temperature=0, tool_choice="required")
        outs[algo] = [(t.function.name, t.function.arguments)
                      for t in r.choices[0].message.tool_calls]
    assert outs["NONE"] == outs["DSPARK"]
    info = requests.get(urls["DSPARK"] + "/server_info", timeout=10).json()
    assert info["spec_stats"]["jump_forward_tokens"] > 0  # the call's fixed JSON is jumped over
