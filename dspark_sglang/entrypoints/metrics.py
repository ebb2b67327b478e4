"""What the engine reports about delivered outputs: the emit-observer interface, the engine's own
request/token counters, and the one tracker of time to first token and inter-token latency.

Observers run on the scheduler thread (``Engine.add_emit_observer``), after a request's output was
built and before its callback, for every output delivered (each streamed event; the final output
of every request with a consumer). They must be quick and must not touch the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from dspark_sglang.core.req import Req


class EmitObserver(Protocol):
    def on_emit(self, req: Req, finished: bool) -> None:
        """``req`` has just had an output delivered; ``finished``: it was its last one."""


@dataclass
class EngineMetrics:
    """Counters of finished requests (plain ints, written on the scheduler thread; read by
    ``/metrics`` and tests). Always the engine's first emit observer."""

    num_finished: int = 0
    num_aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0

    def on_emit(self, req: Req, finished: bool) -> None:
        if not finished:
            return
        self.num_finished += 1
        self.prompt_tokens += len(req.origin_input_ids)
        self.generation_tokens += len(req.output_ids)
        if req.finish_reason and req.finish_reason.get("type") == "abort":
            self.num_aborted += 1


class Latency(NamedTuple):
    """What one emit measured: ``ttft`` (seconds from submit to the first token, on a request's
    first emit that carries tokens) and ``itl`` (mean seconds per output token over the tokens
    new since the previous emit); ``None`` where the emit measured nothing. An emit that brings
    no new token measures nothing but still counts as the previous emit for the next one."""

    ttft: float | None
    itl: float | None


@dataclass
class LatencyTracker:
    """Time to first token and inter-token latency from a request's emits (one thread).

    The first token's time is ``Req.first_token_at`` (set when the prefill sampled it), so a
    non-streaming request, whose only emit is its last, still gets its TTFT; the tokens up to
    that emit are spread evenly over the time since the first one. State for a request is
    dropped at its finishing emit.
    """

    _last: dict[str, tuple[float, int]] = field(default_factory=dict)  # rid -> (time, tokens)

    def on_emit(self, req: Req, finished: bool, now: float | None = None) -> Latency:
        now = time.monotonic() if now is None else now
        n = len(req.output_ids)
        prev = self._last.get(req.rid)
        ttft = itl = None
        if prev is None and n:
            first = req.first_token_at or now
            ttft = max(0.0, first - req.created_at)
            if n > 1:
                itl = max(0.0, now - first) / (n - 1)
        elif prev is not None and n > prev[1]:
            itl = (now - prev[0]) / (n - prev[1])
        if finished:
            self._last.pop(req.rid, None)
        elif n:
            self._last[req.rid] = (now, n)
        return Latency(ttft, itl)

    def __len__(self) -> int:
        """Requests with an unfinished emit history (0 once every tracked request finished)."""
        return len(self._last)
