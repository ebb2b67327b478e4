"""OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Choices are numbered prompt-major: choice ``p * n + j`` is sample ``j`` of prompt ``p``. Errors
use OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from dspark_sglang.core.req import Req
from dspark_sglang.entrypoints.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _SamplingFields,
    parse_body,
)
from dspark_sglang.entrypoints.server_state import ServerState, stop_holdback
from dspark_sglang.entrypoints.tool_calls import (
    ToolCallParser,
    ToolMode,
    call_schema,
    parse_auto,
    parse_constrained,
    prepare_messages,
    resolve_tool_choice,
)

_FINISH = {"length": "length", "stop": "stop", "abort": "abort"}


def _finish_reason(meta: dict[str, Any]) -> str | None:
    fr = meta.get("finish_reason")
    return None if fr is None else _FINISH.get(fr.get("type"), fr.get("type"))


def sampling_params_from(req: _SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    """OpenAI fields -> SGLang ``sampling_params`` (validated later by SamplingParams)."""
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    sp: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k, "min_p": req.min_p, "n": req.n,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty, "min_new_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos, "skip_special_tokens": req.skip_special_tokens,
        "no_stop_trim": req.no_stop_trim, "seed": req.seed,
        "stop": req.stop, "stop_token_ids": req.stop_token_ids,
        "regex": req.regex, "ebnf": req.ebnf, "json_schema": req.json_schema,
    }
    if max_tokens is not None:
        sp["max_new_tokens"] = max_tokens
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if any(sp[k] is not None for k in ("regex", "ebnf", "json_schema")):
            raise ApiError(400, "response_format cannot be combined with regex/ebnf/json_schema",
                           param="response_format")
        if rf.type == "json_object":
            sp["json_schema"] = json.dumps({"type": "object"})
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ApiError(400, "response_format.json_schema.schema is required",
                               param="response_format")
            sp["json_schema"] = json.dumps(rf.json_schema.schema_)
    return sp


def _completion_logprobs(state: ServerState, meta: dict[str, Any], offset0: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    off = offset0
    top_list = meta.get("output_top_logprobs") or []
    for k, (lp, tid) in enumerate(meta.get("output_token_logprobs", [])):
        t = state.token_text(tid)
        tokens.append(t)
        lps.append(lp)
        offsets.append(off)
        off += len(t)
        if k < len(top_list) and top_list[k] is not None:
            tops.append({state.token_text(i): v for v, i in top_list[k]})
        else:
            tops.append(None)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(state: ServerState, meta: dict[str, Any], start: int = 0) -> dict:
    content = []
    top_list = meta.get("output_top_logprobs") or []
    for k, (lp, tid) in enumerate(meta.get("output_token_logprobs", [])):
        if k < start:
            continue
        t = state.token_text(tid)
        tops = top_list[k] if k < len(top_list) and top_list[k] is not None else []
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                        "top_logprobs": [{"token": state.token_text(i), "logprob": v,
                                          "bytes": list(state.token_text(i).encode("utf-8"))}
                                         for v, i in tops]})
    return {"content": content}


def _usage(reqs: list[Req], outs: dict[int, dict[str, Any]], n: int) -> dict[str, Any]:
    prompt = sum(len(r.origin_input_ids) for r in reqs[::n])
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs.values())
    cached = sum(o["meta_info"].get("cached_tokens", 0) for o in outs.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def build_openai_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")
    engine = state.engine

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.served_model_name, "object": "model", "created": int(state.started_at),
            "owned_by": "dspark_sglang", "root": engine.model_path,
            "max_model_len": engine.context_len}]}

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        if body.echo or body.suffix is not None or (body.best_of or 1) > 1:
            raise ApiError(400, "echo, suffix and best_of > 1 are not supported")
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise ApiError(400, "logprobs must be in [0, 20]", param="logprobs")
        sp = sampling_params_from(body, 16 if body.max_tokens is None else body.max_tokens)
        prompt = body.prompt
        is_ids = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
        if isinstance(prompt, list) and not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        want_lp = body.logprobs is not None
        reqs, _ = await state.build(
            prompt=None if is_ids else prompt, input_ids=prompt if is_ids else None,
            sampling_params=sp, return_logprob=want_lp, top_logprobs_num=body.logprobs or 0,
            stream=body.stream, rid=body.rid)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(
                _stream(state, reqs, body, cid, chat=False), media_type="text/event-stream")
        outs = await state.run(reqs, request)
        choices = []
        for k, out in enumerate(outs):
            meta = out["meta_info"]
            choices.append({"index": k, "text": out["text"], "finish_reason": _finish_reason(meta),
                            "matched_stop": (meta["finish_reason"] or {}).get("matched"),
                            "logprobs": _completion_logprobs(state, meta, 0) if want_lp else None})
        return JSONResponse({"id": cid, "object": "text_completion", "created": int(time.time()),
                             "model": state.served_model_name, "choices": choices,
                             "usage": _usage(reqs, dict(enumerate(outs)), body.n)})

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise ApiError(400, "top_logprobs must be in [0, 20]", param="top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        mode = resolve_tool_choice(body.tool_choice, body.tools)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        sp = sampling_params_from(body, max_tokens)
        if mode.constrained:
            if any(sp[k] is not None for k in ("regex", "ebnf", "json_schema")):
                raise ApiError(400, "tool_choice 'required' or a named function cannot be "
                               "combined with response_format/regex/ebnf/json_schema",
                               param="tool_choice")
            sp["json_schema"] = json.dumps(call_schema(body.tools or [], mode,
                                                       body.parallel_tool_calls))
        text = render_chat(engine.tokenizer, body, mode)
        ids = _encode_rendered(engine.tokenizer, text)
        if "max_new_tokens" not in sp:
            sp["max_new_tokens"] = max(1, engine.context_len - len(ids))
        reqs, _ = await state.build(input_ids=ids, sampling_params=sp,
                                    return_logprob=body.logprobs,
                                    top_logprobs_num=body.top_logprobs or 0,
                                    stream=body.stream, rid=body.rid)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(
                _stream(state, reqs, body, cid, chat=True, tools=(mode, body.tools or [])),
                media_type="text/event-stream")
        outs = await state.run(reqs, request)
        choices = []
        for k, out in enumerate(outs):
            meta = out["meta_info"]
            message: dict[str, Any] = {"role": "assistant", "content": out["text"]}
            fr = _finish_reason(meta)
            calls: list[dict[str, Any]] = []
            if mode.kind == "auto":
                message["content"], calls = parse_auto(out["text"], body.tools or [])
            elif mode.constrained:
                calls = parse_constrained(out["text"], body.tools or [])
                if calls:
                    message["content"] = None
            if calls:
                message["tool_calls"] = [{k2: v for k2, v in c.items() if k2 != "index"}
                                         for c in calls]
                fr = "tool_calls" if fr == "stop" else fr
            choices.append({
                "index": k, "message": message, "finish_reason": fr,
                "matched_stop": (meta["finish_reason"] or {}).get("matched"),
                "logprobs": _chat_logprobs(state, meta) if body.logprobs else None})
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()),
                             "model": state.served_model_name, "choices": choices,
                             "usage": _usage(reqs, dict(enumerate(outs)), body.n)})

    return router


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        content = "".join(p.text for p in content)
    d: dict[str, Any] = {**(m.model_extra or {}), "role": m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    return d


_CONTINUE_MARK = "\u2060dspark-continue\u2060"


def render_chat(tokenizer: Any, body: ChatCompletionRequest, mode: ToolMode) -> str:
    """The prompt text of a chat request (tools rendered as ``tool_calls.py`` describes).

    ``continue_final_message``: the last (assistant) message is left open, so generation
    continues it; the template renders a marker in its place and the text is cut there."""
    tools = body.tools if mode.kind != "none" else None
    reads_tools = tokenizer.template_reads("tools")
    messages = prepare_messages([_message_dict(m) for m in body.messages], tools, reads_tools)
    final = None
    if body.continue_final_message:
        if messages[-1]["role"] != "assistant":
            raise ApiError(400, "continue_final_message needs the last message to be from the "
                           "assistant", param="continue_final_message")
        final = messages[-1]["content"]
        messages[-1] = {**messages[-1], "content": _CONTINUE_MARK}
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=not body.continue_final_message,
            tools=tools if reads_tools else None, **(body.chat_template_kwargs or {}))
    except (ValueError, TypeError, TemplateError) as e:  # the caller's messages or template
        raise ApiError(400, f"chat template failed: {e}", param="messages") from None
    if final is not None:
        cut = text.rfind(_CONTINUE_MARK)
        if cut == -1:
            raise ApiError(400, "continue_final_message: the chat template does not render the "
                           "final message", param="continue_final_message")
        text = text[:cut] + final
    return text


def _encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Tokenize a rendered chat prompt without doubling a BOS the template already wrote."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


class _ChoiceText:
    """Turns one chat choice's text deltas into OpenAI ``delta`` objects (tool calls parsed)."""

    def __init__(self, tools: tuple[ToolMode, list[Any]] | None) -> None:
        self.mode = tools[0] if tools else ToolMode("none")
        self.tools = tools[1] if tools else []
        self.parser = ToolCallParser(self.tools) if self.mode.kind == "auto" else None
        self.buffer = ""
        self.num_calls = 0

    def deltas(self, text: str, fin: bool) -> list[dict[str, Any]]:
        if self.mode.kind == "none":
            return [{"content": text}] if text else []
        if self.parser is not None:
            events = self.parser.feed(text) + (self.parser.finish() if fin else [])
        else:  # constrained: the whole answer is one JSON value, parsed at the end
            self.buffer += text
            if not fin:
                return []
            calls = parse_constrained(self.buffer, self.tools)
            events = [("call", {**c, "index": i}) for i, c in enumerate(calls)] if calls else (
                [("content", self.buffer)] if self.buffer else [])
        out: list[dict[str, Any]] = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
                continue
            self.num_calls += 1
            fn = value["function"]
            out.append({"tool_calls": [{"index": value["index"], "id": value["id"],
                                        "type": "function",
                                        "function": {"name": fn["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": value["index"],
                                        "function": {"arguments": fn["arguments"]}}]})
        return out


async def _stream(state: ServerState, reqs: list[Req], body: _SamplingFields, cid: str,
                  chat: bool, tools: tuple[ToolMode, list[Any]] | None = None,
                  ) -> AsyncIterator[bytes]:
    """Delta chunks per choice, a finish chunk per choice, optional usage chunk, ``[DONE]``.

    Chat choices with tools stream content as it is decided and each tool call as two deltas
    (id + name with empty arguments, then the arguments), as OpenAI sends them; logprobs ride on
    the next chunk a choice sends."""
    created = int(time.time())
    obj_type = "chat.completion.chunk" if chat else "text_completion"
    sent = [0] * len(reqs)
    lp_sent = [0] * len(reqs)
    finals: dict[int, dict[str, Any]] = {}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    lp_field = getattr(body, "logprobs", None)
    want_lp = bool(lp_field) if chat else lp_field is not None
    texts = [_ChoiceText(tools) for _ in reqs]

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": obj_type, "created": created,
                               "model": state.served_model_name, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    if chat:
        yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for k in range(len(reqs))])
    agen = state.stream(reqs)
    try:
        async for k, out, fin in agen:
            text, meta = out["text"], out["meta_info"]
            if not fin:
                text = text[: len(text) - stop_holdback(text, list(reqs[k].sampling_params.stop))]
            delta = text[sent[k]:] if len(text) > sent[k] else ""
            sent[k] = max(sent[k], len(text))
            fr = _finish_reason(meta) if fin else None
            pieces = texts[k].deltas(delta, fin) if chat else ([delta] if delta else [])
            if not pieces and not fin:
                continue
            lp = None
            if want_lp:
                lp = (_chat_logprobs(state, meta, lp_sent[k]) if chat
                      else _completion_logprobs(state, {
                          "output_token_logprobs": meta["output_token_logprobs"][lp_sent[k]:],
                          "output_top_logprobs": (meta.get("output_top_logprobs")
                                                  or [])[lp_sent[k]:]}, sent[k] - len(delta)))
                lp_sent[k] = len(meta.get("output_token_logprobs", []))
            if fin and chat and texts[k].num_calls and fr == "stop":
                fr = "tool_calls"
            if not pieces:
                pieces = [{} if chat else ""]
            for j, piece in enumerate(pieces):
                last = j == len(pieces) - 1
                if chat:
                    choice = {"index": k, "delta": piece, "logprobs": lp if j == 0 else None,
                              "finish_reason": fr if last else None}
                else:
                    choice = {"index": k, "text": piece, "logprobs": lp if j == 0 else None,
                              "finish_reason": fr if last else None}
                if fin and last:
                    finals[k] = out
                    choice["matched_stop"] = (meta["finish_reason"] or {}).get("matched")
                yield chunk([choice])
        if include_usage:
            yield chunk([], _usage(reqs, finals, body.n))
        yield b"data: [DONE]\n\n"
    finally:
        await agen.aclose()
