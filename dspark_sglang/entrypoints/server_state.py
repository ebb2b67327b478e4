"""What both HTTP APIs share: the engine, request bookkeeping, and output conversion helpers.

Threading: everything here runs on the asyncio loop, except ``build`` (tokenization and grammar
compilation, run in a worker thread) and the Engine calls it wraps.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any

from fastapi import Request

from dspark_sglang.core.req import Req
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.protocol import ApiError
from dspark_sglang.server_args import ServerArgs

_TEXT_LOG_SIZE = 4096
_DISCONNECT_POLL_S = 0.5


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

    A stream must not send that tail yet: if the stop string completes, the final text is trimmed
    before it, and a cumulative stream must never shrink.
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ServerState:
    """Owns the Engine for the server's lifetime; maps client rids to engine rids."""

    def __init__(self, engine: Engine, args: ServerArgs) -> None:
        self.engine = engine
        self.args = args
        self.served_model_name = args.served_model_name or engine.model_path
        self.started_at = time.time()
        self.live: dict[str, list[str]] = {}  # client-visible rid -> engine rids in flight
        # rid -> full text (prompt + completion) of finished requests, for concate_and_append
        self.text_log: OrderedDict[str, str] = OrderedDict()
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)
        self._token_bytes = lru_cache(maxsize=65536)(engine.tokenizer.id_to_token_bytes)

    # ---- tokens ------------------------------------------------------------------------------
    def _decode_one(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._token_text(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes the token adds to the text (a byte fragment of a character stays one)."""
        return self._token_bytes(int(token_id))

    def openai_token(self, token_id: int) -> str:
        """A token as OpenAI spells it in logprobs: its text, or ``bytes:\\xNN...`` when its
        bytes are not valid UTF-8 on their own, so distinct tokens never share a key."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # ---- requests ----------------------------------------------------------------------------
    async def build(self, **kw: Any) -> tuple[list[Req], bool]:
        """``Engine.build_requests`` off the loop; ValueError (incl. GrammarError) and TypeError
        (a value of the wrong type deep in sampling_params) -> 400."""
        rid = kw.get("rid")
        for r in ([rid] if isinstance(rid, str) else rid or []):
            if r in self.live:
                raise ApiError(400, f"rid {r!r} is already in use by a running request")
        try:
            return await asyncio.to_thread(self.engine.build_requests, **kw)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None

    def register(self, reqs: list[Req]) -> list[str]:
        """Record ``reqs`` as in flight under their client rids (a rid_j child under rid too)."""
        keys: list[str] = []
        for r in reqs:
            keys.append(r.rid)
            self.live.setdefault(r.rid, []).append(r.rid)
            base, _, suffix = r.rid.rpartition("_")
            if base and suffix.isdigit() and base != r.rid:
                self.live.setdefault(base, []).append(r.rid)
                keys.append(base)
        return keys

    def unregister(self, keys: list[str]) -> None:
        for k in keys:
            self.live.pop(k, None)

    def log_text(self, rid: str, text: str) -> None:
        self.text_log[rid] = text
        self.text_log.move_to_end(rid)
        while len(self.text_log) > _TEXT_LOG_SIZE:
            self.text_log.popitem(last=False)

    async def stream(self, reqs: list[Req]) -> AsyncIterator[tuple[int, dict[str, Any], bool]]:
        """Yield ``(index, output, finished)``; closing this generator aborts unfinished reqs."""
        keys = self.register(reqs)
        gen = self.engine.async_generate_reqs(reqs)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()  # aborts whatever has not finished (frees its KV)
            self.unregister(keys)

    async def run(self, reqs: list[Req], request: Request | None) -> list[dict[str, Any]]:
        """Run to completion; final outputs in ``reqs`` order. A client that disconnects while
        waiting gets its requests aborted (ApiError 499 is raised, nobody reads it)."""
        finals: list[dict[str, Any] | None] = [None] * len(reqs)

        async def collect() -> None:
            agen = self.stream(reqs)
            try:
                async for i, out, fin in agen:
                    if fin:
                        finals[i] = out
            finally:
                await agen.aclose()

        task = asyncio.create_task(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    task.result()
                    break
                if request is not None and await request.is_disconnected():
                    task.cancel()
                    raise ApiError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
        return [f for f in finals if f is not None]

    # ---- logprobs in SGLang's wire format -----------------------------------------------------
    def wire_logprobs(self, entries: list[Any], with_text: bool) -> list[list[Any]]:
        """``[(logprob, token_id)]`` -> ``[[logprob, token_id, token_text_or_null]]``."""
        return [[lp, tid, self.token_text(tid) if with_text else None] for lp, tid in entries]

    def wire_top_logprobs(self, entries: list[Any], with_text: bool) -> list[Any]:
        return [None if e is None else self.wire_logprobs(e, with_text) for e in entries]

    def wire_output(self, out: dict[str, Any], with_text: bool,
                    text: str | None = None) -> dict[str, Any]:
        """An Engine output dict -> the native API's response object."""
        meta = dict(out["meta_info"])
        for key in ("input_token_logprobs", "output_token_logprobs"):
            if key in meta:
                meta[key] = self.wire_logprobs(meta[key], with_text)
        for key in ("input_top_logprobs", "output_top_logprobs"):
            if key in meta:
                meta[key] = self.wire_top_logprobs(meta[key], with_text)
        return {"text": out["text"] if text is None else text, "output_ids": out["output_ids"],
                "meta_info": meta}
