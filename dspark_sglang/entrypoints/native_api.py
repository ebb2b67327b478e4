"""SGLang's native HTTP API, as the ``sglang`` frontend's ``RuntimeEndpoint`` calls it.

Streaming contract: each SSE event is ``data: <json>``; the last line is ``data: [DONE]``.
``text`` and ``output_ids`` are **cumulative** (what the sglang frontend's ``RuntimeEndpoint``
slices), or deltas with ``--incremental-streaming-output`` (SGLang's flag). The output logprob
lists (``output_token_logprobs``, ``output_top_logprobs``) are always **deltas** -- the entries of
the tokens new since the previous event, as the frontend's ``text_async_iter(return_meta_data=
True)`` merges them -- and ``meta_info.output_token_logprobs_length`` counts all entries so far
(equal to ``completion_tokens``). Input logprob lists are sent whole in every event. Text that
could be the start of a stop string is held back until it is known not to be one, so the
cumulative text never shrinks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from dspark_sglang.entrypoints.protocol import (
    AbortReq,
    ApiError,
    ConcateAndAppendReq,
    GenerateReqInput,
    decode_json,
    parse_body,
)
from dspark_sglang.entrypoints.router_api import parallel_info
from dspark_sglang.entrypoints.server_state import ServerState, stop_holdback
from dspark_sglang.entrypoints.sse import SSE_DONE, sse_event


def _clean_sampling_params(sp: Any) -> Any:
    """Drop what the frontend sends as "unset" (``stop_regex: []``) so validation sees intent."""
    if isinstance(sp, list):
        return [_clean_sampling_params(x) for x in sp]
    if not isinstance(sp, dict):
        return sp
    sp = dict(sp)
    if sp.get("stop_regex") in ([], "", None):
        sp.pop("stop_regex", None)
    return sp


def _prompt_text(state: ServerState, body: GenerateReqInput, index: int) -> str:
    if body.text is not None:
        return body.text if isinstance(body.text, str) else body.text[index]
    ids = body.input_ids
    row = ids[index] if ids and isinstance(ids[0], list) else ids
    return state.engine.tokenizer.decode(row or [], skip_special_tokens=False)


def build_native_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    engine = state.engine

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        body = parse_body(await request.body(), GenerateReqInput)
        body.check_extra()
        if (body.text is None) == (body.input_ids is None):
            raise ApiError(400, "exactly one of 'text' and 'input_ids' must be given")
        reqs, batched = await state.build(
            prompt=body.text, input_ids=body.input_ids,
            sampling_params=_clean_sampling_params(body.sampling_params),
            return_logprob=body.return_logprob or False,
            logprob_start_len=body.logprob_start_len,
            top_logprobs_num=body.top_logprobs_num or 0, rid=body.rid,
            stream=bool(body.stream))
        with_text = bool(body.return_text_in_logprobs)
        n_per_prompt = max(1, len(reqs) // max(1, _num_prompts(body)))
        if body.stream:
            return StreamingResponse(_stream(state, reqs, with_text),
                                     media_type="text/event-stream")
        outs = await state.run(reqs, request)
        for i, (r, out) in enumerate(zip(reqs, outs)):
            state.log_text(r.rid, _prompt_text(state, body, i // n_per_prompt) + out["text"])
        wire = [state.wire_output(o, with_text) for o in outs]
        return JSONResponse(wire if batched else wire[0])

    @router.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        return {"model_path": engine.model_path, "tokenizer_path": engine.model_path,
                "served_model_name": state.served_model_name, "is_generation": True,
                "context_length": engine.context_len}

    async def server_info() -> dict[str, Any]:
        info = await asyncio.to_thread(engine.get_server_info)
        info["internal_states"] = [{"avg_spec_accept_length": info["avg_spec_accept_length"]}]
        info.update(parallel_info(state), served_model_name=state.served_model_name)
        return info

    router.add_api_route("/server_info", server_info, methods=["GET"])
    router.add_api_route("/get_server_info", server_info, methods=["GET"])

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ok = await asyncio.to_thread(engine.flush_cache)
        if not ok:
            raise ApiError(400, "cache not flushed: requests are still running")
        return PlainTextResponse("Cache flushed.\n")

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        reqs, _ = await state.build(input_ids=[0], sampling_params={"max_new_tokens": 1,
                                                                    "temperature": 0})
        try:
            await asyncio.wait_for(state.run(reqs, request), timeout=60)
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(503, "generation did not finish in 60 s") from None
        return Response(status_code=200)

    @router.post("/abort_request")
    async def abort_request(request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), AbortReq)
        if body.abort_all:
            rids = sorted({r for rs in state.live.values() for r in rs})
        elif body.rid in state.live:
            rids = list(state.live[body.rid])
        else:
            raise ApiError(404, f"no running request with rid {body.rid!r}")
        found = [await asyncio.to_thread(engine.abort, r, True) for r in rids]
        return {"success": True, "aborted": [r for r, f in zip(rids, found) if f]}

    @router.post("/concate_and_append_request")
    async def concate_and_append(request: Request) -> dict[str, Any]:
        """``dst``'s text becomes ``dst + Σ src[len(dst):]`` (a forked src carries ``dst`` as its
        prefix) and its KV is computed into the radix cache, so the next ``/generate`` on the
        joined text is a cache hit. Rids are those of finished ``/generate`` requests (the
        ``rid`` field or ``meta_info.id``). The sglang frontend sends its own stream ids, which
        the server never saw: then nothing can be joined and ``concatenated`` is false (the
        frontend has already joined the text on its side)."""
        body = parse_body(await request.body(), ConcateAndAppendReq)
        if not body.src_rids:
            raise ApiError(400, "src_rids must not be empty")
        unknown = [r for r in [body.dst_rid, *body.src_rids] if r not in state.text_log]
        if len(unknown) == len(body.src_rids) + 1:
            return {"success": True, "concatenated": False, "unknown_rids": unknown}
        if unknown:
            raise ApiError(404, f"unknown rids (no finished request with these ids): {unknown}")
        dst = state.text_log[body.dst_rid]
        joined = dst
        limit = engine.max_prompt_chars()  # a longer text cannot be a prompt anyway
        for rid in body.src_rids:
            src = state.text_log[rid]
            joined += src.removeprefix(dst)
            if len(joined) > limit:
                raise ApiError(400, f"src_rids: the joined text would exceed {limit} "
                                    f"characters (more than the context length holds)",
                               param="src_rids")
        reqs, _ = await state.build(prompt=joined, sampling_params={"max_new_tokens": 0})
        out = (await state.run(reqs, request))[0]
        state.log_text(body.dst_rid, joined)
        meta = out["meta_info"]
        return {"success": True, "concatenated": True, "dst_rid": body.dst_rid,
                "text": joined, "prompt_tokens": meta["prompt_tokens"],
                "cached_tokens": meta["cached_tokens"]}

    @router.get("/debug/check_integrity")
    async def check_integrity() -> dict[str, Any]:
        try:
            counts = await asyncio.to_thread(engine.check_integrity)
        except AssertionError as e:
            raise ApiError(500, f"KV integrity check failed: {e}", "internal_error") from None
        return {"ok": True, **counts, "live_rids": len(state.live)}

    @router.post("/encode")
    async def encode(request: Request) -> Any:
        value = decode_json(await request.body())
        text = value.get("text") if isinstance(value, dict) else None
        if isinstance(text, str):
            return {"input_ids": engine.tokenize(text)}
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            return [{"input_ids": engine.tokenize(t)} for t in text]
        raise ApiError(400, "'text' must be a string or a list of strings")

    return router


def _num_prompts(body: GenerateReqInput) -> int:
    if body.text is not None:
        return len(body.text) if isinstance(body.text, list) else 1
    ids = body.input_ids or []
    return len(ids) if ids and isinstance(ids[0], list) else 1


async def _stream(state: ServerState, reqs: list[Any], with_text: bool) -> AsyncIterator[bytes]:
    """SSE body; an error inside the stream ends it with an error event and ``[DONE]``."""
    stops = [list(r.sampling_params.stop) for r in reqs]
    incremental = state.args.incremental_streaming_output
    sent = [0] * len(reqs)  # characters of text sent
    ids_sent = [0] * len(reqs)
    lp_sent = [0] * len(reqs)
    agen = state.stream(reqs)
    try:
        async for i, out, fin in agen:
            text = out["text"]
            if not fin:
                text = text[: len(text) - stop_holdback(text, stops[i])]
                if len(text) < sent[i]:  # never shrink what the client already has
                    text = out["text"][: sent[i]]
            meta = dict(out["meta_info"])
            if "output_token_logprobs" in meta:
                # the lists are the live ones of the request: entries past this event's
                # completion_tokens belong to the next event
                total = min(len(meta["output_token_logprobs"]), meta["completion_tokens"])
                meta["output_token_logprobs_length"] = total
                for key in ("output_token_logprobs", "output_top_logprobs"):
                    if key in meta:
                        meta[key] = meta[key][lp_sent[i]:total]
                lp_sent[i] = total
            ids = out["output_ids"]
            if incremental:
                delta, ids_delta = text[sent[i]:], ids[ids_sent[i]:]
                ids_sent[i] = len(ids)
            sent[i] = max(sent[i], len(text))
            obj = state.wire_output({**out, "meta_info": meta}, with_text,
                                    delta if incremental else text)
            if incremental:
                obj["output_ids"] = ids_delta
            if len(reqs) > 1:
                obj["index"] = i
            yield sse_event(obj)
        yield SSE_DONE
    finally:
        await agen.aclose()
