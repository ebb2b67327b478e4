"""Per-request results and their summary for one (mode, load level) cell of a benchmark.

Accepted length ``tau`` is computed per request, as SGLang defines it: completion tokens over
verify steps (``meta_info.spec_verify_ct``); the summary pools requests (sum over sum). Verify
tokens per step come in two forms: per request (``1 + drafted tokens`` averaged over that request's
steps) and per batch step (all running requests' verify tokens in one target forward, from the
engine's ``spec_stats``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """One finished (or failed) request. ``latency_s`` is submit-to-last-token."""

    index: int
    domain: str
    latency_s: float
    completion_tokens: int = 0
    spec_verify_ct: int = 0
    spec_draft_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float | None = None
    error: str | None = None

    @classmethod
    def from_output(cls, index: int, domain: str, latency_s: float, out: dict[str, Any]
                    ) -> RequestResult:
        """From an SGLang-shaped output dict (``text``, ``output_ids``, ``meta_info``)."""
        meta = out.get("meta_info", {}) or {}
        ids = list(out.get("output_ids") or [])
        return cls(index=index, domain=domain, latency_s=latency_s,
                   completion_tokens=int(meta.get("completion_tokens", len(ids))),
                   spec_verify_ct=int(meta.get("spec_verify_ct") or 0),
                   spec_draft_tokens=int(meta.get("spec_draft_tokens") or 0),
                   output_ids=ids, text=str(out.get("text", "")))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def tau_of(results: list[RequestResult]) -> float | None:
    """Pooled accepted length: sum of completion tokens / sum of verify steps."""
    steps = sum(r.spec_verify_ct for r in results)
    return sum(r.completion_tokens for r in results) / steps if steps else None


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    """Throughput, latency and acceptance of one load level.

    ``output_tok_s`` is aggregate (all completion tokens / wall time); ``per_user_tok_s`` is the
    mean over requests of completion tokens / that request's latency.
    """
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    steps = sum(r.spec_verify_ct for r in ok)
    per_user = [r.completion_tokens / r.latency_s for r in ok if r.latency_s > 0]
    by_domain: dict[str, list[RequestResult]] = defaultdict(list)
    for r in ok:
        by_domain[r.domain].append(r)
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "num_requests": len(results),
        "num_errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,
        "per_user_tok_s": statistics.fmean(per_user) if per_user else None,
        "latency_p50_s": _percentile(lat, 0.5),
        "latency_p99_s": _percentile(lat, 0.99),
        "ttft_p50_s": _percentile(ttft, 0.5),
        "tau": tau_of(ok),
        "verify_tokens_per_req_step": ((steps + sum(r.spec_draft_tokens for r in ok)) / steps
                                       if steps else None),
        "tau_by_domain": {d: tau_of(rs) for d, rs in sorted(by_domain.items())},
    }


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """Engine-wide spec stats over an interval from two ``spec_stats`` snapshots.

    Exact for steps, tokens per step and verify tokens per batch step (averages times step
    counts); per-position acceptance is taken from ``after`` when ``before`` is given (the
    snapshots carry rates only), so reset the stats before a run where that matters.
    """
    s1 = int(after.get("steps", 0))
    s0 = int(before.get("steps", 0)) if before else 0
    steps = s1 - s0

    def total(snap: dict[str, Any] | None, key: str) -> float:
        return float(snap.get(key, 0.0)) * int(snap.get("steps", 0)) if snap else 0.0

    def raw(snap: dict[str, Any] | None, key: str) -> float:
        return float(snap.get(key, 0.0)) if snap else 0.0

    if "emitted_tokens" in after:  # raw counters (engine >= this version)
        emitted = raw(after, "emitted_tokens") - raw(before, "emitted_tokens")
        verify = raw(after, "verify_tokens") - raw(before, "verify_tokens")
    else:
        emitted = (total(after, "avg_spec_accept_length")
                   - total(before, "avg_spec_accept_length"))
        verify = (total(after, "avg_verify_tokens_per_step")
                  - total(before, "avg_verify_tokens_per_step"))
    return {
        "batch_steps": steps,
        "tokens_per_batch_step": emitted / steps if steps else None,
        "verify_tokens_per_batch_step": verify / steps if steps else None,
        "per_position_acceptance": list(after.get("per_position_acceptance") or []),
        "per_position_is_cumulative": before is not None,
    }
