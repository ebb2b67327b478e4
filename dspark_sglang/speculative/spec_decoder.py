"""One decode step for all running requests: draft, verify in one target forward, accept, commit.

Per request the verify input is ``[anchor, d_1 .. d_l]`` where the anchor is the last token the
target produced (not yet in KV). Row ``j`` of the target's logits decides the token after
``d_j``: greedy acceptance keeps the longest prefix that matches the target's choice, rejection
sampling keeps it with probability ``min(1, p/q)``; either way one more token (correction or
bonus) comes from the target. With an empty draft this is exactly plain decoding.

Acceptance rules live in ``speculative/verify.py`` and the tree mask in ``speculative/tree.py``;
this file only routes each request to its rule, so their unit tests test what the server runs.

Slots: ``1 + l`` slots are allocated per request; the anchor's and accepted drafts' slots are
written to ``req_to_token`` (tree paths are compacted, positions already match their depth), the
rest are freed at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from dspark_sglang.constrained.draft_walk import DraftWalk
from dspark_sglang.core.forward_batch import ForwardMode
from dspark_sglang.core.req import Req
from dspark_sglang.layers import sampler as smp
from dspark_sglang.layers.coupling import coupled_sample
from dspark_sglang.layers.logits_processing import (
    RowSpec,
    adjust_logits_,
    needs_adjust,
    sampling_info,
)
from dspark_sglang.mem_cache.cache_manager import CacheManager
from dspark_sglang.model_executor.model_runner import (
    BatchRequestSpec,
    ModelRunner,
    build_forward_batch,
)
from dspark_sglang.speculative import verify as vfy
from dspark_sglang.speculative.tree import node_depths, tree_attention_mask
from dspark_sglang.speculative.worker import Draft, DraftWorker, StepResult

__all__ = ["PhaseTimer", "SpecDecoder", "SpecStats", "StepResult"]

# ``with phase_timer(name):`` around each phase of a step (SpecDecoder.phase_timer)
PhaseTimer = Callable[[str], AbstractContextManager[Any]]


@dataclass
class _Saved:
    """What a step restores when it is cancelled before its commit (``SpecDecoder.step``)."""

    generators: list[tuple[torch.Generator, torch.Tensor]]
    worker: Any


@dataclass
class SpecStats:
    steps: int = 0  # batched verify forwards
    req_steps: int = 0  # (request, verify forward) pairs
    verify_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    per_pos_tried: list[int] | None = None
    per_pos_accepted: list[int] | None = None
    last_lengths: list[int] | None = None
    last_expected_tau: float | None = None
    forced_tokens: int = 0  # grammar jump-forward tokens proposed

    def record_position(self, num_drafted: int, num_accepted: int) -> None:
        if self.per_pos_tried is None:
            self.per_pos_tried, self.per_pos_accepted = [], []
        assert self.per_pos_accepted is not None
        while len(self.per_pos_tried) < num_drafted:
            self.per_pos_tried.append(0)
            self.per_pos_accepted.append(0)
        for j in range(num_drafted):
            if j > num_accepted:
                break
            self.per_pos_tried[j] += 1
            if j < num_accepted:
                self.per_pos_accepted[j] += 1

    def as_dict(self) -> dict[str, Any]:
        tried, acc = self.per_pos_tried or [], self.per_pos_accepted or []
        return {
            "steps": self.steps,
            "req_steps": self.req_steps,
            "emitted_tokens": self.emitted,
            "verify_tokens": self.verify_tokens,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            # per request and step (what SGLang reports): tokens emitted per verify
            "avg_spec_accept_length": self.emitted / self.req_steps if self.req_steps else 0.0,
            "avg_verify_tokens_per_step": self.verify_tokens / self.steps if self.steps else 0.0,
            "avg_verify_tokens_per_req_step": (self.verify_tokens / self.req_steps
                                               if self.req_steps else 0.0),
            "draft_acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "per_position_acceptance": [a / t if t else 0.0 for a, t in zip(acc, tried)],
            "jump_forward_tokens": self.forced_tokens,
            "last_verify_lengths": self.last_lengths,
            "last_expected_tau": self.last_expected_tau,
        }


class SpecDecoder:
    def __init__(self, runner: ModelRunner, cache: CacheManager, worker: DraftWorker,
                 eos_ids: set[int], vocab_size: int) -> None:
        self.runner = runner
        self.cache = cache
        self.worker = worker
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.stats = SpecStats()
        # grammar jump-forward rides on speculation: forced tokens replace the draft and are
        # verified like any draft (lossless); plain decoding (NONE) stays one token per step
        self.jump_forward = worker.name != "NONE"
        # profiling hook (benchmark/step_timer.py), entered around: "step" (the whole call),
        # inside it "draft" (worker.propose), "target" (the verify forward), "ctx_update"
        # (worker.on_target_forward) and "accept" (acceptance, then again the commit)
        self.phase_timer: PhaseTimer | None = None

    def _phase(self, name: str) -> AbstractContextManager[Any]:
        return nullcontext() if self.phase_timer is None else self.phase_timer(name)

    def _apply_jump_forward(self, reqs: list[Req], drafts: list[Draft]) -> None:
        limit = max(self.worker.max_draft_len(), 8)
        for i, req in enumerate(reqs):
            g = req.grammar
            if g is None or g.is_terminated():
                continue
            forced = g.find_jump_forward_tokens()[: min(limit, req.draft_room())]
            if forced:
                drafts[i] = Draft(tokens=list(forced), forced=True)

    def step(self, reqs: list[Req]) -> list[StepResult] | None:
        """Run one step; None when KV slots ran out.

        A step that returns None or raises before its commit leaves no trace: the slots it
        allocated are freed, and what drafting changed is restored -- each request's random
        generator and the worker's state, its per-request state included
        (``DraftWorker.snapshot``); ``stats`` change and ``worker.on_verified`` is called only at
        the commit. A retry (after a retraction, or request by request after a failure)
        therefore drafts as this step did.
        """
        with self._phase("step"):
            return self._step(reqs)

    def _step(self, reqs: list[Req]) -> list[StepResult] | None:
        saved = self._save(reqs)
        slots = None
        try:
            with self._phase("draft"):
                drafts = self.worker.propose(reqs)
            if self.jump_forward:
                self._apply_jump_forward(reqs, drafts)
            total = sum(1 + len(d) for d in drafts)
            slots = self.cache.alloc_slots(total)
            if slots is None:
                self._restore(saved)
                return None
            specs, results, kept_rows = self._verify(reqs, drafts, slots, total)
        except BaseException:
            if slots is not None:
                self.cache.free_slots(slots)
            self._restore(saved)
            raise
        with self._phase("accept"):
            self._commit(reqs, drafts, specs, results, kept_rows)
        return results

    def sample_first_token(self, req: Req, logits: torch.Tensor
                           ) -> tuple[int, list[tuple[Any, Any]] | None]:
        """The token after the prompt from the prefill's last logits row (``[V]``, unchanged):
        processed like a verify row (penalties, min tokens, grammar mask), then the argmax when
        greedy, the position-keyed sample when seeded (``layers/coupling.py``: what every
        decoding mode emits at this position), else a draw from the request's generator. Also
        the token's logprob entry when the request returns logprobs."""
        processed = logits[None].clone()  # [1, V]
        adjust_logits_(processed, [RowSpec(req, [], req.grammar)], self.eos_ids, self.vocab_size)
        info = sampling_info([req])
        probs = smp.logits_to_probs(processed, info)
        sp = req.sampling_params
        if sp.seed is not None and not sp.is_greedy:
            tok = coupled_sample(probs[0], sp.seed, len(req.output_ids))
        else:
            tok = int(smp.sample(probs, info, logits=processed)[0])
        lps = None
        if req.return_logprob:
            logp = smp.compute_logprobs(logits[None])[0]  # raw logits, as verify rows report
            lps = [_logprob_entry(logp, tok, req.top_logprobs_num)]
        return tok, lps

    def release(self, req: Req) -> None:
        """``req`` finished, aborted or was retracted: the worker drops its per-request state."""
        self.worker.release(req)

    def _save(self, reqs: list[Req]) -> _Saved:
        return _Saved(
            generators=[(r.generator, r.generator.get_state())
                        for r in reqs if r.generator is not None],
            worker=self.worker.snapshot(),
        )

    def _restore(self, saved: _Saved) -> None:
        for gen, gen_state in saved.generators:
            gen.set_state(gen_state)
        self.worker.restore(saved.worker)

    def _verify(self, reqs: list[Req], drafts: list[Draft], slots: torch.Tensor, total: int
                ) -> tuple[list[BatchRequestSpec], list[StepResult], list[list[int]]]:
        """Target forward over ``[anchor] + draft`` per request and acceptance; writes only
        ``req_to_token`` entries past each ``kv_len`` (so a failure here is undone by freeing
        ``slots``)."""
        specs, off = [], 0
        for req, d in zip(reqs, drafts):
            n = 1 + len(d)
            loc = slots[off : off + n]
            off += n
            mask, positions = None, None
            if d.parents is not None:
                mask = tree_attention_mask(torch.tensor(d.parents, dtype=torch.int64))
                positions = [req.kv_len] + [req.kv_len + x for x in node_depths(d.parents)]
            self.cache.req_to_token_pool.write(req.req_pool_idx, req.kv_len, loc)
            specs.append(BatchRequestSpec(req.req_pool_idx, [req.output_ids[-1]] + d.tokens,
                                          req.kv_len, loc, mask, positions))
        mode = ForwardMode.DECODE if total == len(reqs) else ForwardMode.TARGET_VERIFY
        fb = build_forward_batch(mode, specs, self.cache.req_to_token,
                                 capture_layer_ids=self.worker.capture_layer_ids)
        with self._phase("target"):
            out = self.runner.forward(fb)
        with self._phase("ctx_update"):
            self.worker.on_target_forward(fb, out)
        assert out.logits is not None
        with self._phase("accept"):
            return (specs, *self._accept(reqs, drafts, out.logits))

    # ---- acceptance ---------------------------------------------------------------------------
    def _rows(self, req: Req, d: Draft) -> list[RowSpec]:
        """One RowSpec per verify row (anchor + each draft node), grammar walked along the path."""
        if d.parents is None:
            parents = list(range(-1, len(d) - 1))  # a chain: each draft's parent is the one before
        else:
            parents = d.parents
        rows = [RowSpec(req, [], req.grammar)]
        walks = [None if req.grammar is None else DraftWalk(req.grammar)]
        paths: list[list[int]] = [[]]
        for tok, p in zip(d.tokens, parents):
            parent_row = p + 1
            path = paths[parent_row] + [tok]
            parent = walks[parent_row]
            walk = None
            if parent is not None:
                walk = parent.branch()
                if not walk.advance(tok):
                    walk = None  # invalid path: row unused (the token cannot be accepted)
            walks.append(walk)
            paths.append(path)
            rows.append(RowSpec(req, path, None if walk is None else walk.grammar))
        return rows

    def _accept(self, reqs: list[Req], drafts: list[Draft], logits: torch.Tensor
                ) -> tuple[list[StepResult], list[list[int]]]:
        """Acceptance for every request (rules in ``verify.py``): the results, and per request
        the verify rows whose KV the commit keeps (anchor + accepted draft nodes)."""
        rows: list[RowSpec] = []
        for req, d in zip(reqs, drafts):
            rows.extend(self._rows(req, d))
        raw_logits = logits
        if needs_adjust(rows, logits.shape[-1], self.vocab_size):
            logits = logits.clone()
            adjust_logits_(logits, rows, self.eos_ids, self.vocab_size)
        rows_per_req = [1 + len(d) for d in drafts]
        offsets = [0]
        for n in rows_per_req:
            offsets.append(offsets[-1] + n)
        probs = None
        if any(not r.sampling_params.is_greedy for r in reqs):
            info = sampling_info(reqs).expand(rows_per_req)
            probs = smp.logits_to_probs(logits, info)  # [rows, V]
        greedy_tok = logits.argmax(dim=-1)  # [rows]
        want_lp = any(r.return_logprob for r in reqs)
        logp = smp.compute_logprobs(raw_logits) if want_lp else None
        chains = [i for i, (r, d) in enumerate(zip(reqs, drafts))
                  if d.parents is None and r.sampling_params.is_greedy]
        tokens: dict[int, list[int]] = dict(zip(
            chains, self._greedy_chains([drafts[i] for i in chains],
                                        [offsets[i] for i in chains], greedy_tok)))
        results: list[StepResult] = []
        kept_rows: list[list[int]] = []
        for i, (req, d) in enumerate(zip(reqs, drafts)):
            off, n = offsets[i], rows_per_req[i]
            sp = req.sampling_params
            if d.parents is not None:
                if sp.is_greedy:
                    tree = vfy.tree_greedy_verify(greedy_tok[off : off + n], d.tokens, d.parents)
                else:
                    assert probs is not None
                    tree = vfy.tree_rejection_verify(probs[off : off + n], d.tokens, d.parents,
                                                     req.generator)
                toks, path_rows = tree.output_ids, tree.verify_rows()
            else:
                if i in tokens:
                    toks = tokens[i]
                elif sp.seed is not None:
                    assert probs is not None
                    toks = vfy.coupled_verify(probs[off : off + n], d.tokens, sp.seed,
                                              len(req.output_ids))
                else:
                    assert probs is not None
                    q = d.probs if d.probs is not None else _one_hot(d.tokens, probs.shape[-1])
                    toks = vfy.rejection_verify(
                        [probs[off : off + n]], [q.to(device=probs.device, dtype=probs.dtype)],
                        [torch.tensor(d.tokens, dtype=torch.int64, device=probs.device)],
                        [req.generator])[0]
                path_rows = list(range(len(toks)))
            lps = None
            if req.return_logprob and logp is not None:
                lps = [_logprob_entry(logp[off + r], t, req.top_logprobs_num)
                       for r, t in zip(path_rows, toks)]
            results.append(StepResult(req, toks, lps, len(d), forced=d.forced))
            kept_rows.append(path_rows)
        return results, kept_rows

    @staticmethod
    def _greedy_chains(drafts: list[Draft], offsets: list[int], greedy_tok: torch.Tensor
                       ) -> list[list[int]]:
        """Greedy chain acceptance for several requests (``vfy.greedy_verify_rows``); request
        ``r``'s verify rows start at ``offsets[r]`` of ``greedy_tok [rows]``."""
        if not drafts:
            return []
        return vfy.greedy_verify_rows(greedy_tok.tolist(), [d.tokens for d in drafts], offsets)

    # ---- commit -------------------------------------------------------------------------------
    def _commit(self, reqs: list[Req], drafts: list[Draft], specs: list[BatchRequestSpec],
                results: list[StepResult], kept_rows: list[list[int]]) -> None:
        st = self.stats
        st.steps += 1
        st.req_steps += len(reqs)
        st.verify_tokens += sum(len(s.input_ids) for s in specs)
        st.last_lengths = [len(d) for d in drafts]
        dec = self.worker.last_decision
        st.last_expected_tau = dec.expected_tau if dec is not None else None
        for req, d, spec, res, keep_rows in zip(reqs, drafts, specs, results, kept_rows):
            # keep_rows: anchor row 0 + accepted draft rows (the last token is not in KV)
            loc, n_keep = spec.out_cache_loc, len(keep_rows)
            if keep_rows[-1] == n_keep - 1:  # rows 0..n_keep-1 (a chain): slices, no index
                keep = loc[:n_keep]
                if n_keep < loc.numel():
                    self.cache.free_slots(loc[n_keep:])
            else:
                keep = loc[torch.tensor(keep_rows, dtype=torch.int64)]
                drop_mask = torch.ones(loc.numel(), dtype=torch.bool)
                drop_mask[torch.tensor(keep_rows, dtype=torch.int64)] = False
                self.cache.free_slots(loc[drop_mask])
            self.cache.req_to_token_pool.write(req.req_pool_idx, req.kv_len, keep)
            req.kv_len += len(keep_rows)
            accepted = res.num_accepted
            if self.worker.name != "NONE":  # SGLang reports verify steps only with speculation
                req.spec_verify_ct += 1
            req.spec_accepted_drafts += accepted
            req.spec_draft_tokens += len(d)
            st.drafted += len(d)
            st.accepted += accepted
            st.emitted += len(res.tokens)
            if d.forced:
                st.forced_tokens += len(d)
            elif d.parents is None:  # the drafter's per-position acceptance
                st.record_position(len(d), accepted)
        self.worker.on_verified(results)


def _one_hot(tokens: list[int], vocab: int) -> torch.Tensor:
    q = torch.zeros((len(tokens), vocab))
    if tokens:
        q[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return q


def _logprob_entry(logp_row: torch.Tensor, tok: int, top_n: int) -> tuple[Any, Any]:
    lp = float(logp_row[tok])
    top = None
    if top_n:
        v, i = logp_row.topk(top_n)
        top = list(zip(v.tolist(), i.tolist()))
    return (lp, tok), top
