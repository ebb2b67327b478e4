"""Scheduler: continuous batching with chunked prefill, radix-aware admission, retraction.

One iteration (``step``): expire requests past their deadline, admit waiting requests (longest
cached prefix first) while KV slots and rows allow, run one prefill forward over up to
``chunked_prefill_size`` prompt tokens, then one decode step (plain or speculative) for every
running request. Decode steps are interleaved with prefill chunks, so a long prompt delays each
running stream by at most one chunk forward per token (unless ``interleave`` is off: then decode
waits until no prompt is left to prefill). When a decode step finds the KV pool exhausted, the
newest running request is retracted (its KV is released, it re-enters the queue with its output
so far) — never a crash.

Failure isolation: an exception inside a prefill or decode forward (or the sampling around it)
frees what that forward allocated and restores the requests' random generators; the batch is then
retried one request at a time, and only a request that fails alone is finished, with its own
error (``finish_reason`` abort with ``status_code`` 500). An exception while appending one
request's tokens or emitting its output fails that request only.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from dspark_sglang.core.forward_batch import ForwardMode
from dspark_sglang.core.req import Req, ReqState
from dspark_sglang.mem_cache.cache_manager import CacheManager
from dspark_sglang.model_executor.model_runner import (
    BatchRequestSpec,
    ModelRunner,
    build_forward_batch,
)
from dspark_sglang.scheduler.output_processor import OutputProcessor
from dspark_sglang.speculative.spec_decoder import SpecDecoder

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: ModelRunner, cache: CacheManager, decoder: SpecDecoder,
                 output: OutputProcessor, max_running: int, chunk_size: int,
                 emit: Callable[[Req, bool], None], interleave: bool = True) -> None:
        self.runner = runner
        self.cache = cache
        self.decoder = decoder
        self.output = output
        self.max_running = max_running
        self.chunk_size = chunk_size if chunk_size > 0 else 1 << 30
        self.emit = emit  # emit(req, finished) after its tokens changed
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []
        self.running: list[Req] = []
        self.num_retractions = 0
        # after a retraction, admit nothing new until a request finishes (or nothing runs):
        # otherwise the retracted request is re-admitted at once and the pool thrashes forever
        self._admission_paused = False
        self.finished_count = 0
        self.interleave = interleave  # a decode step after every prefill chunk
        self.num_isolated_failures = 0  # requests failed alone after a batch step raised

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        req.state = ReqState.WAITING
        self.waiting.append(req)

    def abort(self, rid: str) -> bool:
        for q in (self.waiting, self.prefilling, self.running):
            for req in list(q):
                if req.rid == rid:
                    req.finish_reason = {"type": "abort", "message": "aborted by request"}
                    self._finish(req, cache=False)
                    return True
        return False

    def abort_all(self, message: str, status_code: int | None = None) -> None:
        for q in (self.waiting, self.prefilling, self.running):
            for req in list(q):
                req.finish_reason = {"type": "abort", "message": message}
                if status_code is not None:
                    req.finish_reason["status_code"] = status_code
                self._finish(req, cache=False)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def num_in_flight(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    # ---- one iteration -------------------------------------------------------------------------
    def step(self) -> None:
        self._expire()
        self._admit()
        prefilled = False
        if self.prefilling:
            self._isolated(self._run_prefill, self._prefill_batch())
            prefilled = True
        if self.running and (self.interleave or not prefilled):
            self._isolated(self._run_decode, list(self.running))

    def _expire(self) -> None:
        now = time.monotonic()
        for q in (self.waiting, self.prefilling, self.running):
            for req in [r for r in q if r.deadline is not None and now > r.deadline]:
                req.finish_reason = {"type": "abort", "status_code": 408, "message": (
                    f"request timed out after {now - req.created_at:.1f} s")}
                self._finish(req, cache=True)

    # ---- failure isolation ---------------------------------------------------------------------
    def _isolated(self, run: Callable[[list[Req]], None], reqs: list[Req]) -> None:
        """``run(reqs)``; if it raises, retry each request alone and fail those that still do."""
        if not reqs:
            return
        saved = self._save_generators(reqs)
        try:
            run(reqs)
            return
        except Exception as e:
            if len(reqs) == 1:
                self._fail(reqs[0], e)
                return
            logger.warning("a batch of %d failed (%s: %s); retrying one by one", len(reqs),
                           type(e).__name__, e)
        self._restore_generators(saved)
        for req in reqs:
            if req.finished or req.state not in (ReqState.PREFILL, ReqState.RUNNING):
                continue
            one = self._save_generators([req])
            try:
                run([req])
            except Exception as e:
                self._restore_generators(one)
                self._fail(req, e)

    @staticmethod
    def _save_generators(reqs: list[Req]) -> list[tuple[torch.Generator, torch.Tensor]]:
        return [(r.generator, r.generator.get_state()) for r in reqs if r.generator is not None]

    @staticmethod
    def _restore_generators(saved: list[tuple[torch.Generator, torch.Tensor]]) -> None:
        for g, state in saved:
            g.set_state(state)

    def _fail(self, req: Req, e: BaseException) -> None:
        """Finish ``req`` alone with an internal error; its KV is freed, not cached."""
        logger.error("request %s failed: %s", req.rid, "".join(
            traceback.format_exception(type(e), e, e.__traceback__)))
        self.num_isolated_failures += 1
        req.finish_reason = {"type": "abort", "status_code": 500,
                             "message": f"internal error: {type(e).__name__}: {e}"}
        if req.state != ReqState.FINISHED:
            self._finish(req, cache=False)

    def _admit(self) -> None:
        if not self.waiting:
            return
        active = len(self.prefilling) + len(self.running)
        if active >= self.max_running or (self._admission_paused and active):
            return
        self._admission_paused = False
        # radix-aware order: longest cached prefix first (FCFS among equals)
        # (a match stays valid through this loop: admission only locks, it never inserts/evicts)
        scored = []
        for i, req in enumerate(self.waiting):
            slots, node = self.cache.match(req, self._match_limit(req))
            scored.append((-slots.numel(), i, req, slots, node))
        scored.sort(key=lambda x: (x[0], x[1]))
        headroom = 1 + self.decoder.worker.max_draft_len()
        admitted: list[Req] = []
        for _, _, req, slots, node in scored:
            if active + len(admitted) >= self.max_running:
                break
            if self._shares_uncached_prefix(req, slots.numel(), admitted + self.prefilling):
                continue  # admit after the sibling's prompt is in the tree: a cache hit then
            need = req.prefill_target_len() - slots.numel()
            first_chunk = min(need, self.chunk_size)
            reserve = headroom * (len(self.running) + len(self.prefilling) + len(admitted) + 1)
            avail = self.cache.available() - self._locked_extra(slots, node)
            if first_chunk + reserve > avail:
                if active + len(admitted) == 0:
                    # nothing else holds KV, so what is missing now is missing for good: fail
                    # it instead of waiting (and spinning) forever
                    self.waiting.remove(req)
                    req.finish_reason = {"type": "abort", "status_code": 400, "message": (
                        f"request needs {first_chunk + reserve} KV slots (prompt chunk + "
                        f"decoding headroom) but the pool can hold {avail} (max_total_tokens)")}
                    self._finish(req, cache=False)
                    continue
                break
            if not self.cache.admit(req, slots, node):
                break
            admitted.append(req)
        for req in admitted:
            self.waiting.remove(req)
            req.state = ReqState.PREFILL
            self.prefilling.append(req)

    @staticmethod
    def _shares_uncached_prefix(req: Req, matched: int, others: list[Req],
                                min_shared: int = 32) -> bool:
        """True if ``req`` shares >= ``min_shared`` not-yet-cached prompt tokens with a request
        being prefilled now (e.g. the branches of an sgl ``fork`` sent at once)."""
        ids = req.origin_input_ids
        for o in others:
            oid = o.origin_input_ids
            n = min(len(ids), len(oid)) - 1
            if n - matched < min_shared:
                continue
            k = 0
            while k < n and ids[k] == oid[k]:
                k += 1
            if k - matched >= min_shared:
                return True
        return False

    def _locked_extra(self, slots: torch.Tensor, node: Any) -> int:
        # matching slots that are currently evictable stop being evictable once locked
        return 0 if slots.numel() == 0 else min(slots.numel(), self.cache.tree.evictable_size())

    def _match_limit(self, req: Req) -> int:
        limit = req.prefill_target_len()
        if not req.output_ids:
            limit -= 1  # the last prompt token must be computed to get its logits
        if req.return_logprob and not req.output_ids:
            limit = min(limit, max(req.logprob_start_len, 0))
        return max(limit, 0)

    # ---- prefill -------------------------------------------------------------------------------
    def _prefill_batch(self) -> list[Req]:
        """The prefilling requests the next chunk covers (in order, within the token budget)."""
        budget, out = self.chunk_size, []
        for req in self.prefilling:
            if budget <= 0:
                break
            out.append(req)
            budget -= max(0, req.prefill_target_len() - req.kv_len)
        return out

    def _run_prefill(self, reqs: list[Req]) -> None:
        budget = self.chunk_size
        batch: list[tuple[Req, int]] = []
        for req in reqs:
            if budget <= 0:
                break
            n = min(req.prefill_target_len() - req.kv_len, budget)
            if n <= 0:
                batch.append((req, 0))
                continue
            batch.append((req, n))
            budget -= n
        total = sum(n for _, n in batch)
        slots = self.cache.alloc_slots(total)
        if slots is None:  # cannot happen after admission accounting, but never crash
            self._retract_one(self.prefilling[-1])
            return
        try:
            by_req = self._prefill_forward(batch, slots)
        except BaseException:
            self.cache.free_slots(slots)  # nothing owns them yet
            raise
        for req, n in batch:
            req.kv_len += n  # its slots are in its req_to_token row from here on
            try:
                rows = by_req.get(req.rid, {})
                if req.return_logprob and not req.output_ids:
                    self._collect_input_logprobs(req, rows, req.kv_len - n, req.kv_len)
                self.cache.cache_unfinished(req)  # share the prompt at once (fork siblings)
                if req.kv_len >= req.prefill_target_len():
                    self._finish_prefill(req, rows.get(req.kv_len - 1))  # leaves `prefilling`
            except Exception as e:
                self._fail(req, e)

    def _prefill_forward(self, batch: list[tuple[Req, int]], slots: torch.Tensor
                         ) -> dict[str, dict[int, torch.Tensor]]:
        """One EXTEND forward over ``batch``'s chunks; logits rows by request and position."""
        specs, logit_rows, row_owner = [], [], []
        off = 0
        for req, n in batch:
            if n == 0:
                continue
            loc = slots[off : off + n]
            self.cache.req_to_token_pool.write(req.req_pool_idx, req.kv_len, loc)
            ids = req.fill_ids[req.kv_len : req.kv_len + n]
            specs.append(BatchRequestSpec(req.req_pool_idx, ids, req.kv_len, loc))
            rows = self._prefill_logit_rows(req, n)
            logit_rows.extend(off + r for r in rows)
            row_owner.extend((req, req.kv_len + r) for r in rows)
            off += n
        logits = None
        if specs:
            idx = torch.tensor(logit_rows, dtype=torch.int64)
            fb = build_forward_batch(ForwardMode.EXTEND, specs, self.cache.req_to_token,
                                     logits_indices=idx,
                                     capture_layer_ids=self.decoder.worker.capture_layer_ids)
            out = self.runner.forward(fb)
            self.decoder.worker.on_target_forward(fb, out)
            logits = out.logits
        by_req: dict[str, dict[int, torch.Tensor]] = {}
        if logits is not None:
            for (req, pos), row in zip(row_owner, logits):
                by_req.setdefault(req.rid, {})[pos] = row
        return by_req

    def _prefill_logit_rows(self, req: Req, n: int) -> list[int]:
        """Rows (relative to this chunk) whose logits we need: input logprobs + last token."""
        start, end = req.kv_len, req.kv_len + n
        rows = set()
        if req.return_logprob and not req.output_ids:
            lo = max(req.logprob_start_len, 0)
            # logprob of token i comes from row i-1; tokens lo+1 .. len-1
            rows.update(p - start for p in range(max(lo, start), min(end, req.seqlen - 1)))
        if end >= req.prefill_target_len() and not req.output_ids:
            rows.add(n - 1)
        return sorted(rows)

    def _collect_input_logprobs(self, req: Req, rows: dict[int, torch.Tensor], start: int,
                                end: int) -> None:
        lo = max(req.logprob_start_len, 0)
        ids = req.origin_input_ids
        for pos in range(max(lo, start), end):
            if pos == lo:
                req.input_token_logprobs.append((None, ids[pos]))
                if req.top_logprobs_num:
                    req.input_top_logprobs.append(None)
            prev = rows.get(pos)
            if prev is not None and pos + 1 < len(ids):
                lp = torch.log_softmax(prev.float(), dim=-1)
                req.input_token_logprobs.append((float(lp[ids[pos + 1]]), ids[pos + 1]))
                if req.top_logprobs_num:
                    v, i = lp.topk(req.top_logprobs_num)
                    req.input_top_logprobs.append(list(zip(v.tolist(), i.tolist())))

    def _finish_prefill(self, req: Req, last_logits: torch.Tensor | None) -> None:
        if req.output_ids:  # re-admitted after retraction: continue decoding
            req.state = ReqState.RUNNING
            self.prefilling.remove(req)
            self.running.append(req)
            return
        if req.sampling_params.max_new_tokens == 0:
            req.finish_reason = {"type": "length", "length": 0}
            self._finish(req, cache=True)
            return
        assert last_logits is not None
        tok, lps = self.decoder.sample_first_token(req, last_logits)
        req.first_token_at = time.monotonic()
        req.state = ReqState.RUNNING
        self.prefilling.remove(req)
        self.running.append(req)
        self.output.append_tokens(req, [tok], lps)
        if req.finished:
            self._finish(req, cache=True)
        else:
            self.emit(req, False)

    # ---- decode --------------------------------------------------------------------------------
    def _run_decode(self, reqs: list[Req]) -> None:
        reqs = [r for r in reqs if r in self.running]
        while reqs:
            results = self.decoder.step(reqs)
            if results is not None:
                break
            if len(self.running) == 1 and self.cache.tree.evictable_size() == 0:
                req = self.running[0]
                req.finish_reason = {"type": "abort", "status_code": 400,
                                     "message": "KV cache too small for this request"}
                self._finish(req, cache=False)
                return
            victim = self.running[-1]
            self._retract_one(victim)
            if victim in reqs:
                reqs.remove(victim)
        else:
            return
        for res in results:
            req = res.req
            try:
                self.output.append_tokens(req, res.tokens, res.logprobs)
                if req.finished:
                    self._finish(req, cache=True)
                else:
                    self.emit(req, False)
            except Exception as e:
                self._fail(req, e)

    def _retract_one(self, req: Req) -> None:
        self.cache.release_req(req, cache=True)
        if req in self.running:
            self.running.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        req.state = ReqState.WAITING
        self.decoder.release(req)
        self.waiting.appendleft(req)
        self.num_retractions += 1
        self._admission_paused = True

    def _finish(self, req: Req, cache: bool) -> None:
        self.cache.release_req(req, cache=cache)
        for q in (self.running, self.prefilling):
            if req in q:
                q.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.state = ReqState.FINISHED
        self.decoder.release(req)
        self._admission_paused = False
        self.finished_count += 1
        self.emit(req, True)
