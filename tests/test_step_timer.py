"""The decoder's public timing hook (``SpecDecoder.phase_timer``) and the step profile built on it
(``bench_speculative --profile-steps``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.conftest import greedy


def test_phase_timer_sees_every_phase_of_every_step(make_engine: Any, llama_dir: str,
                                                    drafter_dir: str) -> None:
    e = make_engine(llama_dir, speculative_algorithm="CHAIN",
                    speculative_draft_model_path=drafter_dir)
    dec = e.parts.decoder
    events: list[str] = []

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        events.append(f"+{name}")
        yield
        events.append(f"-{name}")

    dec.phase_timer = phase
    out = e.generate("The quick brown fox", greedy(6))
    steps = out["meta_info"]["spec_verify_ct"]
    assert steps >= 1
    one = ["+step", "+draft", "-draft", "+target", "-target", "+ctx_update", "-ctx_update",
           "+accept", "-accept", "+accept", "-accept", "-step"]
    assert events == one * steps


def test_step_timer_profiles_steps_and_prefill(make_engine: Any, llama_dir: str,
                                               drafter_dir: str) -> None:
    from dspark_sglang.benchmark.step_timer import STEP_PARTS, StepTimer

    e = make_engine(llama_dir, speculative_algorithm="CHAIN",
                    speculative_draft_model_path=drafter_dir)
    timer = StepTimer(e.parts)
    out = e.generate("The quick brown fox", greedy(6))
    prof = timer.summary(wall_s=1e3)
    assert prof["steps"] == out["meta_info"]["spec_verify_ct"]
    assert all(prof[f"{p}_ms"] > 0 for p in STEP_PARTS)
    assert sum(prof[f"{p}_ms"] for p in STEP_PARTS) <= prof["step_ms"]
    assert prof["prefill_s"] > 0 and timer.totals["prefill_ctx_update"] > 0
    assert set(prof) == {"steps", "step_ms", *(f"{p}_ms" for p in STEP_PARTS), "other_ms",
                         "prefill_s", "steps_share", "prefill_share"}
