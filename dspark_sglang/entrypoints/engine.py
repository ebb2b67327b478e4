"""In-process engine (like ``sglang.Engine``): tokenizer manager + a scheduler thread.

Threading: the scheduler thread is the only one that touches ``Req`` objects, the cache manager
and the models. Callers talk to it through ``_inbox`` (requests, aborts, control calls) and get
results through per-request callbacks (thread-safe queues / the asyncio loop).

The scheduler thread also loads the model, so it is the only thread of the engine that opens
OpenMP parallel regions: libgomp keeps a worker team per thread that ever ran one, and once a
process has more of those worker threads than CPUs it stops spinning between regions and
sleeps instead, which made every kernel of a decode step wait for a wake-up (a SmolLM2 step on
GGUF blocks took 35 ms with the model loaded in the caller's thread, 15 ms loaded here).
Heavy torch work in other threads of the same process brings that slowdown back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from dspark_sglang.core.req import Req
from dspark_sglang.core.sampling_params import SamplingParams
from dspark_sglang.core.validation import (
    check_bool,
    check_int,
    check_text,
    validate_sampling_params,
)
from dspark_sglang.entrypoints.metrics import EmitObserver
from dspark_sglang.entrypoints.model_setup import EngineParts, build_engine_parts
from dspark_sglang.entrypoints.tokenize_pool import TokenizePool
from dspark_sglang.server_args import ServerArgs

logger = logging.getLogger(__name__)

GenInput = str | list[str] | None
PER_PROMPT_FIELDS = ("sampling_params", "rid", "return_logprob", "logprob_start_len",
                     "top_logprobs_num")


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over their sum chain)."""
    x = 0x9E3779B97F4A7C15
    for v in parts:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


class Engine:
    """``Engine(model_path=None, **server_args)``; ``generate``; ``shutdown``; context manager."""

    def __init__(self, model_path: str | None = None, server_args: ServerArgs | None = None,
                 **kwargs: Any) -> None:
        if server_args is None:
            server_args = ServerArgs(model_path=model_path, **kwargs)
        self.server_args = server_args
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _live and the counters
        self._live: dict[str, Req] = {}  # rid -> submitted, unfinished request
        self._emit_observers: tuple[EmitObserver, ...] = ()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._started = threading.Event()  # set once the caller's setup after the load is done
        self._thread = threading.Thread(target=self._run, name="dspark-scheduler", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        self.tokenizer = self.parts.tokenizer
        self.context_len = self.parts.context_len
        self.model_path = self.parts.model_path
        self._rid_counter = itertools.count(1)
        self._req_counter = itertools.count(1)  # default sampling seeds (never repeat)
        self._max_prompt_chars: int | None = None
        self._tokenize_pool = TokenizePool(self.tokenizer)  # big texts: off the GIL
        self.started_at = time.time()
        self.metrics = self.parts.metrics
        # copy-on-write: the scheduler thread iterates a snapshot while others add or remove
        with self._lock:
            self._emit_observers = (self.metrics, *self._emit_observers)
        self._started.set()

    # ---- scheduler thread ----------------------------------------------------------------------
    def _run(self) -> None:
        """Load the model on this thread (see the module docstring), then run the loop."""
        try:
            if self.server_args.num_threads:
                torch.set_num_threads(self.server_args.num_threads)
            self.parts: EngineParts = build_engine_parts(self.server_args, emit=self._emit)
            self.parts.scheduler.interleave = (
                not self.server_args.disable_prefill_decode_interleave)
        except BaseException as e:
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        self._started.wait()
        self._loop()

    def _loop(self) -> None:
        sched = self.parts.scheduler
        while not self._stop.is_set():
            try:
                block = not sched.has_work()
                msg = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            except queue.Empty:
                msg = None
            while msg is not None:
                self._handle(msg)
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if sched.has_work():
                try:
                    sched.step()
                except Exception as e:  # never kill the loop. Step failures are isolated per
                    # request inside the scheduler; this is what escaped that (admission code)
                    logger.error("scheduler step failed: %s", traceback.format_exc())
                    sched.abort_all(f"internal error: {type(e).__name__}: {e}", status_code=500)

    def _handle(self, msg: tuple[str, Any]) -> None:
        kind, payload = msg
        sched = self.parts.scheduler
        if kind == "req":
            sched.add_request(payload)
        elif kind == "abort":
            rid, fut = payload
            ok = sched.abort(rid)
            if fut is not None:
                fut.set_result(ok)
        elif kind == "call":
            fn, fut = payload
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _emit(self, req: Req, finished: bool) -> None:
        """Deliver ``req``'s output (scheduler thread). Never raises for a finished request: if
        building the output fails, the request gets a minimal error output instead."""
        if finished:
            with self._lock:
                if self._live.get(req.rid) is req:
                    del self._live[req.rid]
        if req.callback is None:
            return
        if not finished and not req.stream:
            return
        try:
            out = self._make_output(req, finished)
        except Exception as e:
            if not finished:
                raise  # the scheduler fails this request alone (and emits it finished)
            logger.error("output of %s failed: %s", req.rid, traceback.format_exc())
            req.finish_reason = {"type": "abort", "status_code": 500,
                                 "message": f"internal error: {type(e).__name__}: {e}"}
            out = {"text": "", "output_ids": list(req.output_ids), "index": req.rid,
                   "meta_info": {"id": req.rid, "prompt_tokens": len(req.origin_input_ids),
                                 "completion_tokens": len(req.output_ids), "cached_tokens": 0,
                                 "finish_reason": req.finish_reason, "spec_verify_ct": 0}}
        for observer in self._emit_observers:
            try:
                observer.on_emit(req, finished)
            except Exception:  # metrics must not fail a request
                logger.warning("emit observer failed on %s: %s", req.rid, traceback.format_exc())
        try:
            req.callback(out, finished)
        except Exception:  # a consumer that went away must not fail the step
            logger.warning("callback of %s failed: %s", req.rid, traceback.format_exc())

    def add_emit_observer(self, observer: EmitObserver) -> None:
        """Call ``observer.on_emit(req, finished)`` on the scheduler thread for every output
        delivered from now on (entrypoints/metrics.py states the contract). An observer that
        raises is logged; the request is unaffected."""
        with self._lock:
            self._emit_observers = (*self._emit_observers, observer)

    def remove_emit_observer(self, observer: EmitObserver) -> None:
        """Stop calling ``observer`` (no-op if it is not registered)."""
        with self._lock:
            self._emit_observers = tuple(o for o in self._emit_observers if o is not observer)

    def _make_output(self, req: Req, finished: bool) -> dict[str, Any]:
        op = self.parts.output
        text = op.output_text(req)
        if not finished and text.endswith("\ufffd"):  # incomplete UTF-8: hold it back
            text = text.rstrip("\ufffd")
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": op.meta_info(req),
                "index": req.rid}

    def call_in_loop(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` on the scheduler thread (between steps) and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._inbox.put(("call", (fn, fut)))
        return fut.result(timeout=timeout)

    # ---- request construction --------------------------------------------------------------------
    def _new_rid(self) -> str:
        with self._lock:
            n = next(self._rid_counter)
        return f"{uuid.uuid4().hex[:12]}-{n}"

    def _default_seed(self, j: int) -> int:
        with self._lock:
            n = next(self._req_counter)
        return _mix_seed(self.server_args.random_seed, n, j)

    def max_prompt_chars(self) -> int:
        """A text longer than this has more than ``context_len`` tokens whatever it says: every
        token spells at most ``max_token_bytes`` bytes and a character is at least one byte."""
        if self._max_prompt_chars is None:
            vocab = self.tokenizer.hf.get_vocab()
            longest = max((len(t.encode("utf-8", "replace")) for t in vocab), default=64)
            self._max_prompt_chars = self.context_len * max(longest, 1)
        return self._max_prompt_chars

    def kv_headroom(self) -> int:
        """Slots one decode step may need beyond a request's tokens (anchor + longest draft)."""
        return 1 + self.parts.decoder.worker.max_draft_len()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def build_requests(
        self, prompt: GenInput = None, sampling_params: dict[str, Any] | list[Any] | None = None,
        input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool | list = False,
        logprob_start_len: int | list | None = None, top_logprobs_num: int | list = 0,
        rid: str | list[str] | None = None, stream: bool = False,
    ) -> tuple[list[Req], bool]:
        """Validate and tokenize; raises ValueError naming the bad field.

        Returns (reqs, batched).
        """
        if (prompt is None) == (input_ids is None):
            raise ValueError("exactly one of text/prompt and input_ids must be given")
        if prompt is not None:
            batched = isinstance(prompt, list)
            prompts = prompt if batched else [prompt]
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("text must be a string or a list of strings")
            limit = self.max_prompt_chars()
            for p in prompts:
                check_text(p, "text")
                if len(p) > limit:  # reject before tokenizing: encode holds the GIL
                    raise ValueError(f"text has {len(p)} characters: more than the context "
                                     f"length {self.context_len} can hold in any tokenization")
            ids_list = [self._tokenize_pool.encode(p) for p in prompts]
        else:
            batched = isinstance(input_ids, list) and bool(input_ids) and \
                isinstance(input_ids[0], list)
            ids_list = input_ids if batched else [input_ids]  # type: ignore[list-item]
        n_in = len(ids_list)
        if n_in == 0:
            raise ValueError("empty batch")
        given = {"sampling_params": sampling_params, "rid": rid, "return_logprob": return_logprob,
                 "logprob_start_len": logprob_start_len, "top_logprobs_num": top_logprobs_num}
        for name in PER_PROMPT_FIELDS:
            v = given[name]
            if isinstance(v, list) and len(v) != n_in:
                raise ValueError(f"{name} is a list of {len(v)} but the batch has {n_in} "
                                 f"prompt(s): give one value or one per prompt")

        def per(v: Any, i: int) -> Any:
            return v[i] if isinstance(v, list) else v

        vocab = self.parts.vocab_size
        pool = self.server_args.max_total_tokens
        now = time.monotonic()
        timeout = self.server_args.request_timeout
        deadline = None if timeout is None else now + timeout
        headroom = self.kv_headroom()
        reqs: list[Req] = []
        for i, ids in enumerate(ids_list):
            if not isinstance(ids, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("input_ids must be a list of token ids")
            if not ids:
                raise ValueError("the prompt is empty (0 tokens)")
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"input_ids contains ids outside [0, {vocab})")
            if len(ids) >= self.context_len:
                raise ValueError(f"the prompt has {len(ids)} tokens, which is not less than the "
                                 f"context length {self.context_len}")
            if len(ids) + headroom > pool:
                raise ValueError(f"the prompt has {len(ids)} tokens but the KV pool holds only "
                                 f"{pool} (max_total_tokens)")
            sp_in = per(sampling_params, i)
            if sp_in is not None and not isinstance(sp_in, dict):
                raise ValueError("sampling_params must be an object or a list of objects")
            try:
                sp = SamplingParams.from_dict(sp_in)
            except RecursionError:
                raise ValueError("sampling_params.json_schema is nested too deeply") from None
            validate_sampling_params(sp, vocab)
            sp.normalize_and_validate(vocab, self.context_len)
            sp.max_new_tokens = min(sp.max_new_tokens, self.context_len - len(ids))
            if len(ids) + sp.max_new_tokens + headroom > pool:
                raise ValueError(
                    f"the prompt ({len(ids)} tokens) plus sampling_params.max_new_tokens "
                    f"({sp.max_new_tokens}) plus {headroom} slot(s) of decoding headroom do not "
                    f"fit in the KV pool of {pool} tokens (max_total_tokens): set "
                    f"max_new_tokens <= {pool - len(ids) - headroom}")
            grammar_spec = sp.grammar_spec()
            lp = check_bool(per(return_logprob, i) or False, "return_logprob")
            lsl = per(logprob_start_len, i)
            lsl = -1 if lsl is None else check_int(lsl, "logprob_start_len")
            if lp and lsl < 0:
                lsl = len(ids) - 1
            tln = check_int(per(top_logprobs_num, i) or 0, "top_logprobs_num", 0, 100)
            base_rid = per(rid, i) if rid is not None else self._new_rid()
            if not isinstance(base_rid, str) or not base_rid:
                raise ValueError("rid must be a non-empty string or a list of them")
            check_text(base_rid, "rid")
            for j in range(sp.n):
                r = Req(
                    rid=base_rid if sp.n == 1 else f"{base_rid}_{j}", origin_input_ids=list(ids),
                    sampling_params=sp if j == 0 else SamplingParams(**vars(sp)),
                    return_logprob=lp, logprob_start_len=min(lsl, len(ids) - 1),
                    top_logprobs_num=tln, stream=stream, created_at=now, deadline=deadline,
                )
                if not sp.is_greedy:
                    seed = self._default_seed(j) if sp.seed is None else (sp.seed + j) % (1 << 64)
                    g = torch.Generator()
                    g.manual_seed(seed)
                    r.generator = g
                if grammar_spec is not None:
                    r.grammar = self.parts.grammar_backend().compile(*grammar_spec).new_matcher()
                reqs.append(r)
        return reqs, batched or any(r.sampling_params.n > 1 for r in reqs)

    # ---- public API -----------------------------------------------------------------------------
    def submit(self, reqs: list[Req]) -> None:
        """Hand ``reqs`` (callbacks set) to the scheduler. Registration is atomic: if any rid is
        already live (or repeats within ``reqs``) nothing is submitted and ValueError names it."""
        with self._lock:
            seen: set[str] = set()
            for r in reqs:
                if r.rid in self._live or r.rid in seen:
                    raise ValueError(f"rid {r.rid!r} is already in use by a running request")
                seen.add(r.rid)
            for r in reqs:
                self._live[r.rid] = r
        for r in reqs:
            self._inbox.put(("req", r))

    def num_live(self) -> int:
        """Submitted requests that have not finished yet."""
        with self._lock:
            return len(self._live)

    def generate(self, prompt: GenInput = None, sampling_params: Any = None,
                 input_ids: Any = None, return_logprob: Any = False,
                 logprob_start_len: Any = None, top_logprobs_num: Any = 0,
                 stream: bool = False, rid: Any = None) -> Any:
        """Blocking. Returns one output dict, or a list for batched input / n > 1; with
        ``stream`` an iterator of cumulative output dicts (single request only)."""
        reqs, batched = self.build_requests(prompt, sampling_params, input_ids, return_logprob,
                                            logprob_start_len, top_logprobs_num, rid, stream)
        if stream:
            if len(reqs) != 1:
                raise ValueError("stream=True supports a single request")
            return self._stream_sync(reqs[0])
        qs: list[queue.Queue[tuple[dict[str, Any], bool]]] = []
        for r in reqs:
            q: queue.Queue[tuple[dict[str, Any], bool]] = queue.Queue()
            r.callback = lambda out, fin, q=q: q.put((out, fin))
            qs.append(q)
        self.submit(reqs)
        outs = [self._wait_final(q) for q in qs]
        return outs if batched else outs[0]

    @staticmethod
    def _wait_final(q: queue.Queue[tuple[dict[str, Any], bool]]) -> dict[str, Any]:
        while True:
            out, fin = q.get()
            if fin:
                return out

    def _stream_sync(self, req: Req) -> Iterator[dict[str, Any]]:
        q: queue.Queue[tuple[dict[str, Any], bool]] = queue.Queue()
        req.callback = lambda out, fin: q.put((out, fin))
        self.submit([req])
        fin = False
        try:
            while True:
                out, fin = q.get()
                yield out
                if fin:
                    return
        finally:
            if not fin:
                self.abort(req.rid)

    def async_generate_reqs(self, reqs: list[Req]) -> AsyncIterator[tuple[int, dict, bool]]:
        """Submit ``reqs`` now (ValueError on a live rid, see ``submit``) and return an async
        iterator of ``(index, output, finished)`` as outputs arrive. Call from the event loop.

        If the consumer stops early (client disconnect), unfinished requests are aborted and
        their KV freed.
        """
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[tuple[int, dict[str, Any], bool]] = asyncio.Queue()
        for i, r in enumerate(reqs):
            r.callback = (lambda out, fin, i=i:
                          loop.call_soon_threadsafe(aq.put_nowait, (i, out, fin)))
        self.submit(reqs)
        return self._outputs(reqs, aq)

    async def _outputs(self, reqs: list[Req], aq: asyncio.Queue[tuple[int, dict[str, Any], bool]]
                       ) -> AsyncIterator[tuple[int, dict, bool]]:
        pending = len(reqs)
        done: set[int] = set()
        try:
            while pending:
                i, out, fin = await aq.get()
                if fin:
                    pending -= 1
                    done.add(i)
                yield i, out, fin
        finally:
            for i, r in enumerate(reqs):
                if i not in done:
                    self.abort(r.rid)

    def abort(self, rid: str, wait: bool = False) -> bool:
        """Abort the live request ``rid`` (exact match). Returns at once whether it was live; the
        scheduler frees it between steps. ``wait`` is accepted for compatibility and ignored."""
        with self._lock:
            found = rid in self._live
        if found:
            self._inbox.put(("abort", (rid, None)))
        return found

    def flush_cache(self, timeout: float = 5.0) -> bool:
        """Drop the prefix cache and the grammar cache. False (at once) while requests are live,
        or if the scheduler does not get to it within ``timeout`` seconds."""
        if self.num_live():
            return False
        try:
            ok = bool(self.call_in_loop(self.parts.cache.flush, timeout=timeout))
        except TimeoutError:
            return False
        backend = getattr(self.parts, "_grammar_backend", None)
        if ok and backend is not None and hasattr(backend, "clear_cache"):
            backend.clear_cache()
        return ok

    def check_integrity(self) -> dict[str, int]:
        """Assert free + cached + in-use == pool size (on the scheduler thread)."""

        def _check() -> dict[str, int]:
            self.parts.cache.check_integrity()
            c = self.parts.cache
            return {"free": c.allocator.available_size(), "cached": c.tree.total_size(),
                    "in_use": c.in_use(), "size": c.allocator.size}
        return self.call_in_loop(_check)

    def get_server_info(self) -> dict[str, Any]:
        def _info() -> dict[str, Any]:
            p = self.parts
            spec = p.decoder.stats.as_dict()
            c = p.cache
            return {
                **{k: v for k, v in vars(self.server_args).items() if k != "api_key"},
                "model_path": self.model_path,
                "context_length": self.context_len,
                "attention_backend": p.runner.attention_backend,  # resolved ("auto" -> name)
                "quantization": p.runner.quantization,  # resolved ("auto" -> none | gguf)
                "speculative_algorithm": self.server_args.speculative_algorithm,
                "avg_spec_accept_length": spec["avg_spec_accept_length"],
                "spec_stats": spec,
                "num_running_reqs": len(p.scheduler.running) + len(p.scheduler.prefilling),
                "num_waiting_reqs": len(p.scheduler.waiting),
                "num_retractions": p.scheduler.num_retractions,
                "cache_hit_tokens": c.hit_tokens,
                "cache_query_tokens": c.query_tokens,
                "cache_hit_rate": c.hit_tokens / c.query_tokens if c.query_tokens else 0.0,
                "num_forward_tokens": p.runner.num_forward_tokens,
                "kv_free_slots": c.allocator.available_size(),
                "kv_cached_slots": c.tree.total_size(),
                "kv_pool_size": c.allocator.size,
                "version": "0.1.0",
            }
        return self.call_in_loop(_info)

    def reset_spec_stats(self) -> None:
        """Zero the engine-wide speculation counters (benchmarks call this between runs)."""
        from dspark_sglang.speculative.spec_decoder import SpecStats

        def _reset() -> None:
            self.parts.decoder.stats = SpecStats()
        self.call_in_loop(_reset)

    def shutdown(self) -> None:
        if self._stop.is_set():
            return
        try:
            self.call_in_loop(lambda: self.parts.scheduler.abort_all("engine shutdown"), 10)
        except Exception:
            pass
        self._stop.set()
        self._thread.join(timeout=10)
        self._tokenize_pool.shutdown()
        if self.parts.runner.tp_driver is not None:  # tensor-parallel followers exit too
            self.parts.runner.tp_driver.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass
