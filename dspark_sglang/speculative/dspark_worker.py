"""DSpark draft worker: block drafting over the shared draft context pool; how much is drafted
and verified per request is the algorithm's draft-length policy (``draft_length.py``: DSPARK's
prefix scheduler, CHAIN, MTP1, TREE). Trees are verified greedily, or with multi-draft rejection
sampling for sampled requests.

Draft context pool: per KV slot and draft layer, the K/V of ``H_ctx`` (the projected target hidden
states) — written for every token the target computes, so a slot in the radix tree always carries
valid draft context too. With the DSPARK draft budget, decode / verify-sized updates are queued
(``_pending``) while the budget is not drafting and applied in order, in calls of up to 64 rows,
before the pool is next read (``flush_context``: the next draft, or when the queue is full; a
prefill-sized update, which reads nothing, removes the queued rows of its own slots instead);
applied in the order they came, they leave the pool as writing each at once would.

A probe applies only its own requests' queued rows (the rest stay queued). Context holes
(``DSPARK_CONTEXT_HOLES``, on by default): while the budget is not drafting, a full queue is
dropped instead of applied; ``ctx_valid[slot]`` says whether a slot's context K/V are the
token's, and a draft reads only its request's valid slots (the positions of its block stay the
true ones). A request that drafts again later sees a gap of at most a queue's worth of its
tokens; output is unaffected (verification decides), and at high load, where drafting does not
pay, no context row is computed that no draft reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dspark_sglang.constrained.draft_walk import DraftWalk
from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput
from dspark_sglang.core.req import Req
from dspark_sglang.mem_cache.kv_pool import KVPool
from dspark_sglang.speculative.context import DraftContext, SpeculativeConfig
from dspark_sglang.speculative.draft_length import Tree, draft_length_policy
from dspark_sglang.speculative.dspark import DSparkDrafter, load_dspark_checkpoint
from dspark_sglang.speculative.dspark.config import dspark_num_draft_from_num_draft_tokens
from dspark_sglang.speculative.dspark.model import rope_cos_sin
from dspark_sglang.speculative.sps_profile import SPSTable
from dspark_sglang.speculative.worker import Draft, DraftWorker, StepResult
from dspark_sglang.utils.env import env_on

_EMPTY = torch.empty(0)
_NO_SLOTS = torch.empty(0, dtype=torch.long)
# queued context updates: (captured rows, positions, slots) per target forward, oldest first
_Rows = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# rows up to which the context update runs as one C++ call (the drafter's Q8 linears take
# at most this many rows; prefill-sized updates keep their float32 path)
KERNEL_ROWS = 64
# queued context-update rows after which the queue is applied even without a draft
MAX_PENDING_ROWS = 1024
# steps that start within SETTLE_S seconds after a prefill of >= SETTLE_MIN_ROWS tokens are not
# timed by the draft budget: after a large forward small ones run up to 2x slow for a few steps
# (session 13's Xeon: 5.5, 5.4, 4.3, 3.9, 3.3 ms, then 2.9 ms steady over ~25 ms)
SETTLE_S = 0.025
SETTLE_MIN_ROWS = 64
# weight of a request's acceptance EMA on its past (the rest on the last drafting step). A
# step's accepted count barely depends on the previous step's (session 16, 1,464 always-
# drafted steps of 24 training prompts at c=1: after 0 accepted, 40 / 37 / 24 % of next steps
# accepted 0 / 1 / 2+; after 2+, 28 / 29 / 44 %), so what pays is the long-run mean: replayed
# on that trace, an EMA weighting its past 0.6 drafted in too few steps (191-198 tok/s against
# 204 drafting always and 181 never); 0.9-0.95 came within 1 % of always
ACC_EMA_DECAY = 0.9
# DSPARK_DEFER_CONTEXT=0: every context update is applied at once (no queue)
DEFER_CONTEXT = env_on("DSPARK_DEFER_CONTEXT")
# DSPARK_CONTEXT_HOLES=0: queued context rows are always applied, never dropped
CONTEXT_HOLES = env_on("DSPARK_CONTEXT_HOLES")
# requests per call of the drafter's C++ block path (larger batches go in chunks)
BLOCK_SCRATCH_REQS = 64
# DSPARK_DRAFTER_STACK=0: the drafter's block forward stays on torch ops
BLOCK_STACK = env_on("DSPARK_DRAFTER_STACK")
# the drafter's weights next to a GGUF-block target (--speculative-draft-model-quantization)
DEFAULT_DRAFT_QTYPE = "Q8_0"

logger = logging.getLogger(__name__)

DEFAULT_DRAFTER_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters" / \
    "smollm2_135m"


@dataclass(frozen=True)
class BudgetState:
    """One request's draft-budget record (``DSparkWorker.budget_states[rid]``). Created at the
    request's first budgeted step, replaced rather than mutated (so a snapshot is a shallow copy
    of the dict), dropped by ``release``."""

    acc_ema: float  # EMA of drafts accepted per drafting step
    proposed: int = 0  # positions proposed last step (0: none, or replaced by jump-forward)
    last_accepted: float = 0.0  # drafts accepted last step (or their expectation, below)
    # greedy drafts: the expected number accepted from the calibrated confidences of the
    # verified positions (sum over k of c_1 ... c_k), learned together with the count
    expected: float | None = None


class DSparkWorker(DraftWorker):
    def __init__(self, drafter: DSparkDrafter, num_slots: int, req_to_token: torch.Tensor,
                 mode: str, sps_table: SPSTable | None, num_draft_tokens: int | None,
                 tree_topk: int, context_len: int, dtype: torch.dtype, device: str,
                 draft_budget: bool = True) -> None:
        cfg = drafter.config
        if any(i < 0 for i in cfg.target_layer_ids):
            raise ValueError("target_layer_ids < 0 (embedding output) are not supported")
        self.name = mode
        self.drafter = drafter
        self.gamma = cfg.block_size
        self.policy = draft_length_policy(mode, self.gamma, num_draft_tokens, sps_table,
                                          tree_topk)
        self.sps_table = sps_table  # also prices drafting for the draft budget
        self.context_len = context_len
        self.req_to_token = req_to_token
        self.capture_layer_ids = tuple(cfg.target_layer_ids)
        # past the target's slots: scratch slots for the drafted blocks' own K/V (the C++ block
        # path writes them there and reads them with the context through one slot table)
        self.scratch_reqs = BLOCK_SCRATCH_REQS
        self.ctx_pool = KVPool(cfg.num_hidden_layers, num_slots + self.gamma * self.scratch_reqs,
                               cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        self._scratch = torch.arange(num_slots + 1, num_slots + 1 + self.gamma * self.scratch_reqs,
                                     device=device)
        self._block_stack: Any = None  # C++ DecoderStack of the drafter's layers (see below)
        self._block_consts: dict[int, tuple[torch.Tensor, ...]] = {}  # per batch size
        self._ctx_plan: tuple[Any, ...] | None = None  # draft_context_update's weights; () none
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._block_stack_linears: list[Any] = []  # the merged Q8 linears it holds
        self.last_decision = None
        self.draft_budget = draft_budget and self.policy.budgeted
        self.min_probe_every = 16
        self.max_probe_every = 256
        self.probe_every = self.min_probe_every
        self._skipped_in_row = 0
        self._probing = False
        self.probe_requests = 4  # requests a probe drafts for
        self._probe_offset = 0
        self._acc_prior: float | None = None  # engine-wide EMA of accepted drafts per step
        self._draft_time: float | None = None  # EMA of seconds per propose call
        self._draft_calls = 0
        self._last_batch = 1
        # a whole decode step (sampling, scheduling, context update included) over the SPS
        # table's target forward at the same batch: what one saved step is worth, in the
        # table's units; measured between consecutive calls of steps that did not draft
        self._step_scale = 1.0
        # the previous call: (time at entry, batch, "plain" | "draft" | "partial", the model's
        # step cost in forwards, mean depth); "draft" = the whole batch drafted
        self._last_call: tuple[float, int, str, float, float] | None = None
        self._step_model: tuple[float, float] | None = None  # this step's (model cost, depth)
        # measured whole drafting steps: (EMA of their time in forwards at that batch, batch,
        # mean depth), set by _measure_step; None until one was measured
        self._draft_step: tuple[float, int, float] | None = None
        self.budget_states: dict[str, BudgetState] = {}  # rid -> record; DSPARK budget only
        # queued context updates (aux rows, positions, slots), oldest first; rows queued; the
        # seconds the last flush took (not counted as drafting by the budget's timers). The
        # queue is mutated in place, so a step's snapshot / restore keeps it as it is: applying
        # a cancelled step's rows is harmless (their slots are free, and a later owner's rows
        # come after them)
        self._pending: _Rows = []
        self._pending_rows = 0
        self._flush_s = 0.0
        self.defer_context = DEFER_CONTEXT
        # per context-pool slot: its K/V are the context of the token there (False: a dropped
        # queued row, a hole the drafter does not read); context rows dropped so far
        self.context_holes = CONTEXT_HOLES
        self.ctx_valid = torch.ones(self.ctx_pool.k_bufs[0].shape[0], dtype=torch.bool)
        self.dropped_rows = 0
        # when the last prefill of >= SETTLE_MIN_ROWS tokens ended: the decode steps right after
        # a large forward run slow for a few steps (caches, clocks; sps_profile.profile_sps), so
        # steps starting within SETTLE_S of it are not timed for the budget
        self._prefill_end = float("-inf")

    def max_draft_len(self) -> int:
        return self.policy.max_draft_len()

    # ---- context pool ------------------------------------------------------------------------
    @torch.inference_mode()
    def on_target_forward(self, fb: ForwardBatch, out: ModelOutput) -> None:
        assert out.aux_hidden is not None, "target forward must capture target_layer_ids"
        aux = out.aux_hidden
        if fb.mode == ForwardMode.EXTEND and aux.shape[0] >= SETTLE_MIN_ROWS:
            import time

            self._prefill_end = time.perf_counter()
        if (self.draft_budget and self.defer_context and self._kernel_update_ok(aux)
                and self._context_plan() is not None):
            # queued until the pool is read (the next draft) or the queue is full
            self._pending.append((aux, fb.positions.clone(), fb.out_cache_loc.clone()))
            self._pending_rows += int(aux.shape[0])
            if self._pending_rows > MAX_PENDING_ROWS:
                # no draft read these rows for a queue's worth of tokens: drop them (holes)
                if self.context_holes:
                    self._drop_pending()
                else:
                    self.flush_context()
            return
        # (a write reads nothing from the pool: the queue stays, less its rows for these slots,
        # which this write would overwrite anyway)
        self._discard_pending(fb.out_cache_loc)
        self._apply_update(aux, fb.positions, fb.out_cache_loc)

    def _discard_pending(self, slots: torch.Tensor) -> None:
        """Remove the queued rows that name one of ``slots`` (about to be written): the pool
        ends as if every row had been applied in order, this write last."""
        if not self._pending:
            return
        self._set_pending(self._split_rows(self._pending, slots.cpu())[1])

    def _set_pending(self, rows: _Rows) -> None:
        self._pending[:] = rows  # (in place: a step's snapshot holds the same list)
        self._pending_rows = sum(int(a.shape[0]) for a, _, _ in rows)

    def _apply_update(self, aux: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor) -> None:
        if self.dropped_rows:  # (until a row is dropped every slot is valid)
            self.ctx_valid[slots.cpu()] = True
        if self._kernel_update_ok(aux) and self._context_plan() is not None:
            self._kernel_update(aux, positions, slots)
        else:
            self._update_context(aux, positions, slots)

    def _kernel_update_ok(self, aux: torch.Tensor) -> bool:
        return (getattr(self.drafter, "kv_blocks", None) is not None
                and self.ctx_pool.dtype == torch.float32 and aux.is_cpu
                and aux.shape[0] <= KERNEL_ROWS)

    def _kernel_update(self, aux: torch.Tensor, positions: torch.Tensor,
                       slots: torch.Tensor) -> None:
        """Decode / verify sizes: the whole update in one C++ call (``_update_context``'s fast
        path: same kernels, same order)."""
        plan = self._context_plan()
        assert plan is not None
        cos, sin = self._rope_tables(positions)
        self.drafter.kv_blocks[0].draft_context_update(
            aux.float(), *plan, self.ctx_pool.k_bufs, self.ctx_pool.v_bufs, cos, sin, slots,
            self.drafter.layers[0].self_attn.num_kv_heads)

    def flush_context(self, keep: torch.Tensor | None = None) -> None:
        """Apply the queued context updates, oldest first, in calls of up to ``KERNEL_ROWS``
        rows (each row's result does not depend on the rows next to it in a call). Whatever
        reads the context pool calls this first. ``keep`` (a set of slots, or None: all): only
        the rows naming one of them are applied (a probe reads only its own requests' slots);
        the others stay queued, in order. No applied row and no queued one name the same slot,
        so applying the rest later leaves the pool as applying everything in order."""
        if not self._pending:
            return
        import time

        t0 = time.perf_counter()
        pending, stay = ((self._pending[:], []) if keep is None
                         else self._split_rows(self._pending, keep))
        self._set_pending(stay)
        chunk: _Rows = []
        rows = 0
        for item in [*pending, None]:
            if item is None or rows + int(item[0].shape[0]) > KERNEL_ROWS:
                if chunk:
                    self._apply_update(*(torch.cat([c[j] for c in chunk]) if len(chunk) > 1
                                         else chunk[0][j] for j in range(3)))
                chunk, rows = [], 0
            if item is not None:
                chunk.append(item)
                rows += int(item[0].shape[0])
        self._flush_s += time.perf_counter() - t0

    @staticmethod
    def _split_rows(pending: _Rows, keep: torch.Tensor) -> tuple[_Rows, _Rows]:
        """The queued rows naming one of ``keep``'s slots, and the others, each in order."""
        hit: _Rows = []
        rest: _Rows = []
        for aux, positions, slots in pending:
            mask = torch.isin(slots.cpu(), keep)
            for out, m in ((hit, mask), (rest, ~mask)):
                if bool(m.all()):
                    out.append((aux, positions, slots))
                elif bool(m.any()):
                    out.append((aux[m], positions[m], slots[m]))
        return hit, rest

    def _drop_pending(self) -> None:
        """Context holes: forget the queued rows; their slots become invalid (a later write
        makes a slot valid again)."""
        for _, _, slots in self._pending:
            self.ctx_valid[slots.cpu()] = False
            self.dropped_rows += int(slots.shape[0])
        self._set_pending([])

    def _update_context(self, aux: torch.Tensor, positions: torch.Tensor,
                        slots: torch.Tensor) -> None:
        fused = getattr(self.drafter, "kv_blocks", None)
        h_ctx = self.drafter.project_context(aux)  # [n, H]
        if fused is not None and self.ctx_pool.dtype == torch.float32 and h_ctx.is_cpu:
            # one Q8 kernel call for k and v, then norm + rotary + store in C++ (drafts only)
            ops, kv_blocks = fused
            cos, sin = self._rope_tables(positions)
            for layer_id, (layer, lin) in enumerate(zip(self.drafter.layers, kv_blocks)):
                att = layer.self_attn
                kn = att.k_norm
                w = kn.weight if kn is not None else _EMPTY
                ops.qkv_rope_store(lin(h_ctx.float()).contiguous(), cos, sin, w, w,
                                   kn.eps if kn is not None else 0.0,
                                   self.ctx_pool.k_bufs[layer_id], self.ctx_pool.v_bufs[layer_id],
                                   slots, 0, att.num_kv_heads)
            return
        for layer_id, (k, v) in enumerate(self.drafter.context_kv(h_ctx, positions)):
            self.ctx_pool.store(layer_id, slots, k, v)

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope_cos_sin(positions, inv_freq, float32)`` read from a table made once (the
        same elementwise values)."""
        table = self._rope_table
        if table is None or int(positions.max()) >= table[0].shape[0]:
            n = max(8192, 2 * int(positions.max()) + 1)
            table = rope_cos_sin(torch.arange(n), self.drafter.inv_freq, torch.float32)
            self._rope_table = table
        return table[0][positions], table[1][positions]

    def _context_plan(self) -> tuple[Any, ...] | None:
        """The Q8 weights of ``draft_context_update`` (fc, hidden norm, each layer's stacked
        k/v and k norm), or None when the drafter's fc is not one Q8-kernel block matrix."""
        if self._ctx_plan is not None:
            return self._ctx_plan or None
        from dspark_sglang.layers.quantized_linear import GGUFLinear

        fused = getattr(self.drafter, "kv_blocks", None)
        fc = self.drafter.fc
        self._ctx_plan = ()
        if fused is None or not isinstance(fc, GGUFLinear) or not fc.all_parts_q8():
            return None
        (kernel, w_fc, t_fc, _), = fc.plan()
        kv_w, kv_t, norms = [], [], []
        for layer, lin in zip(self.drafter.layers, fused[1]):
            (_, w, t, _), = lin.plan()
            kn = layer.self_attn.k_norm
            kv_w.append(w)
            kv_t.append(t)
            norms.append(kn.weight.detach() if kn is not None else _EMPTY)
        kn0 = self.drafter.layers[0].self_attn.k_norm
        hn = self.drafter.hidden_norm
        self._ctx_plan = (w_fc, t_fc, hn.weight.detach(), hn.eps, kv_w, kv_t, norms,
                          kn0.eps if kn0 is not None else 0.0)
        return self._ctx_plan

    # ---- per-request state -------------------------------------------------------------------
    def on_verified(self, results: list[StepResult]) -> None:
        if not self.draft_budget:
            return
        for res in results:
            st = self.budget_states.get(res.req.rid)
            if st is None or (st.proposed == 0 and st.last_accepted == res.num_accepted):
                continue  # (no draft: the record would not change)
            # forced tokens replaced the proposal: nothing to learn. A greedy draft teaches the
            # mean of its count and its expected acceptance (the same mean when the confidences
            # are calibrated, half the noise of the 0 / 1 / 2 ... of one step, so one unlucky
            # step does not stop a request that pays from drafting; the count keeps a
            # miscalibrated head honest: measured here per set over whole blocks, expectation
            # over count 0.71 to 1.36)
            acc = float(res.num_accepted)
            if st.expected is not None and not res.forced and res.num_drafted > 0:
                acc = 0.5 * (acc + st.expected)
            self.budget_states[res.req.rid] = replace(
                st, proposed=0 if res.forced else st.proposed, last_accepted=acc,
                expected=None)

    def release(self, req: Req) -> None:
        self.budget_states.pop(req.rid, None)

    def snapshot(self) -> dict[str, Any]:
        return {"attrs": super().snapshot(), "budget_states": dict(self.budget_states)}

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot["attrs"])  # rebinds the same dict object; refill it
        self.budget_states.clear()
        self.budget_states.update(snapshot["budget_states"])

    # ---- draft budget (DSPARK only) ---------------------------------------------------------
    def _draft_budget(self, reqs: list[Req], rooms: list[int]) -> list[int]:
        """How many positions to draft per request this step, from *past* steps only.

        The prefix scheduler decides what is verified; this only avoids paying for draft
        positions it would not admit. Per request an EMA of accepted drafts per step sets the
        depth (accepted + 2); a new request starts from the engine-wide EMA (the block size
        before anything was measured). Drafting is skipped for the whole batch when the expected
        accepted tokens per request (mean of EMAs: target steps saved) are worth less than the
        drafter's measured cost in batch target steps (a saved step counts as a whole step:
        ``_step_scale``); once whole drafting steps were timed at about this batch and depth
        (``_draft_step``), drafting is taken iff such a step, yielding 1 + accepted tokens per
        request, costs less per token than a plain step. The EMA weighs its past
        ``ACC_EMA_DECAY``: the mean acceptance decides, not the last step's luck. After
        ``probe_every`` skipped steps ``probe_requests`` of the batch (rotating) draft once to
        refresh the estimates (only whole-batch drafting updates the drafter's measured cost);
        a probe that does not pay doubles the interval (up to ``max_probe_every``), drafting
        that pays resets it. Depends on no token of the current step, so verification stays
        lossless.
        """
        if not self.draft_budget:
            return rooms
        emas = []
        states = self.budget_states
        for r in reqs:
            st = states.get(r.rid)
            if st is None:
                ema = float(self.gamma) if self._acc_prior is None else self._acc_prior
            else:
                ema = st.acc_ema
                if st.proposed == 0:  # no draft last step: the record stays as it is
                    emas.append(ema)
                    continue
                acc = st.last_accepted  # drafted last step (verified or not)
                ema = ACC_EMA_DECAY * ema + (1 - ACC_EMA_DECAY) * acc
                self._acc_prior = (float(acc) if self._acc_prior is None
                                   else 0.9 * self._acc_prior + 0.1 * acc)
            states[r.rid] = BudgetState(acc_ema=ema)
            emas.append(ema)
        # a batch step yields one token per request; drafting pays when the expected accepted
        # drafts per request (mean EMA, in steps saved) exceed what it costs in batch steps:
        # the draft itself, and verifying the drafted positions instead of one token each.
        # Once whole drafting steps were timed at this batch and depth, their measured cost
        # decides instead (a step yielding 1 + accepted tokens against a plain step's 1)
        depth = sum(min(room, int(ema) + 2) for ema, room in zip(emas, rooms)) / len(emas)
        acc = sum(emas) / len(emas)
        model_cost = (self._step_scale + self._draft_cost_in_steps()
                      + self._verify_cost_in_steps(len(reqs), depth))
        measured = self._measured_draft_step(len(reqs), depth)
        if measured is not None:
            worth = self._step_scale * (1 + acc) >= measured
        else:
            worth = self._step_scale * (1 + acc) >= model_cost
        self._step_model = (model_cost, depth)
        if self._probing:  # this step sees the probe's outcome
            self._probing = False
            self.probe_every = (self.min_probe_every if worth
                                else min(2 * self.probe_every, self.max_probe_every))
        elif worth:
            self.probe_every = self.min_probe_every
        if not worth:
            self._skipped_in_row += 1
            if self._skipped_in_row < self.probe_every:
                return [0] * len(reqs)
            self._probing = True
        self._skipped_in_row = 0
        depths = [min(room, max(1, int(ema) + 2)) for ema, room in zip(emas, rooms)]
        if self._probing and len(reqs) > self.probe_requests:
            # a probe refreshes the estimates on a few requests (rotating), not the whole
            # batch: at high load a full-batch probe costs a large draft and verify step
            start = self._probe_offset % len(reqs)
            self._probe_offset += self.probe_requests
            chosen = {(start + j) % len(reqs) for j in range(self.probe_requests)}
            depths = [d if i in chosen else 0 for i, d in enumerate(depths)]
        return depths

    def _verify_cost_in_steps(self, batch: int, depth: float) -> float:
        """Extra batch steps of verifying ``depth`` drafted positions per request (the SPS
        table's step time at ``batch * (1 + depth)`` tokens over that at ``batch``), an upper
        bound: the prefix scheduler may verify fewer."""
        if self.sps_table is None or depth <= 0:
            return 0.0
        b = max(1, batch)
        return max(0.0, self.sps_table.sps(b) / self.sps_table.sps(round(b * (1 + depth))) - 1)

    def _measured_draft_step(self, batch: int, depth: float) -> float | None:
        """The measured time of a whole drafting step in target forwards, when one was measured
        at about this batch (within 25 %) and mean depth (within one position), else None."""
        m = self._draft_step
        if m is None or abs(m[1] - batch) > max(1, 0.25 * batch) or abs(m[2] - depth) > 1:
            return None
        return m[0]

    def _measure_step(self, batch: int, now: float | None = None) -> None:
        """Time the previous step: the time since the previous call, when that call ran the same
        batch, over the SPS table's forward at that batch. A step that did not draft updates
        ``_step_scale``; one where the whole batch drafted updates ``_draft_step`` (a partial
        probe neither). Gaps over 3 plain steps or 2x the model's drafting step (idle, a
        prefill in between) are not steps."""
        import time

        prev, self._last_call = self._last_call, None
        if prev is None or prev[1] != batch or self.sps_table is None:
            return
        t, _, kind, model_cost, depth = prev
        if t < self._prefill_end + SETTLE_S:  # (a step right after a large prefill)
            return
        now = time.perf_counter() if now is None else now
        # (the previous call's catch-up on queued context updates is not counted)
        ratio = (now - t - self._flush_s) * self.sps_table.sps(batch)
        if kind == "plain" and 0.0 < ratio < 3.0:
            self._step_scale = 0.9 * self._step_scale + 0.1 * max(1.0, ratio)
        elif kind == "draft" and 0.0 < ratio < 2.0 * model_cost:
            old = self._draft_step
            if self._measured_draft_step(batch, depth) is None or old is None:
                self._draft_step = (ratio, batch, depth)
            else:
                self._draft_step = (0.8 * old[0] + 0.2 * ratio, batch, 0.8 * old[2] + 0.2 * depth)

    def _draft_cost_in_steps(self) -> float:
        if self.sps_table is None or self._draft_time is None:
            return 0.0
        return self._draft_time * self.sps_table.sps(max(1, self._last_batch))

    # ---- drafting ----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[Req]) -> list[Draft]:
        import time

        bs = len(reqs)
        self._last_batch = bs
        t0 = time.perf_counter()
        self._measure_step(bs, t0)
        self._flush_s = 0.0  # (from here: catch-up seconds of this call and its step)
        self._step_model = None
        rooms = self._draft_budget(reqs, [r.draft_room(self.context_len) for r in reqs])
        if max(rooms) == 0:
            self._last_call = (t0, bs, "plain", 0.0, 0.0)
            return [Draft() for _ in reqs]
        if self._step_model is not None:  # (budgeted) time this step for _draft_step
            self._last_call = (t0, bs, "draft" if min(rooms) > 0 else "partial",
                               *self._step_model)
        # the pool is read below: queued updates first (a probe's requests' rows only: the
        # other requests' rows stay queued)
        drafting = [r for r, room in zip(reqs, rooms) if room > 0]
        self.flush_context(keep=self._slots_of(drafting) if len(drafting) < len(reqs) else None)
        if min(rooms) > 0:
            drafts = self._propose(reqs, rooms)
        else:  # draft only for the requests that get a draft (a probe's few)
            idx = [i for i, room in enumerate(rooms) if room > 0]
            sub = self._propose([reqs[i] for i in idx], [rooms[i] for i in idx])
            drafts = [Draft() for _ in reqs]
            for i, d in zip(idx, sub):
                drafts[i] = d
        # catching up on queued context updates is not drafting: the queue's rows would have
        # been written step by step without the budget
        dt = time.perf_counter() - t0 - self._flush_s
        # the engine's first draft pays one-time costs (first touch, lazy tables) and is not
        # priced: priced as it was, it kept the budget from drafting for hundreds of steps.
        # Later calls: whole-batch drafting only, one slow call (a page fault, another
        # process) moving the estimate at most to 3x
        self._draft_calls += 1
        if self._draft_calls > 1:
            if self._draft_time is None:
                self._draft_time = dt
            elif min(rooms) > 0:
                self._draft_time = 0.8 * self._draft_time + 0.2 * min(dt, 3 * self._draft_time)
        return drafts

    def _slots_of(self, reqs: list[Req]) -> torch.Tensor:
        """The KV slots of these requests' tokens (CPU int64)."""
        if not reqs:
            return _NO_SLOTS
        return torch.cat([self.req_to_token[r.req_pool_idx, :r.kv_len] for r in reqs]).cpu()

    def _context_table(self, slots: torch.Tensor, lens: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``slots [bs, L]`` (row i's context in ``[0, lens[i])``) with each row's holes
        (``ctx_valid`` False) left out, its valid slots first, and their counts; or
        ``(slots, None)`` when no row has a hole."""
        if not self.dropped_rows:  # no row was ever dropped: no slot is a hole (~0.1 ms)
            return slots, None
        in_ctx = torch.arange(slots.shape[1])[None, :] < lens.cpu()[:, None]
        ok = self.ctx_valid[slots.cpu()] | ~in_ctx
        if bool(ok.all()):
            return slots, None
        valid = ok & in_ctx
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        return torch.gather(slots, 1, order.to(slots.device)), valid.sum(dim=1).to(slots.device)

    def _propose(self, reqs: list[Req], rooms: list[int]) -> list[Draft]:
        bs = len(reqs)
        dev = self.ctx_pool.k_bufs[0].device  # the drafter's device: every input goes there
        lens = torch.tensor([r.kv_len for r in reqs])
        max_len = int(lens.max())
        rows = torch.tensor([r.req_pool_idx for r in reqs])
        slots = self.req_to_token[rows.to(self.req_to_token.device), :max_len].to(dev)  # [bs, L]
        lens = lens.to(dev)
        anchors = torch.tensor([r.output_ids[-1] for r in reqs], device=dev)
        stack = self.block_stack()
        if stack is not None:  # (reads each row's slots below its length only)
            table, counts = self._context_table(slots, lens)
            hidden = torch.cat([
                self._forward_block_stack(stack, anchors[i:i + self.scratch_reqs],
                                          lens[i:i + self.scratch_reqs],
                                          table[i:i + self.scratch_reqs],
                                          None if counts is None
                                          else counts[i:i + self.scratch_reqs])
                for i in range(0, bs, self.scratch_reqs)])
        else:
            valid = torch.arange(max_len, device=dev)[None, :] < lens[:, None]
            valid &= self.ctx_valid[slots.cpu()].to(dev)
            slots = torch.where(valid, slots, torch.zeros_like(slots))
            ctx_k = [self.ctx_pool.k_bufs[i][slots] for i in range(self.ctx_pool.num_layers)]
            ctx_v = [self.ctx_pool.v_bufs[i][slots] for i in range(self.ctx_pool.num_layers)]
            hidden = self.drafter.forward_block(anchors, lens, ctx_k, ctx_v, valid)  # [bs, g, H]
        temps = torch.tensor([0.0 if r.sampling_params.is_greedy
                              else float(r.sampling_params.temperature) for r in reqs],
                             device=dev)
        if self.policy.tree:
            base = self.drafter.base_logits(hidden)  # [bs, g, V]
            return self._propose_tree(reqs, hidden, base, anchors, temps, rooms)
        k = min(self.policy.num_draft, max(rooms))
        hidden = hidden[:, :k]  # only the positions we draft need the LM head
        vocab = self.drafter.draft_vocab
        grammar_walk = _GrammarWalk(reqs, self.drafter.config.vocab_size,
                                    None if vocab is None else vocab.token_ids)
        base = self.drafter.base_logits(hidden, in_map=True)  # [bs, k, V or len(map)]
        coupling = [(r.sampling_params.seed, len(r.output_ids))
                    if r.sampling_params.seed is not None else None for r in reqs]
        chain = self.drafter.sample_chain(
            hidden, base, anchors, temps, [r.generator for r in reqs],
            mask_fn=grammar_walk if grammar_walk.active else None, num_tokens=k,
            coupling=coupling)
        limits = [min(k, rooms[i], grammar_walk.valid_len(i, k)) for i in range(bs)]
        lengths, decision = self.policy.verify_lengths(chain.confidences, limits)
        if decision is not None:
            self.last_decision = decision
        if self.draft_budget:
            expected = _expected_accepted(chain.confidences, lengths)
            for i, (r, limit) in enumerate(zip(reqs, limits)):
                self.budget_states[r.rid] = replace(
                    self.budget_states[r.rid], proposed=limit,
                    expected=expected[i] if r.sampling_params.is_greedy else None)
        toks = chain.tokens.tolist()
        out = []
        for i in range(bs):
            n = lengths[i]
            sampled = not reqs[i].sampling_params.is_greedy
            out.append(Draft(tokens=toks[i][:n],
                             probs=chain.probs[i, :n] if sampled and n else None,
                             confidences=chain.confidences[i, :n].tolist()))
        return out

    def prepare(self) -> None:
        """Build now what drafting would build on first use (the C++ block stack, the context
        update's plan, the Q8 weight layouts): one-time costs at engine start, not in the
        first request's steps (nor in the measured draft time the budget prices)."""
        self.block_stack()
        self._context_plan()
        vocab = self.drafter.draft_vocab
        for lin in (getattr(vocab, "head_blocks", None), getattr(vocab, "markov_blocks", None),
                    self.drafter.fc):
            if hasattr(lin, "plan"):
                lin.plan()

    def block_stack(self) -> Any:
        """The drafter's layers as one C++ ``DecoderStack`` (the target's, dspark_kernels/csrc/
        decoder_stack.h) over the context pool, when the drafter runs on Q8 blocks next to a
        GGUF target (``drafter.kv_blocks``) with a float32 CPU pool and no biases; else None.
        A block's rows attend to the request's context slots and to each other (a custom mask
        of ones), with the block's own K/V in scratch slots: one call instead of ~40 torch ops
        per layer. Built on first use."""
        if self._block_stack is not None:
            return self._block_stack
        fused = getattr(self.drafter, "kv_blocks", None)
        if (fused is None or self.ctx_pool.dtype != torch.float32
                or not self.ctx_pool.k_bufs[0].is_cpu or not BLOCK_STACK):
            return None
        from gguf import GGMLQuantizationType

        from dspark_sglang.layers.quantized_linear import GGUFLinear, q8_linear_of

        ops = fused[0]
        # the format _quantize_drafter chose (its per-step k/v blocks carry it)
        qtype = GGMLQuantizationType(fused[1][0].parts[0].ggml_type).name
        stack = ops.DecoderStack()
        lins = []
        for i, layer in enumerate(self.drafter.layers):
            att, mlp = layer.self_attn, layer.mlp
            if any(m.bias is not None for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj)):
                return None
            qkv = q8_linear_of(torch.cat([att.q_proj.weight, att.k_proj.weight,
                                          att.v_proj.weight]), ops, qtype=qtype)
            gu = q8_linear_of(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), ops,
                              qtype=qtype)
            o = att.o_proj if isinstance(att.o_proj, GGUFLinear) else q8_linear_of(
                att.o_proj.weight, ops, qtype=qtype)
            down = mlp.down_proj if isinstance(mlp.down_proj, GGUFLinear) else q8_linear_of(
                mlp.down_proj.weight, ops, qtype=qtype)
            (_, w_qkv, t_qkv, _), = qkv.plan()
            (_, w_o, t_o, _), = o.plan()
            (_, w_gu, t_gu, _), = gu.plan()
            (_, w_d, t_d, _), = down.plan()
            qn, kn = att.q_norm, att.k_norm
            stack.add_layer(
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(), layer.input_layernorm.eps,
                qn.weight.detach() if qn is not None else _EMPTY,
                kn.weight.detach() if kn is not None else _EMPTY,
                qn.eps if qn is not None else 0.0, w_qkv, t_qkv, _EMPTY, w_o, t_o, w_gu, t_gu,
                w_d, t_d, att.num_heads, att.num_kv_heads, att.head_dim ** -0.5,
                self.ctx_pool.k_bufs[i], self.ctx_pool.v_bufs[i])
            lins += [qkv, o, gu, down]
        self._block_stack_linears = lins
        self._block_ones = torch.ones(self.gamma * self.gamma, dtype=torch.uint8)
        self._block_stack = stack
        return stack

    def _forward_block_stack(self, stack: Any, anchors: torch.Tensor, lens: torch.Tensor,
                             slots: torch.Tensor, counts: torch.Tensor | None = None
                             ) -> torch.Tensor:
        """``forward_block`` on the C++ stack: ``anchors``, ``lens`` [bs], ``slots`` [bs, L]
        (each row's context slots, then anything) -> final-normed block hidden [bs, g, H].
        ``counts``: row i reads only its first ``counts[i]`` slots (its context with the holes
        left out, ``_context_table``); the block keeps the positions after ``lens``."""
        d, g = self.drafter, self.gamma
        bs = int(anchors.shape[0])
        consts = self._block_consts.get(bs)
        if consts is None:  # per batch size: the tensors that do not depend on the step
            ar = torch.arange(bs)
            ids = torch.full((bs, g), d.config.mask_token_id, dtype=torch.long)
            consts = (torch.arange(g), ar, torch.full((bs,), g, dtype=torch.long), ar * g,
                      torch.zeros(bs, dtype=torch.long), ids)
            self._block_consts[bs] = consts
        offs, ar, g_lens, q_start, no_mask, ids = consts
        ids = ids.clone()
        ids[:, 0] = anchors  # block_input_ids: [anchor, mask, ..., mask]
        x = d.embed_tokens(ids).reshape(bs * g, -1).float().contiguous()
        lens = lens.long()
        at = lens[:, None] + offs
        cos, sin = self._rope_tables(at.reshape(-1))  # rope_cos_sin's values, from the table
        scratch = self._scratch[: bs * g].view(bs, g)
        table = torch.cat([slots, scratch], dim=1)
        n_ctx = lens if counts is None else counts.long()
        table.scatter_(1, n_ctx[:, None] + offs, scratch)
        out = stack.forward(x, cos, sin, scratch.reshape(-1), table, ar, n_ctx + g, g_lens,
                            q_start, self._block_ones, no_mask, [])[0]
        return d.norm(out).view(bs, g, -1)

    def _propose_tree(self, reqs: list[Req], hidden: torch.Tensor, base: torch.Tensor,
                      anchors: torch.Tensor, temps: torch.Tensor, rooms: list[int]
                      ) -> list[Draft]:
        from dspark_sglang.speculative.tree import build_topk_tree

        policy = self.policy
        assert isinstance(policy, Tree)
        # per-position distributions along the drafter's greedy chain (Markov bias included)
        chain = self.drafter.sample_chain(hidden, base, anchors, torch.zeros_like(temps),
                                          num_tokens=self.gamma)
        logits = base.float().clone()
        if self.drafter.markov_head is not None:
            prev = torch.cat([anchors[:, None], chain.tokens[:, :-1]], dim=1)
            logits = logits + self.drafter.markov_head.block_bias(prev, hidden).float()
        out = []
        for i, req in enumerate(reqs):
            depth = min(self.gamma, rooms[i])
            if depth == 0 or req.grammar is not None:
                n = min(policy.num_draft, rooms[i]) if req.grammar is None else 0
                out.append(Draft(tokens=chain.tokens[i, :n].tolist()))
                continue
            lp = torch.log_softmax(logits[i, :depth], dim=-1)
            tree = build_topk_tree(lp, policy.topk, policy.num_nodes)
            out.append(Draft(tokens=tree.tokens.tolist(), parents=tree.parents.tolist()))
        return out


def _expected_accepted(confidences: torch.Tensor, lengths: list[int]) -> list[float]:
    """Per row, the expected number of accepted drafts among the first ``lengths[i]`` verified:
    sum over k of c_1 ... c_k (``confidences [bs, k]``: each position's calibrated probability
    of acceptance given the ones before it were accepted)."""
    if confidences.numel() == 0:
        return [0.0] * len(lengths)
    cum = torch.cumprod(confidences.double().clamp(0.0, 1.0), dim=1).tolist()
    return [float(sum(row[:n])) for row, n in zip(cum, lengths)]


class _GrammarWalk:
    """``mask_fn`` for ``sample_chain``: walks each request's grammar along the chain
    (``DraftWalk``) and returns the additive mask for the next position. A request whose walk
    terminated or met a refused token stops being drafted there (``valid_len``), and so does one
    whose grammar allows no token at all (a dead end) or none of the token map (``token_ids``;
    the drafter cannot propose any)."""

    def __init__(self, reqs: list[Req], vocab: int,
                 token_ids: torch.Tensor | None = None) -> None:
        self.reqs = reqs
        self.vocab = vocab
        self.token_ids = None if token_ids is None else token_ids.cpu()
        self.active = any(r.grammar is not None for r in reqs)
        self.walks = [DraftWalk(r.grammar) if r.grammar is not None else None for r in reqs]
        self.stop_at: dict[int, int] = {}

    def __call__(self, k: int, prev: torch.Tensor) -> torch.Tensor | None:
        from dspark_sglang.constrained.base import allocate_bitmask, bitmask_to_bool

        rows = [i for i, w in enumerate(self.walks) if w is not None]
        if not rows:
            return None
        mask = torch.zeros((len(self.reqs), self.vocab))
        bitmask = allocate_bitmask(len(rows), self.vocab)
        prev_l = prev.tolist()
        for j, i in enumerate(rows):
            walk = self.walks[i]
            assert walk is not None
            ok = walk.advance(prev_l[i]) if k > 0 else True
            if not ok or walk.grammar.is_terminated():
                self.stop_at.setdefault(i, k)
                bitmask[j].fill_(-1)  # anything: the draft is cut at this position
                continue
            walk.grammar.fill_bitmask(bitmask, j)
        allowed = bitmask_to_bool(bitmask, self.vocab)  # [rows, V]
        reach = allowed if self.token_ids is None else allowed[:, self.token_ids]
        for j in (~reach.any(dim=-1)).nonzero().flatten().tolist():  # dead end / off the map
            self.stop_at.setdefault(rows[j], k)
            allowed[j] = True  # anything: the draft is cut at this position
        sub = torch.zeros((len(rows), self.vocab))
        sub[~allowed] = float("-inf")
        mask[torch.tensor(rows)] = sub
        return mask

    def valid_len(self, i: int, k: int) -> int:
        return self.stop_at.get(i, k)


def create_dspark_worker(ctx: DraftContext, cfg: SpeculativeConfig) -> DSparkWorker:
    """DSPARK, MTP1, CHAIN or TREE (``cfg.algorithm``) over the drafter at
    ``cfg.draft_model_path`` (the shipped drafter for the default model)."""
    from dspark_sglang.speculative.sps_runtime import load_or_profile_sps

    path = cfg.draft_model_path
    if path is None:
        if not ctx.is_default_model:
            raise ValueError("speculative_draft_model_path is required for "
                             f"{cfg.algorithm} with a non-default model")
        path = str(DEFAULT_DRAFTER_DIR)
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"speculative_draft_model_path {path!r} has no DSpark config.json")
    runner = ctx.runner
    model = runner.model
    drafter = load_dspark_checkpoint(path, model.embed_tokens, model.lm_head,
                                     sts_path=cfg.dspark_confidence_sts_path,
                                     device=runner.device, dtype=runner.dtype)
    drafter.eval().requires_grad_(False)
    if runner.quantization == "gguf" and cfg.draft_model_quantization != "none":
        _quantize_drafter(drafter, (cfg.draft_model_quantization or DEFAULT_DRAFT_QTYPE).upper())
    if drafter.config.vocab_size != ctx.config.vocab_size:
        raise ValueError("drafter vocab_size does not match the target model")
    _install_token_map(drafter, path, cfg)
    block = cfg.dspark_block_size
    if block is not None and block != drafter.config.block_size:
        raise ValueError(f"speculative_dspark_block_size={block} but the drafter was trained "
                         f"with block_size={drafter.config.block_size}")
    sps = None
    num_draft_tokens = cfg.num_draft_tokens
    if cfg.algorithm == "DSPARK":
        sps = load_or_profile_sps(cfg.dspark_sps_table_path, ctx.model_path, runner, ctx.cache)
        # upstream meaning: the verify window gamma + 1 (dspark/config.py)
        num_draft_tokens = dspark_num_draft_from_num_draft_tokens(num_draft_tokens,
                                                                  drafter.config.block_size)
    worker = DSparkWorker(drafter, ctx.num_slots, ctx.cache.req_to_token, cfg.algorithm, sps,
                          num_draft_tokens, cfg.eagle_topk, ctx.context_len, runner.dtype,
                          runner.device, draft_budget=not cfg.dspark_disable_draft_budget)
    worker.prepare()
    return worker


def _quantize_drafter(drafter: DSparkDrafter, qtype: str = "Q8_0") -> None:
    """Next to a target on GGUF blocks, the drafter's layers and context projection run on GGUF
    blocks of ``qtype`` (Q8_0, Q4_0, Q4_1) quantised from its float weights (few rows: drafting,
    the per-step context update; prefill-sized inputs keep float32). Changes drafts only, never
    what is verified."""
    from dspark_kernels.cpu_ops import load_cpu_ops
    from dspark_sglang.layers.linear import Linear
    from dspark_sglang.layers.quantized_linear import q8_linear, q8_linear_of

    ops = load_cpu_ops()
    if ops is None:
        return
    owners = [drafter, *drafter.layers.modules()]
    for owner in owners:
        for name, child in list(owner.named_children()):
            if (type(child) is Linear and child.in_features % 32 == 0
                    and child.weight.dtype == torch.float32):
                setattr(owner, name, q8_linear(child, ops, qtype=qtype))
    # the per-step context update: k and v of each layer in one kernel call (GGUF blocks are
    # per row, so the stacked rows quantise exactly as the separate projections do)
    kv = []
    for layer in drafter.layers:
        att = layer.self_attn
        if att.k_proj.bias is not None or att.v_proj.bias is not None:
            return
        kv.append(q8_linear_of(torch.cat([att.k_proj.weight, att.v_proj.weight]), ops,
                               qtype=qtype))
    drafter.kv_blocks = (ops, kv)


def _install_token_map(drafter: DSparkDrafter, drafter_dir: str, cfg: SpeculativeConfig) -> None:
    """``--speculative-token-map``: a file, ``none``, or (default) the drafter's own map."""
    from dspark_sglang.speculative.dspark.token_map import resolve_token_map

    ids = resolve_token_map(drafter_dir, cfg.token_map, cfg.token_map_size)
    if ids is None:
        return
    drafter.set_token_map(ids)
    vocab = drafter.draft_vocab
    assert vocab is not None
    logger.info("drafting over %d of %d tokens (%s)", len(vocab), vocab.vocab_size, vocab.dtype)
