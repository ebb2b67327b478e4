"""Where a decode step's time goes: wall-clock timers wrapped around one engine's components.

``StepTimer(engine.parts)`` wraps, on the engine's own objects (nothing global is patched):
``decoder.step`` (one speculative/decode step), inside it ``worker.propose`` (drafting),
``runner.forward`` (the target's batched forward), ``worker.on_target_forward`` (drafter context
update) and ``decoder._accept`` + ``decoder._commit`` (acceptance, KV bookkeeping); and, outside
steps, the target's prefill forwards. ``summary(wall)`` gives milliseconds per step for each part,
the rest of the step as ``other_ms`` (worker bookkeeping, batch building, Python), and the shares
of the wall time spent in steps and in prefill (the remainder is scheduling, tokenization and
idle time between requests).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any

from dspark_sglang.core.forward_batch import ForwardMode

STEP_PARTS = ("draft", "target", "ctx_update", "accept")


class StepTimer:
    def __init__(self, parts: Any) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._in_step = False
        decoder, worker, runner = parts.decoder, parts.decoder.worker, parts.runner
        self._wrap(decoder, "step", self._time_step)
        self._wrap(worker, "propose", functools.partial(self._time_part, "draft"))
        self._wrap(worker, "on_target_forward",
                   functools.partial(self._time_part, "ctx_update"))
        self._wrap(decoder, "_accept", functools.partial(self._time_part, "accept"))
        self._wrap(decoder, "_commit", functools.partial(self._time_part, "accept"))
        self._wrap(runner, "forward", self._time_forward)

    @staticmethod
    def _wrap(obj: Any, name: str, timer: Any) -> None:
        inner = getattr(obj, name)
        setattr(obj, name, functools.partial(timer, inner))

    def _time_step(self, inner: Any, *args: Any, **kw: Any) -> Any:
        self._in_step = True
        t0 = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            self.totals["step"] += time.perf_counter() - t0
            self.steps += 1
            self._in_step = False

    def _time_part(self, part: str, inner: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            key = part if self._in_step else f"prefill_{part}"
            self.totals[key] += time.perf_counter() - t0

    def _time_forward(self, inner: Any, fb: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(fb)
        finally:
            dt = time.perf_counter() - t0
            if self._in_step and fb.mode != ForwardMode.EXTEND:
                self.totals["target"] += dt
            else:
                self.totals["prefill"] += dt

    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0

    def summary(self, wall_s: float) -> dict[str, Any]:
        """Per-step milliseconds by part, and the shares of ``wall_s``."""
        n = max(1, self.steps)
        out: dict[str, Any] = {"steps": self.steps,
                               "step_ms": 1e3 * self.totals["step"] / n}
        for p in STEP_PARTS:
            out[f"{p}_ms"] = 1e3 * self.totals[p] / n
        out["other_ms"] = out["step_ms"] - sum(out[f"{p}_ms"] for p in STEP_PARTS)
        prefill = self.totals["prefill"] + self.totals["prefill_ctx_update"]
        out["prefill_s"] = prefill
        out["steps_share"] = self.totals["step"] / wall_s if wall_s > 0 else None
        out["prefill_share"] = prefill / wall_s if wall_s > 0 else None
        return out
