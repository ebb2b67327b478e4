"""Drive an in-process ``Engine`` at a fixed concurrency and reset its statistics.

Concurrency ``c`` means ``c`` client threads, each submitting its next prompt as soon as its last
one finished (closed loop); the engine batches whatever is in flight.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dspark_sglang.benchmark.metrics import RequestResult
from dspark_sglang.benchmark.report import error_text

ENGINE_MODES = ("NONE", "MTP1", "CHAIN", "DSPARK", "NGRAM", "TREE", "STANDALONE")


def engine_kwargs_for_mode(mode: str, num_draft_tokens: int | None = None,
                           draft_model_path: str | None = None) -> dict[str, Any]:
    """ServerArgs keywords that select ``mode`` (one of ENGINE_MODES)."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(ENGINE_MODES)}")
    kw: dict[str, Any] = {"speculative_algorithm": mode}
    if num_draft_tokens is not None and mode in ("CHAIN", "NGRAM", "STANDALONE", "TREE"):
        kw["speculative_num_draft_tokens"] = num_draft_tokens
    if mode == "STANDALONE":
        if not draft_model_path:
            raise ValueError("STANDALONE needs --draft-model-path (a same-tokenizer small LM)")
        kw["speculative_draft_model_path"] = draft_model_path
    return kw


def reset_engine_stats(engine: Any) -> None:
    """Zero the engine's speculative statistics (on its scheduler thread, between steps)."""
    reset = getattr(engine, "reset_spec_stats", None)
    if callable(reset):
        reset()
        return

    def _reset() -> None:
        decoder = engine.parts.decoder
        decoder.stats = type(decoder.stats)()

    engine.call_in_loop(_reset)


def spec_stats(engine: Any) -> dict[str, Any]:
    return dict(engine.get_server_info().get("spec_stats") or {})


def run_closed_loop(engine: Any, prompts: list[str], sampling: list[dict[str, Any]],
                    domains: list[str], concurrency: int) -> tuple[list[RequestResult], float]:
    """Run every prompt once with ``concurrency`` client threads.

    Returns results in prompt order and the wall time. A request that raises is recorded with
    its error; the others go on.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    results: list[RequestResult | None] = [None] * len(prompts)
    next_index = [0]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(prompts):
                return
            t0 = time.perf_counter()
            try:
                out = engine.generate(prompts[i], sampling[i])
                results[i] = RequestResult.from_output(i, domains[i], time.perf_counter() - t0,
                                                       out)
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                results[i] = RequestResult(i, domains[i], time.perf_counter() - t0,
                                           error=error_text(e))

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(concurrency, len(prompts)))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall
