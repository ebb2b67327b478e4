"""Engine-side counters (plain ints, updated on the scheduler thread; read by /metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dspark_sglang.core.req import Req


@dataclass
class EngineMetrics:
    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_seconds: list[float] = field(default_factory=list)
    itl_seconds: list[float] = field(default_factory=list)
    _last_emit: dict[str, tuple[float, int]] = field(default_factory=dict)

    def on_emit(self, req: Req, finished: bool) -> None:
        now = time.monotonic()
        prev = self._last_emit.get(req.rid)
        n = len(req.output_ids)
        if prev is None and n:
            self.ttft_seconds.append(now - req.created_at)
        elif prev is not None and n > prev[1]:
            per = (now - prev[0]) / (n - prev[1])
            self.itl_seconds.extend([per] * (n - prev[1]))
        self._last_emit[req.rid] = (now, n)
        if finished:
            self._last_emit.pop(req.rid, None)
            self.num_finished += 1
            self.prompt_tokens += len(req.origin_input_ids)
            self.generation_tokens += n
            if req.finish_reason and req.finish_reason.get("type") == "abort":
                self.num_aborted += 1
        # keep the sample lists bounded
        for lst in (self.ttft_seconds, self.itl_seconds):
            if len(lst) > 100_000:
                del lst[: len(lst) - 50_000]
