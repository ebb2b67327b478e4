"""A speculative step that cannot finish changes nothing (issue 14).

``SpecDecoder.step`` returns None when KV slots run out after the drafter proposed, and re-raises
when anything before its commit fails; either way each request's generator, the worker's state
(the DSpark draft budget's per-request records, probe counters, timings), ``stats`` and the
slot pool must be as before the step, and decoding that goes on must equal plain decoding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import PROMPTS, greedy

SEEDED = {"max_new_tokens": 16, "temperature": 0.8, "seed": 21, "ignore_eos": True}


@pytest.fixture(scope="module")
def flat_sps(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dspark_sglang.speculative.sps_profile import SPSTable

    p = tmp_path_factory.mktemp("sps") / "flat.json"
    SPSTable.flat(10.0).save(p)
    return str(p)


def _state(dec: Any, reqs: list[Any]) -> dict[str, Any]:
    return {
        "worker": dict(vars(dec.worker)),
        "budget_states": dict(dec.worker.budget_states),
        "generators": [None if r.generator is None else r.generator.get_state() for r in reqs],
        "stats": dec.stats.as_dict(),
        "reqs": [(r.kv_len, list(r.output_ids)) for r in reqs],
        "free_slots": dec.cache.allocator.available_size(),
    }


def _same(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Names of what changed (worker attributes compared by identity: a restore rebinds them)."""
    diffs = [f"worker.{k}" for k in set(before["worker"]) | set(after["worker"])
             if before["worker"].get(k, before) is not after["worker"].get(k, after)]
    for key in ("budget_states", "stats", "reqs", "free_slots"):
        if before[key] != after[key]:
            diffs.append(key)
    for g0, g1 in zip(before["generators"], after["generators"], strict=True):
        if (g0 is None) != (g1 is None) or (g0 is not None and not torch.equal(g0, g1)):
            diffs.append("generator")
    return diffs


@pytest.mark.parametrize("fault", ["alloc", "forward"])
def test_cancelled_step_changes_nothing(make_engine: Any, llama_dir: str, drafter_dir: str,
                                        flat_sps: str, fault: str) -> None:
    plain = make_engine(llama_dir)
    want = [o["output_ids"] for o in plain.generate(PROMPTS[:3], greedy(16))]
    want_seeded = plain.generate(PROMPTS[3], SEEDED)["output_ids"]
    e = make_engine(llama_dir, speculative_algorithm="DSPARK",
                    speculative_draft_model_path=drafter_dir,
                    speculative_dspark_sps_table_path=flat_sps)  # draft budget on: it has state
    dec = e.parts.decoder
    orig_step, orig_alloc, orig_forward = dec.step, dec.cache.alloc_slots, dec.runner.forward
    seen = {"steps": 0, "cancelled": 0, "drafted": 0}
    diffs: list[list[str]] = []

    def fail(*args: Any, **kw: Any) -> Any:
        if fault == "alloc":
            return None
        raise RuntimeError("injected fault after propose")

    def step(reqs: list[Any]) -> Any:
        seen["steps"] += 1
        if seen["steps"] % 3:
            return orig_step(reqs)
        before = _state(dec, reqs)
        proposed = dec.worker.propose

        def propose(rs: list[Any]) -> Any:  # fail right after the drafter proposed
            drafts = proposed(rs)
            seen["drafted"] += sum(len(d) for d in drafts)
            if fault == "alloc":
                dec.cache.alloc_slots = fail
            else:
                dec.runner.forward = fail
            return drafts

        dec.worker.propose = propose
        try:
            try:
                out = orig_step(reqs)
            except RuntimeError:
                assert fault == "forward"
                out = None
            else:
                assert fault == "alloc" and out is None
        finally:
            del dec.worker.propose
            dec.cache.alloc_slots, dec.runner.forward = orig_alloc, orig_forward
        seen["cancelled"] += 1
        diffs.append(_same(before, _state(dec, reqs)))
        return orig_step(reqs)  # the retry must behave as if nothing had happened

    dec.step = step
    try:
        got = [o["output_ids"] for o in e.generate(PROMPTS[:3], greedy(16))]
        got_seeded = e.generate(PROMPTS[3], SEEDED)["output_ids"]
    finally:
        del dec.step
    assert seen["cancelled"] >= 4 and seen["drafted"] > 0
    assert all(d == [] for d in diffs), diffs
    assert got == want
    assert got_seeded == want_seeded
    assert dec.worker.budget_states == {}  # released when each request finished
    e.check_integrity()
