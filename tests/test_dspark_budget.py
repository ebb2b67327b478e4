"""DSPARK draft budget: skip drafting that does not pay, probe with back-off, prior for new
requests. Pure bookkeeping over past outcomes, so tested without a model."""

from __future__ import annotations

from types import SimpleNamespace

from dspark_sglang.speculative.dspark_worker import DSparkWorker


class _SPS:
    def sps(self, batch: int) -> float:
        return 10.0  # target steps per second


def _worker(draft_time: float = 0.1) -> DSparkWorker:
    w = object.__new__(DSparkWorker)
    w.mode, w.gamma, w.draft_budget = "DSPARK", 7, True
    w.sps_table, w._draft_time, w._last_batch = _SPS(), draft_time, 1  # draft = 1 step
    w.min_probe_every, w.max_probe_every = 4, 16
    w.probe_every, w._skipped_in_row, w._probing, w._acc_prior = 4, 0, False, None
    return w


def _req() -> SimpleNamespace:
    return SimpleNamespace(draft_state={})


def _step(w: DSparkWorker, reqs: list[SimpleNamespace], accepted: int) -> bool:
    """One scheduler step: budget, then (when drafted) record the outcome. True if drafted."""
    rooms = w._draft_budget(reqs, [10] * len(reqs))
    drafted = max(rooms) > 0
    for r, n in zip(reqs, rooms):
        if n:
            r.draft_state["proposed"] = n
            r.draft_state["last_accepted"] = accepted
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
        r.draft_state["acc_ema"] = 0.5
    assert w._draft_budget(reqs, [10] * 32) == [0] * 32
    for r in reqs:
        r.draft_state["acc_ema"] = 1.5
    assert w._draft_budget(reqs, [10] * 32) == [3] * 32
