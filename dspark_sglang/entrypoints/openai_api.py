"""OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Choices are numbered prompt-major: choice ``p * n + j`` is sample ``j`` of prompt ``p``. Errors
use OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict

from dspark_sglang.constrained.schema_strict import lenient_schema
from dspark_sglang.core.req import Req
from dspark_sglang.entrypoints.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _SamplingFields,
    decode_json,
    parse_body,
)
from dspark_sglang.entrypoints.server_state import ServerState, stop_holdback
from dspark_sglang.entrypoints.sse import SSE_DONE, sse_event
from dspark_sglang.entrypoints.tool_calls import (
    ToolCallParser,
    ToolMode,
    call_schema,
    parse_auto,
    parse_constrained,
    prepare_messages,
    resolve_tool_choice,
)

logger = logging.getLogger(__name__)

_FINISH = {"length": "length", "stop": "stop", "abort": "abort"}


def _finish_reason(meta: dict[str, Any]) -> str | None:
    fr = meta.get("finish_reason")
    return None if fr is None else _FINISH.get(fr.get("type"), fr.get("type"))


def sampling_params_from(req: _SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    """OpenAI fields -> SGLang ``sampling_params`` (validated later by SamplingParams)."""
    sp: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k, "min_p": req.min_p, "n": req.n,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty, "min_new_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos, "skip_special_tokens": req.skip_special_tokens,
        "no_stop_trim": req.no_stop_trim, "seed": req.seed,
        "stop": req.stop, "stop_token_ids": req.stop_token_ids, "stop_regex": req.stop_regex,
        "logit_bias": req.logit_bias or None,
        "regex": req.regex, "ebnf": req.ebnf, "json_schema": req.json_schema,
    }
    if max_tokens is not None:
        sp["max_new_tokens"] = max_tokens
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if any(sp[k] is not None for k in ("regex", "ebnf", "json_schema")):
            raise ApiError(400, "response_format cannot be combined with regex/ebnf/json_schema",
                           param="response_format")
        if rf.type == "json_object":  # any object: extra keys are the point here
            sp["json_schema"] = json.dumps({"type": "object", "additionalProperties": True})
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ApiError(400, "response_format.json_schema.schema is required",
                               param="response_format")
            schema = rf.json_schema.schema_
            # undeclared keys are forbidden unless the schema allows them (SGLang / OpenAI
            # strict); ``strict: false`` asks for JSON Schema's own lenient meaning
            if rf.json_schema.strict is False:
                schema = lenient_schema(schema)
            sp["json_schema"] = json.dumps(schema)
    return sp


class _TextOffsets:
    """Character offset of each token's start in the decoded text (incremental, exact for
    tokens that carry only part of a character)."""

    def __init__(self, tokenizer: Any, start: int = 0) -> None:
        self.decoder = tokenizer.incremental_decoder(skip_special_tokens=False)
        self.offset = start

    def advance(self, ids: list[int]) -> list[int]:
        out = []
        for tid in ids:
            out.append(self.offset)
            self.offset += len(self.decoder.step([tid]))
        return out


def _completion_logprobs(state: ServerState, entries: list[Any], tops: list[Any],
                         offsets: _TextOffsets) -> dict:
    """OpenAI completions ``logprobs`` for ``entries`` ``[(logprob or None, token_id)]``."""
    ids = [tid for _, tid in entries]
    top_dicts = []
    for k in range(len(entries)):
        top = tops[k] if k < len(tops) else None
        top_dicts.append(None if top is None else
                         {state.openai_token(i): v for v, i in top})
    return {"tokens": [state.openai_token(t) for t in ids],
            "token_logprobs": [lp for lp, _ in entries], "top_logprobs": top_dicts,
            "text_offset": offsets.advance(ids)}


def _chat_logprobs(state: ServerState, meta: dict[str, Any], start: int = 0) -> dict:
    """OpenAI chat ``logprobs``; ``bytes`` are each token's raw bytes."""
    content = []
    top_list = meta.get("output_top_logprobs") or []
    for k, (lp, tid) in enumerate(meta.get("output_token_logprobs", [])):
        if k < start:
            continue
        tops = top_list[k] if k < len(top_list) and top_list[k] is not None else []
        content.append({"token": state.openai_token(tid), "logprob": lp,
                        "bytes": list(state.token_bytes(tid)),
                        "top_logprobs": [{"token": state.openai_token(i), "logprob": v,
                                          "bytes": list(state.token_bytes(i))}
                                         for v, i in tops]})
    return {"content": content}


def _usage(reqs: list[Req], outs: dict[int, dict[str, Any]], n: int) -> dict[str, Any]:
    """Prompt and cached tokens count once per prompt (the ``n`` samples of a prompt share it:
    its cached count is the best any sample got); completion tokens sum over choices."""
    prompt = sum(len(r.origin_input_ids) for r in reqs[::n])
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs.values())
    cached = 0
    for p in range(0, len(reqs), n):
        got = [outs[k]["meta_info"].get("cached_tokens", 0) for k in range(p, p + n) if k in outs]
        cached += min(max(got, default=0), len(reqs[p].origin_input_ids))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | list[str]
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int] | list[list[int]]


M = TypeVar("M", bound=BaseModel)


def parse_openai(raw: bytes, model: type[M]) -> M:
    """``parse_body`` that accepts and ignores fields this server does not know (``store``,
    ``metadata``, ``service_tier``, ``reasoning_effort``, ...), as OpenAI-compatible servers do;
    they are logged at debug level. ``stream_options`` without ``stream`` is a 400."""
    value = decode_json(raw)
    if isinstance(value, dict):
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        unknown = sorted(k for k in value if k not in known)
        if unknown:
            logger.debug("ignoring unsupported request fields %s", unknown)
            value = {k: v for k, v in value.items() if k in known}
        if value.get("stream_options") is not None and not value.get("stream"):
            raise ApiError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
    return parse_body(json.dumps(value).encode("utf-8"), model)


def build_openai_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")
    engine = state.engine

    def _model_card() -> dict[str, Any]:
        return {"id": state.served_model_name, "object": "model",
                "created": int(state.started_at), "owned_by": "dspark_sglang",
                "root": engine.model_path, "max_model_len": engine.context_len}

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in (state.served_model_name, engine.model_path):
            raise ApiError(404, f"the model {model_id!r} does not exist", "not_found_error",
                           param="model")
        return _model_card()

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_openai(await request.body(), TokenizeRequest)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [engine.tokenizer.encode(t, add_special_tokens=body.add_special_tokens)
               for t in texts]
        one = isinstance(body.prompt, str)
        return {"tokens": ids[0] if one else ids,
                "count": len(ids[0]) if one else [len(x) for x in ids],
                "max_model_len": engine.context_len}

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_openai(await request.body(), DetokenizeRequest)
        rows = body.tokens if body.tokens and isinstance(body.tokens[0], list) else [body.tokens]
        vocab = engine.tokenizer.vocab_size
        if any(not 0 <= t < vocab for row in rows for t in row):  # type: ignore[union-attr]
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="tokens")
        texts = [engine.tokenizer.decode(row, skip_special_tokens=False) for row in rows]
        return {"text": texts if len(rows) > 1 or rows is body.tokens else texts[0]}

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        body = parse_openai(await request.body(), CompletionRequest)
        if body.suffix is not None or (body.best_of or 1) > 1:
            raise ApiError(400, "suffix and best_of > 1 are not supported")
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
            logprob_start_len=0 if body.echo and want_lp else None,
            stream=body.stream, rid=body.rid)
        if body.echo:
            rows = [prompt] if isinstance(prompt, str) or (is_ids and isinstance(prompt[0], int)) \
                else prompt
            texts = [p if isinstance(p, str) else engine.tokenizer.decode(p, False) for p in rows]
            echoes = [texts[k // body.n] for k in range(len(reqs))]
        else:
            echoes = ["" for _ in reqs]
        cid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(
                _stream(state, reqs, body, cid, chat=False, echoes=echoes),
                media_type="text/event-stream")
        outs = await state.run(reqs, request)
        choices = []
        for k, out in enumerate(outs):
            meta = out["meta_info"]
            lp = None
            if want_lp:
                offsets = _TextOffsets(engine.tokenizer)
                entries = meta["output_token_logprobs"]
                tops = meta.get("output_top_logprobs") or []
                if body.echo:
                    entries = meta["input_token_logprobs"] + entries
                    tops = (meta.get("input_top_logprobs") or []) + tops
                lp = _completion_logprobs(state, entries, tops, offsets)
            choices.append({"index": k, "text": echoes[k] + out["text"],
                            "finish_reason": _finish_reason(meta),
                            "matched_stop": (meta["finish_reason"] or {}).get("matched"),
                            "logprobs": lp})
        return JSONResponse({"id": cid, "object": "text_completion", "created": int(time.time()),
                             "model": state.served_model_name, "choices": choices,
                             "usage": _usage(reqs, dict(enumerate(outs)), body.n)})

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_openai(await request.body(), ChatCompletionRequest)
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
                  echoes: list[str] | None = None) -> AsyncIterator[bytes]:
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
    offsets = [_TextOffsets(state.engine.tokenizer) for _ in reqs]
    echo_pending = list(echoes) if echoes else ["" for _ in reqs]

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": obj_type, "created": created,
                               "model": state.served_model_name, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return sse_event(obj)

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
            if want_lp and chat:
                lp = _chat_logprobs(state, meta, lp_sent[k])
            elif want_lp:
                entries = meta["output_token_logprobs"][lp_sent[k]:]
                tops = (meta.get("output_top_logprobs") or [])[lp_sent[k]:]
                if echo_pending[k]:  # the prompt's logprobs go with the echoed prompt
                    entries = meta["input_token_logprobs"] + entries
                    tops = (meta.get("input_top_logprobs") or []) + tops
                lp = _completion_logprobs(state, entries, tops, offsets[k])
            if want_lp:
                lp_sent[k] = len(meta.get("output_token_logprobs", []))
            if echo_pending[k] and not chat:
                pieces = [echo_pending[k] + (pieces[0] if pieces else ""), *pieces[1:]]
                echo_pending[k] = ""
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
        yield SSE_DONE
    finally:
        await agen.aclose()
