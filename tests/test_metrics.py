"""Output-path metrics: SSE framing, the TTFT/ITL tracker, engine emit observers, /metrics
histograms fed by an observer (no monkeypatching of the engine)."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from dspark_sglang.entrypoints.metrics import EngineMetrics, LatencyTracker
from dspark_sglang.entrypoints.sse import SSE_DONE, sse_event


def test_sse_event_framing() -> None:
    ev = sse_event({"text": "café 東京", "n": 1})
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    assert json.loads(ev[6:].decode("utf-8")) == {"text": "café 東京", "n": 1}
    assert "東京".encode() in ev  # UTF-8, not \\u escapes
    assert SSE_DONE == b"data: [DONE]\n\n"


def _req(rid: str, n: int, created: float = 10.0, first: float | None = None) -> Any:
    return SimpleNamespace(rid=rid, output_ids=list(range(n)), created_at=created,
                           first_token_at=first)


def test_latency_tracker_streaming() -> None:
    t = LatencyTracker()
    r = _req("a", 1, created=10.0, first=10.5)
    lat = t.on_emit(r, False, now=10.6)
    assert lat.ttft == pytest.approx(0.5) and lat.itl is None  # one token: no gap yet
    r.output_ids = list(range(4))  # 3 new tokens 0.3 s later
    lat = t.on_emit(r, False, now=10.9)
    assert lat.ttft is None and lat.itl == pytest.approx(0.1)
    lat = t.on_emit(r, False, now=11.0)  # no new token: nothing measured, clock restarts
    assert lat == (None, None)
    r.output_ids = list(range(5))
    lat = t.on_emit(r, True, now=11.4)
    assert lat.itl == pytest.approx(0.4) and len(t) == 0  # finished: state dropped


def test_latency_tracker_non_streaming() -> None:
    t = LatencyTracker()
    lat = t.on_emit(_req("b", 5, created=1.0, first=1.2), True, now=2.0)
    assert lat.ttft == pytest.approx(0.2) and lat.itl == pytest.approx(0.2)
    assert len(t) == 0
    lat = t.on_emit(_req("c", 0, created=1.0), True, now=2.0)  # aborted before any token
    assert lat == (None, None)


def test_engine_metrics_counts_finished_only() -> None:
    m = EngineMetrics()
    r = SimpleNamespace(origin_input_ids=[1, 2, 3], output_ids=[4, 5], finish_reason=None)
    m.on_emit(r, False)  # type: ignore[arg-type]
    assert m.num_finished == 0
    m.on_emit(r, True)  # type: ignore[arg-type]
    r.finish_reason = {"type": "abort"}
    m.on_emit(r, True)  # type: ignore[arg-type]
    assert (m.num_finished, m.num_aborted, m.prompt_tokens, m.generation_tokens) == (2, 1, 6, 4)


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, bool]] = []

    def on_emit(self, req: Any, finished: bool) -> None:
        self.events.append((req.rid, len(req.output_ids), finished))


class _Broken:
    def on_emit(self, req: Any, finished: bool) -> None:
        raise RuntimeError("observer bug")


def test_engine_emit_observers(llama_dir: str, make_engine: Callable[..., Any]) -> None:
    engine = make_engine(llama_dir)
    rec, broken = _Recorder(), _Broken()
    engine.add_emit_observer(broken)
    engine.add_emit_observer(rec)
    sp = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    out = engine.generate("hello there", sp, rid="obs-1")
    # a raising observer neither fails the request nor stops the next observer
    assert out["meta_info"]["completion_tokens"] == 4
    assert rec.events == [("obs-1", 4, True)]  # non-streaming: the final emit only
    chunks = list(engine.generate("hello there", sp, stream=True, rid="obs-2"))
    streamed = [e for e in rec.events if e[0] == "obs-2"]
    assert len(streamed) == len(chunks) and streamed[-1] == ("obs-2", 4, True)
    assert not any(fin for _, _, fin in streamed[:-1])
    assert engine.metrics.num_finished == 2 and engine.metrics.generation_tokens == 8
    engine.remove_emit_observer(rec)
    engine.remove_emit_observer(broken)
    engine.generate("hello there", sp, rid="obs-3")
    assert not any(e[0] == "obs-3" for e in rec.events)
    assert engine.metrics.num_finished == 3  # the engine's own counters stay attached


def test_server_metrics_histograms(llama_dir: str, make_engine: Callable[..., Any]) -> None:
    from dspark_sglang.entrypoints.prometheus import ServerMetrics

    engine = make_engine(llama_dir)
    first, second = ServerMetrics(engine), ServerMetrics(engine)  # two apps, one engine
    assert type(engine.metrics) is EngineMetrics  # nothing stands in for the engine's counters
    sp = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    engine.generate("count me", sp)
    for m in (first, second):
        reg = m.registry
        assert reg.get_sample_value("dspark_time_to_first_token_seconds_count") == 1
        assert reg.get_sample_value("dspark_inter_token_latency_seconds_count") == 1
        assert reg.get_sample_value("dspark_generation_tokens_total") == 5
    first.close()
    list(engine.generate("count me again", sp, stream=True))
    assert first.registry.get_sample_value("dspark_time_to_first_token_seconds_count") == 1
    assert second.registry.get_sample_value("dspark_time_to_first_token_seconds_count") == 2
    assert second.registry.get_sample_value("dspark_inter_token_latency_seconds_count") >= 2
    second.close()
