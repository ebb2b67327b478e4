"""SPS table: target forward steps per second as a function of verify tokens in the batch.

Profiled once at engine start (:func:`profile_sps`) and read by the prefix scheduler. Written in
upstream SGLang's ``SpsCostTable`` JSON (``--speculative-dspark-sps-table-path`` there)::

    {"sample_batch_tokens": [1, 2, 4, ...], "sample_steps_per_sec": [41.2, 40.9, ...],
     "max_batch_tokens": 256, "meta": {...}}

(upstream ignores ``meta``). Read: that format, our earlier ``{"token_counts": [...], "sps":
[...], "meta": {...}}``, and upstream's additive cost table ``{"bias_seconds", "bs_probes",
"alpha_seconds", "m_probes", "theta_seconds"}`` (step time ``bias + alpha(num_reqs) +
theta(num_reqs + budget)``, both interpolated and clamped). An additive table is turned into a
curve over total verify tokens ``B`` assuming one request per ``meta["tokens_per_request"]``
tokens (default 8, a typical chain), and written back unchanged (its fields kept in ``meta``).

Contract of :meth:`SPSTable.sps`: linear interpolation between profiled points; below the first
point the first value; above the last point, constant token throughput
(``sps(b) = sps_last * b_last / b``), so tokens past the profile are never free, unless
``meta["flat_tail"]`` is true (then the last value is kept). The stored curve is
made monotone non-increasing (running minimum from small to large ``b``): a larger forward is never
faster, and measurement noise must not invite the scheduler to grow a batch to "speed it up".
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SPSTable:
    token_counts: list[int]  # strictly increasing, >= 1
    sps_values: list[float]  # steps/s at each count, monotone non-increasing, > 0
    meta: dict[str, Any] = field(default_factory=dict)
    _b: np.ndarray = field(init=False, repr=False, compare=False)
    _s: np.ndarray = field(init=False, repr=False, compare=False)
    # sps(b) by b: the draft budget asks every decode step, and np.interp on one value costs
    # ~20 us of Python / numpy overhead (1-2 % of a 3 ms step)
    _memo: dict[int, float] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.token_counts or len(self.token_counts) != len(self.sps_values):
            raise ValueError("SPSTable needs equally long, non-empty token_counts and sps")
        pairs = sorted(
            zip((int(b) for b in self.token_counts), (float(s) for s in self.sps_values))
        )
        counts = [b for b, _ in pairs]
        if counts[0] < 1 or len(set(counts)) != len(counts):
            raise ValueError("token counts must be distinct and >= 1")
        if any(not s > 0 for _, s in pairs):
            raise ValueError("sps values must be positive")
        self.token_counts = counts
        self.sps_values = np.minimum.accumulate(np.array([s for _, s in pairs])).tolist()
        self._b = np.array(self.token_counts, dtype=np.float64)
        self._s = np.array(self.sps_values, dtype=np.float64)

    @classmethod
    def from_measurements(
        cls, measurements: Mapping[int, float], meta: dict[str, Any] | None = None
    ) -> SPSTable:
        """From ``{num_tokens: steps_per_second}``."""
        counts = sorted(measurements)
        return cls(counts, [measurements[b] for b in counts], dict(meta or {}))

    @classmethod
    def flat(cls, sps: float = 1.0) -> SPSTable:
        """A table where every batch size costs the same (verification is free)."""
        return cls([1], [sps], {"kind": "flat", "flat_tail": True})

    def sps_many(self, num_tokens: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`sps` over an array of token counts (float64 result)."""
        b = np.asarray(num_tokens, dtype=np.float64)
        out = np.interp(b, self._b, self._s)
        if not self.meta.get("flat_tail", False):
            tail = b > self._b[-1]
            out = np.where(tail, self._s[-1] * self._b[-1] / np.maximum(b, 1.0), out)
        return out

    def sps(self, num_tokens: int) -> float:
        v = self._memo.get(num_tokens)
        if v is None:
            v = float(self.sps_many(np.array([num_tokens]))[0])
            if len(self._memo) < 4096:
                self._memo[num_tokens] = v
        return v

    def to_json(self) -> dict[str, Any]:
        """Upstream ``SpsCostTable`` fields plus ``meta`` (an additive source is re-emitted)."""
        additive = self.meta.get("additive")
        if isinstance(additive, dict):
            return {**additive, "meta": self.meta}
        return {"sample_batch_tokens": self.token_counts,
                "sample_steps_per_sec": self.sps_values,
                "max_batch_tokens": int(self.meta.get("max_batch_tokens", self.token_counts[-1])),
                "meta": self.meta}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SPSTable:
        meta = dict(obj.get("meta") or {})
        if "bias_seconds" in obj:
            return cls.from_additive(obj, meta)
        if "sample_batch_tokens" in obj:
            counts, sps = list(obj["sample_batch_tokens"]), list(obj["sample_steps_per_sec"])
            if list(counts) != sorted(set(counts)):
                raise ValueError("sample_batch_tokens must be strictly increasing")
            if "max_batch_tokens" in obj:
                meta["max_batch_tokens"] = int(obj["max_batch_tokens"])
            return cls(counts, sps, meta)
        return cls(list(obj["token_counts"]), list(obj["sps"]), meta)

    @classmethod
    def from_additive(cls, obj: Mapping[str, Any], meta: dict[str, Any] | None = None
                      ) -> SPSTable:
        """Curve over total verify tokens from upstream's ``SpsAdditiveCostTable`` JSON."""
        fields_ = ("bias_seconds", "bs_probes", "alpha_seconds", "m_probes", "theta_seconds")
        additive = {k: obj[k] for k in fields_}
        meta = {k: v for k, v in (meta or {}).items() if k != "additive"}
        per_req = max(1, int(meta.get("tokens_per_request", 8)))
        bs = np.asarray(additive["bs_probes"], dtype=np.float64)
        ms = np.asarray(additive["m_probes"], dtype=np.float64)
        if float(additive["bias_seconds"]) <= 0 or len(bs) != len(additive["alpha_seconds"]) \
                or len(ms) != len(additive["theta_seconds"]) or not len(bs) or not len(ms):
            raise ValueError("malformed additive SPS table")
        top = int(max(ms[-1], 1))
        counts = sorted({1, top, *(2**i for i in range(top.bit_length())
                                   if 2**i <= top)})
        b = np.asarray(counts, dtype=np.float64)
        reqs = np.ceil(b / per_req)
        step = (float(additive["bias_seconds"]) + np.interp(reqs, bs, additive["alpha_seconds"])
                + np.interp(b, ms, additive["theta_seconds"]))  # interp clamps like upstream
        meta.update(additive=additive, tokens_per_request=per_req, kind="additive")
        return cls(counts, (1.0 / step).tolist(), meta)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> SPSTable:
        return cls.from_json(json.loads(Path(path).read_text()))


def profile_sps(
    step_fn: Callable[[int], None],
    token_counts: Sequence[int],
    repeats: int = 5,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    prime_s: float = 0.04,
    max_prime_calls: int = 10,
) -> SPSTable:
    """Time ``step_fn(b)`` (one target forward over ``b`` tokens) for each ``b``.

    ``step_fn`` must return only when the forward is finished (on GPU: synchronise inside it).
    Each count gets ``warmup`` untimed calls, then ``repeats`` timed ones taken in rounds over
    all counts (1, 2, 4, ..., 1, 2, 4, ...), so a burst of load from another process lands on
    one round of every count rather than on several calls of one count; the table stores
    ``1 / median(call time)``. Every timed call directly follows untimed calls of the same
    count (at least one, until ``prime_s`` seconds or ``max_prime_calls`` calls), so it is
    measured as steady decoding at that size runs: right after a large count, small ones run
    slow for several calls (session 13's Xeon: 1 token 5.5, 5.4, 4.3, 3.9, 3.3 ms, then 2.9 ms
    steady over ~30 ms after a 256-token forward), and a table profiled without priming
    priced 1-4 tokens at 2x, so the draft budget took a drafting step for cheaper than it was.
    ``clock`` is injectable for tests.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    counts = sorted({int(x) for x in token_counts})
    for b in counts:
        for _ in range(warmup):
            step_fn(b)
    times: dict[int, list[float]] = {b: [] for b in counts}
    for _ in range(repeats):
        for b in counts:
            t_prime, n_prime = clock(), 0
            while n_prime < max(1, max_prime_calls) and (
                    n_prime == 0 or clock() - t_prime < prime_s):
                step_fn(b)  # untimed: the machine settles at this count
                n_prime += 1
            t0 = clock()
            step_fn(b)
            times[b].append(clock() - t0)
    measurements = {b: 1.0 / max(statistics.median(t), 1e-9) for b, t in times.items()}
    return SPSTable.from_measurements(
        measurements, {"repeats": repeats, "warmup": warmup, "kind": "profiled"}
    )
