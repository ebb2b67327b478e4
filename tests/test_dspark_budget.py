"""DSPARK draft budget: skip drafting that does not pay, probe with back-off, prior for new
requests. Pure bookkeeping over past outcomes, so tested without a model."""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from dspark_sglang.speculative.dspark_worker import ACC_EMA_DECAY, BudgetState, DSparkWorker
from dspark_sglang.speculative.worker import StepResult

_rids = itertools.count()


class _SPS:
    def sps(self, batch: int) -> float:
        return 10.0  # target steps per second


def _worker(draft_time: float = 0.1) -> DSparkWorker:
    w = object.__new__(DSparkWorker)
    w.gamma, w.draft_budget = 7, True
    w.sps_table, w._draft_time, w._last_batch = _SPS(), draft_time, 1  # draft = 1 step
    w.min_probe_every, w.max_probe_every = 4, 16
    w.probe_every, w._skipped_in_row, w._probing, w._acc_prior = 4, 0, False, None
    w.probe_requests, w._probe_offset = 4, 0
    w.budget_states = {}
    w._step_scale, w._last_call, w._draft_step, w._step_model = 1.0, None, None, None
    w._pending, w._pending_rows, w._flush_s, w.defer_context = [], 0, 0.0, True
    w._prefill_end = float("-inf")
    w.context_holes, w.ctx_valid, w.dropped_rows = True, torch.ones(8, dtype=torch.bool), 0
    return w


def _req() -> SimpleNamespace:
    return SimpleNamespace(rid=f"r{next(_rids)}")


def _step(w: DSparkWorker, reqs: list[SimpleNamespace], accepted: int) -> bool:
    """One scheduler step: budget, then (when drafted) record the outcome. True if drafted."""
    rooms = w._draft_budget(reqs, [10] * len(reqs))
    drafted = max(rooms) > 0
    for r, n in zip(reqs, rooms):  # what _propose records
        w.budget_states[r.rid] = BudgetState(w.budget_states[r.rid].acc_ema, proposed=n)
    w.on_verified([StepResult(r, [0] * (1 + min(n, accepted)), None, n)  # type: ignore[arg-type]
                   for r, n in zip(reqs, rooms)])
    return drafted


def test_first_step_drafts_with_block_prior_and_rooms_cap() -> None:
    w = _worker()
    assert w._draft_budget([_req()], [3]) == [3]  # ema = gamma -> 9, capped by the room


def test_useless_drafting_is_skipped_and_probes_back_off() -> None:
    w = _worker()
    reqs = [_req()]
    pattern = [_step(w, reqs, accepted=0) for _ in range(60)]
    first_skip = pattern.index(False)
    drafted_at = [i for i, d in enumerate(pattern) if d and i > first_skip]
    gaps = [b - a for a, b in zip(drafted_at, drafted_at[1:])]
    assert gaps and gaps == sorted(gaps) and gaps[-1] == w.max_probe_every
    assert w.probe_every == w.max_probe_every
    assert w._acc_prior is not None and w._acc_prior < 0.5
    # a request arriving now starts from the engine-wide prior, so it does not force drafting
    newcomer = _req()
    assert w._draft_budget(reqs + [newcomer], [10, 10]) == [0, 0]


def test_paying_drafts_every_step_and_resets_probe_interval() -> None:
    w = _worker()
    w.probe_every = w.max_probe_every
    reqs = [_req(), _req()]
    assert all(_step(w, reqs, accepted=5) for _ in range(10))
    assert w.probe_every == w.min_probe_every
    assert w._draft_budget(reqs, [10, 1]) == [7, 1]  # depth = int(ema) + 2, capped by room


def test_disabled_budget_drafts_full_rooms() -> None:
    w = _worker()
    w.draft_budget = False
    assert w._draft_budget([_req(), _req()], [7, 2]) == [7, 2]


def test_large_batch_weighs_mean_acceptance_against_batch_step_cost() -> None:
    """32 requests each expecting 0.5 accepted drafts save half a step each; a draft costing a
    whole batch step does not pay, however many requests share it."""
    w = _worker()
    reqs = [_req() for _ in range(32)]
    for r in reqs:
        w.budget_states[r.rid] = BudgetState(acc_ema=0.5)
    assert w._draft_budget(reqs, [10] * 32) == [0] * 32
    for r in reqs:
        w.budget_states[r.rid] = BudgetState(acc_ema=1.5)
    assert w._draft_budget(reqs, [10] * 32) == [3] * 32


def test_jump_forward_outcome_is_not_learned_and_release_drops_state() -> None:
    """Forced (jump-forward) tokens replaced the proposal: their acceptance does not move the
    EMA; a finished request's record is dropped."""
    w = _worker()
    r = _req()
    w._draft_budget([r], [10])
    ema = w.budget_states[r.rid].acc_ema
    w.budget_states[r.rid] = BudgetState(ema, proposed=9)
    w.on_verified([StepResult(r, [0] * 6, None, 5, forced=True)])  # type: ignore[arg-type]
    w._draft_budget([r], [10])
    assert w.budget_states[r.rid].acc_ema == ema and w._acc_prior is None
    w.budget_states[r.rid] = BudgetState(ema, proposed=9)
    w.on_verified([StepResult(r, [0] * 6, None, 9)])  # type: ignore[arg-type]
    w._draft_budget([r], [10])
    want = ACC_EMA_DECAY * ema + (1 - ACC_EMA_DECAY) * 5
    assert w.budget_states[r.rid].acc_ema == pytest.approx(want) and w._acc_prior == 5.0
    w.release(r)  # type: ignore[arg-type]
    assert w.budget_states == {}


def test_probe_drafts_a_rotating_few_of_a_large_batch() -> None:
    """At high load a probe drafts for ``probe_requests`` requests (rotating), not the batch."""
    w = _worker()
    reqs = [_req() for _ in range(10)]
    for r in reqs:
        w.budget_states[r.rid] = BudgetState(acc_ema=0.1)
    probes = []
    for _ in range(3 * w.probe_every):
        rooms = w._draft_budget(reqs, [10] * 10)
        if max(rooms) > 0:
            probes.append([i for i, n in enumerate(rooms) if n > 0])
        w._probing = False if max(rooms) == 0 else w._probing
    assert probes and all(len(p) == w.probe_requests for p in probes)
    assert len(probes) < 2 or probes[0] != probes[1]  # rotates through the batch


class _CostlyVerifySPS:
    """Step time grows with the tokens in the forward: 1 token 0.1 s, 3 tokens 0.2 s, ..."""

    def sps(self, num_tokens: int) -> float:
        return 10.0 / (1 + (num_tokens - 1) / 2)


def test_verify_cost_of_the_drafted_positions_counts() -> None:
    """Accepting 1.5 drafts per step pays for a draft of 1 step when verifying is free (flat
    table), not when verifying the 3 drafted positions costs 1.5 extra steps."""
    for table, pays in ((_SPS(), True), (_CostlyVerifySPS(), False)):
        w = _worker()
        w.sps_table = table
        r = _req()
        w.budget_states[r.rid] = BudgetState(acc_ema=1.5)
        rooms = w._draft_budget([r], [10])
        assert (max(rooms) > 0) is pays, type(table).__name__
    assert w._verify_cost_in_steps(1, 2.0) == 1.0  # 3 tokens take 0.2 s against 0.1 s


def test_draft_time_skips_the_first_call_and_caps_a_slow_one(monkeypatch) -> None:
    """The engine's first draft (one-time setup) does not price drafting; later calls feed an
    EMA in which one slow call counts at most 3x the estimate."""
    import time

    from dspark_sglang.speculative.worker import Draft

    w = _worker(draft_time=None)  # type: ignore[arg-type]
    w.draft_budget, w._draft_calls, w.context_len = False, 0, 100
    w._propose = lambda reqs, rooms: [Draft() for _ in reqs]  # type: ignore[method-assign]
    ticks = iter([0.0, 5.0, 10.0, 10.01, 20.0, 20.01, 30.0, 31.0])  # t0, t1 per call
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    req = SimpleNamespace(rid="r", draft_room=lambda ctx: 5)
    w.propose([req])
    assert w._draft_time is None  # 5 s of setup ignored
    w.propose([req])
    assert abs(w._draft_time - 0.01) < 1e-9
    w.propose([req])
    w.propose([req])  # 1 s: counted as 0.03
    assert abs(w._draft_time - (0.8 * 0.01 + 0.2 * 0.03)) < 1e-9


def test_a_saved_step_is_worth_a_whole_step() -> None:
    """Drafting that costs a little more than the accepted drafts save in target forwards is
    skipped, and taken once the measured step (forward + the rest) makes each saved step worth
    more than a forward; the scale comes from the time between calls of plain steps."""
    import time

    w = _worker(draft_time=0.05)  # draft = 0.5 forward steps; verify costs nothing here
    reqs = [_req()]
    w.budget_states[reqs[0].rid] = BudgetState(acc_ema=0.45)
    assert w._draft_budget(reqs, [10]) == [0]  # 0.45 < 0.5
    w._probing, w._skipped_in_row = False, 0
    w.budget_states[reqs[0].rid] = BudgetState(acc_ema=0.45)
    w._step_scale = 1.2  # 0.54 >= 0.5
    assert w._draft_budget(reqs, [10]) == [2]
    now = time.perf_counter()
    w._step_scale, w._last_call = 1.0, (now - 0.15, 1, "plain", 0.0, 0.0)  # 1.5 forwards ago
    w._measure_step(1, now)
    assert 1.04 < w._step_scale < 1.1 and w._last_call is None
    w._last_call = (now - 1.0, 1, "plain", 0.0, 0.0)  # 10 forwards: idle, not a step
    w._measure_step(1, now)
    assert 1.04 < w._step_scale < 1.1
    w._last_call = (now - 0.15, 2, "plain", 0.0, 0.0)  # another batch size
    w._measure_step(1, now)
    assert 1.04 < w._step_scale < 1.1


def test_measured_drafting_steps_decide_once_timed() -> None:
    """Whole drafting steps are timed (time between calls over the forward at that batch); once
    measured at this batch and depth, drafting is taken iff a step yielding 1 + accepted tokens
    costs less per token than a plain step, whatever the model of its parts says. Partial
    probes, other batches and gaps (a prefill in between) are not measured."""
    w = _worker(draft_time=0.05)  # model: draft 0.5 forwards, verify free -> 1.5 per step
    w._step_scale = 1.1
    reqs = [_req()]
    w.budget_states[reqs[0].rid] = BudgetState(acc_ema=0.4)
    assert w._draft_budget(reqs, [10]) == [0]  # model: 1.1 * 1.4 = 1.54 >= 1.6? no
    assert w._step_model is not None and abs(w._step_model[0] - 1.6) < 1e-9
    w._probing, w._skipped_in_row = False, 0
    now = 100.0
    for ratio, kind, batch in ((1.5, "draft", 1), (1.5, "partial", 1), (9.0, "draft", 1),
                               (1.5, "draft", 2)):
        w._last_call = (now - ratio / 10.0, batch, kind, 1.6, 2.0)
        w._measure_step(1, now)
        if kind == "draft" and ratio == 1.5:
            assert w._draft_step is not None and abs(w._draft_step[0] - 1.5) < 1e-9
    assert w._draft_step is not None and abs(w._draft_step[0] - 1.5) < 1e-9  # only the first
    w.budget_states[reqs[0].rid] = BudgetState(acc_ema=0.4)
    assert w._draft_budget(reqs, [10]) == [2]  # measured 1.5 <= 1.54: drafts
    w._last_call = (now - 0.2, 1, "draft", 1.6, 2.0)  # measured 2.0: EMA -> 1.6
    w._measure_step(1, now)
    assert w._draft_step is not None and abs(w._draft_step[0] - 1.6) < 1e-9
    w.budget_states[reqs[0].rid] = BudgetState(acc_ema=0.4)
    assert w._draft_budget(reqs, [10]) == [0]
    # another depth (a request expecting 3 accepted drafts: depth 5) falls back to the model
    m = w._draft_step[0]
    assert w._measured_draft_step(1, 5.0) is None and w._measured_draft_step(1, 2.5) == m
    assert w._measured_draft_step(2, 2.0) == m and w._measured_draft_step(8, 2.0) is None


def test_greedy_drafts_teach_their_expected_acceptance() -> None:
    """A greedy draft's record learns the mean of the step's count and the expected number
    accepted from the calibrated confidences of the verified positions (sum of their running
    products); a sampled draft (expected None) and a jump-forward step learn as before."""
    import torch

    from dspark_sglang.speculative.dspark_worker import _expected_accepted

    conf = torch.tensor([[0.8, 0.5, 0.9], [0.5, 1.0, 1.0], [0.2, 0.2, 0.2]])
    exp = _expected_accepted(conf, [2, 3, 0])
    assert exp[0] == pytest.approx(0.8 + 0.4) and exp[1] == pytest.approx(1.5) and exp[2] == 0
    assert _expected_accepted(torch.empty(2, 0), [0, 0]) == [0.0, 0.0]

    w = _worker()
    greedy, sampled = _req(), _req()
    w._draft_budget([greedy, sampled], [10, 10])
    ema = w.budget_states[greedy.rid].acc_ema
    w.budget_states[greedy.rid] = BudgetState(ema, proposed=3, expected=1.2)
    w.budget_states[sampled.rid] = BudgetState(ema, proposed=3, expected=None)
    w.on_verified([StepResult(greedy, [0], None, 3),  # type: ignore[arg-type]
                   StepResult(sampled, [0], None, 3)])  # type: ignore[arg-type]
    assert w.budget_states[greedy.rid].last_accepted == pytest.approx(0.6)  # (0 + 1.2) / 2
    assert w.budget_states[greedy.rid].expected is None
    assert w.budget_states[sampled.rid].last_accepted == 0.0
    w._draft_budget([greedy, sampled], [10, 10])
    want = ACC_EMA_DECAY * ema + (1 - ACC_EMA_DECAY) * 0.6
    assert w.budget_states[greedy.rid].acc_ema == pytest.approx(want)
    assert w.budget_states[sampled.rid].acc_ema == pytest.approx(ACC_EMA_DECAY * ema)
    # forced (jump-forward) tokens replaced the proposal: nothing learned, expectation or not
    w.budget_states[greedy.rid] = replace(w.budget_states[greedy.rid], proposed=2, expected=0.9)
    before = w.budget_states[greedy.rid].acc_ema
    w.on_verified([StepResult(greedy, [0, 0, 0], None, 2, forced=True)])  # type: ignore[arg-type]
    w._draft_budget([greedy], [10])
    assert w.budget_states[greedy.rid].acc_ema == before


def test_steps_right_after_a_large_prefill_are_not_timed() -> None:
    """After a large forward small ones run slow for a few steps (caches, clocks): a step that
    starts within SETTLE_S of a prefill of >= SETTLE_MIN_ROWS tokens (seen through
    on_target_forward) does not move the step scale; later steps and small prefills do."""
    import time

    import torch

    from dspark_sglang.core.forward_batch import ForwardMode, ModelOutput
    from dspark_sglang.speculative import dspark_worker as dwm

    w = _worker()
    w._kernel_update_ok = lambda aux: False  # type: ignore[method-assign]
    w.flush_context = lambda: None  # type: ignore[method-assign]
    w._apply_update = lambda *a: None  # type: ignore[method-assign]

    def prefill(rows: int) -> None:
        fb = SimpleNamespace(mode=ForwardMode.EXTEND, positions=None, out_cache_loc=None)
        w.on_target_forward(fb, ModelOutput(logits=None, aux_hidden=torch.zeros(rows, 4),
                                            final_hidden=None))

    prefill(dwm.SETTLE_MIN_ROWS)
    assert abs(w._prefill_end - time.perf_counter()) < 1.0
    w._last_call = (w._prefill_end + 0.005, 1, "plain", 0.0, 0.0)  # a 2-forward step, 5 ms on
    w._measure_step(1, w._prefill_end + 0.205)
    assert w._step_scale == 1.0  # (within the window: not timed)
    w._last_call = (w._prefill_end + dwm.SETTLE_S + 0.001, 1, "plain", 0.0, 0.0)
    w._measure_step(1, w._prefill_end + dwm.SETTLE_S + 0.201)
    assert 1.09 < w._step_scale < 1.11  # 0.9 * 1 + 0.1 * 2
    w._step_scale = 1.0
    end = w._prefill_end
    prefill(dwm.SETTLE_MIN_ROWS - 1)  # small: no window
    assert w._prefill_end == end
