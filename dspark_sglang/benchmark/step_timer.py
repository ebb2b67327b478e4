"""Where a decode step's time goes: wall-clock timers on one engine's components.

``StepTimer(engine.parts)`` installs itself as the decoder's ``phase_timer``
(``SpecDecoder.phase_timer``), which times each step (``step``) and inside it drafting
(``draft``: ``worker.propose``), the target's batched forward (``target``), the drafter context
update (``ctx_update``: ``worker.on_target_forward``) and acceptance plus KV bookkeeping
(``accept``). Outside steps it times the target's prefill forwards and the drafter's context
update after them, by wrapping ``runner.forward`` and ``worker.on_target_forward`` on the
engine's own objects (nothing global is patched). ``summary(wall)`` gives milliseconds per step
for each part, the rest of the step as ``other_ms`` (worker bookkeeping, batch building, Python),
and the shares of the wall time spent in steps and in prefill (the remainder is scheduling,
tokenization and idle time between requests).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STEP_PARTS = ("draft", "target", "ctx_update", "accept")


def time_calls(obj: Any, method: str, add: Callable[[float], None]) -> None:
    """Replace ``obj.method`` (an instance attribute, nothing global) by a wrapper that passes
    each call's wall time in seconds to ``add``."""
    inner: Callable[..., Any] = getattr(obj, method)

    def timed(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            add(time.perf_counter() - t0)

    setattr(obj, method, timed)


class StepTimer:
    def __init__(self, parts: Any) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._in_step = False
        decoder = parts.decoder
        decoder.phase_timer = self.phase
        self._time_outside_steps(parts.runner, "forward", "prefill")
        self._time_outside_steps(decoder.worker, "on_target_forward", "prefill_ctx_update")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The decoder's ``phase_timer``: adds the phase's wall time to ``totals[name]``."""
        if name == "step":
            self._in_step = True
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0
            if name == "step":
                self.steps += 1
                self._in_step = False

    def _time_outside_steps(self, obj: Any, method: str, key: str) -> None:
        """Wrap ``obj.method`` so calls outside a step (prefill) add to ``totals[key]``; calls
        inside a step are timed by the decoder's phases."""
        def add(seconds: float) -> None:
            if not self._in_step:
                self.totals[key] += seconds

        time_calls(obj, method, add)

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
