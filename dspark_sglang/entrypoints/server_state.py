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
_RESERVATION_S = 120.0  # a built request that is never run gives its rid back after this


class Overloaded(ApiError):
    """429 with a ``Retry-After`` header (``--max-queued-requests``)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(429, message, "overloaded_error")
        self.headers = {"Retry-After": str(retry_after)}


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
        self._engine_rids: set[str] = set()  # every engine rid in ``live``
        self._reserved: dict[str, list[str]] = {}  # first engine rid -> keys, built not run yet
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
        """``Engine.build_requests`` off the loop, then reserve the requests' rids.

        ValueError (incl. GrammarError), TypeError and RecursionError -> 400; a rid that is live
        (or repeats in the batch) -> 400; past ``max_queued_requests`` -> 429 with Retry-After.
        Check and reservation run on the loop with no await between them, so two requests with
        the same rid cannot both pass. The reservation ends when ``stream``/``run`` finish (or
        after :data:`_RESERVATION_S` if they are never called).
        """
        self.check_capacity(1)
        try:
            reqs, batched = await asyncio.to_thread(self.engine.build_requests, **kw)
        except RecursionError:
            raise ApiError(400, "the request is nested too deeply") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        self.check_capacity(len(reqs))
        keys = self.register(reqs)
        self._reserved[reqs[0].rid] = keys
        asyncio.get_running_loop().call_later(_RESERVATION_S, self._drop_reservation,
                                              reqs[0].rid, keys)
        return reqs, batched

    def check_capacity(self, n: int) -> None:
        """429 when admitting ``n`` more requests would queue more than ``max_queued_requests``
        beyond ``max_running_requests``."""
        limit = self.args.max_queued_requests
        if limit is None:
            return
        queued = self.num_engine_reqs + n - self.args.max_running_requests
        if queued > limit:
            raise Overloaded(f"server overloaded: {self.num_engine_reqs} requests in flight, "
                             f"at most {self.args.max_running_requests} running + {limit} queued "
                             f"(max_queued_requests); retry later")

    def register(self, reqs: list[Req]) -> list[str]:
        """Record ``reqs`` as in flight under their client rids; an ``n > 1`` request's children
        ``rid_j`` are also listed under ``rid``. Raises ApiError(400) if a rid is taken (nothing
        is registered then)."""
        entries: list[tuple[str, str]] = []  # (client key, engine rid)
        for r in reqs:
            entries.append((r.rid, r.rid))
            if r.sampling_params.n > 1:
                entries.append((r.rid.rpartition("_")[0], r.rid))
        keys = list(dict.fromkeys(k for k, _ in entries))
        seen: set[str] = set()
        for r in reqs:
            if r.rid in self._engine_rids or r.rid in seen:
                raise ApiError(400, f"rid {r.rid!r} is already in use by a running request",
                               param="rid")
            seen.add(r.rid)
        for k in keys:
            if k in self.live:
                raise ApiError(400, f"rid {k!r} is already in use by a running request",
                               param="rid")
        for k, rid in entries:
            self.live.setdefault(k, []).append(rid)
        self._engine_rids.update(seen)
        return keys

    def unregister(self, keys: list[str]) -> None:
        for k in keys:
            for rid in self.live.pop(k, []):
                self._engine_rids.discard(rid)

    @property
    def num_engine_reqs(self) -> int:
        """Engine requests reserved or running through this server."""
        return len(self._engine_rids)

    def _drop_reservation(self, first_rid: str, keys: list[str]) -> None:
        if self._reserved.get(first_rid) is keys:  # built but never run (e.g. a stream the
            del self._reserved[first_rid]  # client left before it started)
            self.unregister(keys)

    def log_text(self, rid: str, text: str) -> None:
        self.text_log[rid] = text
        self.text_log.move_to_end(rid)
        while len(self.text_log) > _TEXT_LOG_SIZE:
            self.text_log.popitem(last=False)

    async def stream(self, reqs: list[Req]) -> AsyncIterator[tuple[int, dict[str, Any], bool]]:
        """Yield ``(index, output, finished)``; closing this generator aborts unfinished reqs."""
        keys = self._reserved.pop(reqs[0].rid, None) if reqs else None
        if keys is None:
            keys = self.register(reqs)
        try:
            try:
                gen = self.engine.async_generate_reqs(reqs)
            except ValueError as e:  # a rid used through the Engine API at the same time
                raise ApiError(400, str(e), param="rid") from None
            try:
                async for item in gen:
                    yield item
            finally:
                await gen.aclose()  # aborts whatever has not finished (frees its KV)
        finally:
            self.unregister(keys)

    async def run(self, reqs: list[Req], request: Request | None) -> list[dict[str, Any]]:
        """Run to completion; final outputs in ``reqs`` order. A client that disconnects while
        waiting gets its requests aborted (ApiError 499 is raised, nobody reads it). A request
        the engine finished with an error (``finish_reason`` with a ``status_code``: 400 cannot
        fit, 408 timed out, 500 internal) raises ApiError with that status; the rest of the batch
        is aborted."""
        finals: list[dict[str, Any] | None] = [None] * len(reqs)

        async def collect() -> None:
            agen = self.stream(reqs)
            try:
                async for i, out, fin in agen:
                    if fin:
                        fr = out["meta_info"].get("finish_reason") or {}
                        if fr.get("type") == "abort" and fr.get("status_code"):
                            raise ApiError(int(fr["status_code"]), str(fr.get("message")),
                                           "internal_error" if fr["status_code"] >= 500
                                           else "invalid_request_error")
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
