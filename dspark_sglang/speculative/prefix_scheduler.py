"""DSpark's hardware-aware prefix scheduler: how many draft tokens of each request to verify.

Inputs per request ``r``: calibrated confidences ``c_{r,1..L_r}`` (``c_{r,j}`` = probability that
draft ``j`` survives given drafts ``1..j-1`` survived) and the engine's :class:`SPSTable`.

Definitions (DESIGN.md §2)::

    a_{r,j} = prod_{i<=j} c_{r,i}                  prefix survival (non-increasing in j)
    B       = sum_r (1 + l_r)                      verify tokens (anchor + admitted drafts)
    tau     = sum_r (1 + sum_{j<=l_r} a_{r,j})     expected emitted tokens this round
    objective = tau * SPS(B)                       expected emitted tokens per second

Exact stop rule (non-anticipating). Candidates ``(r, j)`` with ``j <= min(L_r, max_lengths[r])``
are ordered by descending ``a_{r,j}``, ties by lower ``j``, then lower ``r``. Start from ``l_r = 0``
for all requests (``B = bs``, ``tau = bs``). Scan the candidates in order; candidate ``(r, j)`` is
admitted iff ``(r, j - 1)`` is admitted (or ``j == 1``; guaranteed by this order, since
``a_{r,j}`` is non-increasing in ``j``, and asserted), ``B + 1 <= max_num_verify_tokens`` (if
given) and ``(tau + a_{r,j}) * SPS(B + 1) > tau * SPS(B)`` (strictly). The first candidate that is
not admitted ends the scan: nothing after it is admitted, even if admitting several more would
raise the objective again (e.g. past a step in the SPS curve). The implementation evaluates the
objective of every prefix of the order at once with numpy; the decision is the same as the scan.

The decision depends only on drafter-side information (confidences) and the profile, never on the
target's verdict on any draft token, so verification stays lossless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dspark_sglang.speculative.sps_profile import SPSTable

ConfidenceInput = Sequence[Sequence[float]] | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class ScheduleDecision:
    lengths: list[int]  # l_r: draft tokens of request r to verify (0 = anchor only)
    expected_tau: float  # sum_r (1 + sum_{j<=l_r} a_{r,j}); NaN when confidences are unknown
    num_verify_tokens: int  # B = sum_r (1 + l_r)
    objective: float  # expected_tau * SPS(B); NaN when not computable


def _pad_confidences(
    confidences: ConfidenceInput, draft_lens: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``conf [bs, L]`` float64 (clipped to [0, 1], NaN -> 0) and ``avail [bs]`` int64."""
    if isinstance(confidences, torch.Tensor | np.ndarray):
        conf = np.asarray(
            confidences.detach().cpu().double().numpy()
            if isinstance(confidences, torch.Tensor)
            else confidences,
            dtype=np.float64,
        )
        if conf.ndim != 2:
            raise ValueError("confidence tensor must be [bs, L]")
        avail = np.full(conf.shape[0], conf.shape[1], dtype=np.int64)
    else:
        rows = [list(map(float, c)) for c in confidences]
        width = max((len(c) for c in rows), default=0)
        conf = np.zeros((len(rows), width), dtype=np.float64)
        for r, c in enumerate(rows):
            conf[r, : len(c)] = c
        avail = np.array([len(c) for c in rows], dtype=np.int64)
    if draft_lens is not None:
        avail = np.minimum(avail, np.asarray(draft_lens, dtype=np.int64))
    return np.clip(np.nan_to_num(conf, nan=0.0), 0.0, 1.0), avail


def _prefix_survival(conf: np.ndarray) -> np.ndarray:
    # the running minimum is a no-op after clipping to [0, 1]; it makes monotonicity explicit
    return np.minimum.accumulate(np.cumprod(conf, axis=1), axis=1)  # [bs, L]


# up to this many (request, position) candidates the rule runs as a plain Python scan (a decode
# step's few requests: ~30 us, where the numpy form's ~20 array calls cost ~0.3 ms); both forms
# compute every quantity with the same float64 operations in the same order (tested equal)
SMALL_CANDIDATES = 256


def _small_rows(confidences: ConfidenceInput, max_lengths: Sequence[int] | None
                ) -> list[list[float]] | None:
    """Per request its confidences cut to ``max_lengths`` and clipped as ``_pad_confidences``
    does, or None when there are more than ``SMALL_CANDIDATES`` of them."""
    if isinstance(confidences, torch.Tensor | np.ndarray):
        shape = tuple(confidences.shape)
        if len(shape) != 2 or shape[0] * shape[1] > SMALL_CANDIDATES:
            return None  # (a wrong shape gets the numpy form's error)
        rows = (confidences.detach().cpu().double().tolist()
                if isinstance(confidences, torch.Tensor)
                else np.asarray(confidences, dtype=np.float64).tolist())
    else:
        if sum(len(c) for c in confidences) > SMALL_CANDIDATES:
            return None
        rows = [[float(x) for x in c] for c in confidences]
    if max_lengths is not None:
        rows = [r[: max(0, int(m))] for r, m in zip(rows, max_lengths)]
    return [[0.0 if x != x else min(max(x, 0.0), 1.0) for x in r] for r in rows]


def _schedule_scan(rows: list[list[float]], sps_table: SPSTable,
                   max_num_verify_tokens: int | None) -> ScheduleDecision:
    """:func:`schedule_prefix` on few candidates: the scan of the module docstring, literally."""
    bs = len(rows)
    cands = []
    for r, row in enumerate(rows):
        p = surv = 1.0
        for j, c in enumerate(row):
            p = c if j == 0 else p * c  # numpy's cumprod, then its running minimum
            surv = p if j == 0 else min(surv, p)
            cands.append((-surv, j, r))
    cands.sort()
    num_cand = len(cands)
    if max_num_verify_tokens is not None:
        num_cand = min(num_cand, max(0, max_num_verify_tokens - bs))
    sps = [sps_table.sps(b) for b in range(bs, bs + num_cand + 1)]  # (memoised: the same values)
    lengths = [0] * bs
    acc, tau = 0.0, float(bs)
    objective = tau * sps[0]
    k = 0
    while k < num_cand:
        neg_a, _, r = cands[k]
        acc_next = acc - neg_a
        tau_next = bs + acc_next
        obj_next = tau_next * sps[k + 1]
        if not obj_next > objective:
            break
        acc, tau, objective = acc_next, tau_next, obj_next
        lengths[r] += 1
        k += 1
    return ScheduleDecision(lengths=lengths, expected_tau=tau, num_verify_tokens=bs + k,
                            objective=objective)


def schedule_prefix(
    confidences: ConfidenceInput,
    sps_table: SPSTable,
    max_lengths: Sequence[int] | None = None,
    max_num_verify_tokens: int | None = None,
) -> ScheduleDecision:
    """Choose per-request verify lengths by the rule in the module docstring.

    ``confidences``: per request a list of ``L_r`` floats, or a ``[bs, L]`` tensor/array (all rows
    ``L`` long; use ``max_lengths`` to cut rows). ``max_lengths[r]`` caps ``l_r`` (e.g. remaining
    ``max_new_tokens`` or grammar limits). Cost: one sort of ``sum_r L_r`` candidates.
    """
    rows = _small_rows(confidences, max_lengths)
    if rows is not None:
        return _schedule_scan(rows, sps_table, max_num_verify_tokens)
    conf, avail = _pad_confidences(confidences, max_lengths)
    return _schedule_numpy(conf, avail, sps_table, max_num_verify_tokens)


def _schedule_numpy(conf: np.ndarray, avail: np.ndarray, sps_table: SPSTable,
                    max_num_verify_tokens: int | None) -> ScheduleDecision:
    """:func:`schedule_prefix` as array operations over ``_pad_confidences``' output (any
    number of candidates)."""
    bs, width = conf.shape
    if bs == 0:
        return ScheduleDecision([], 0.0, 0, 0.0)
    surv = _prefix_survival(conf)  # [bs, L]
    valid = np.arange(width)[None, :] < avail[:, None]  # [bs, L]
    # enumerate candidates position-major, so a stable sort on -a breaks ties by lower j, then r
    j_idx, r_idx = np.nonzero(valid.T)  # j_idx is 0-based: draft j_idx + 1
    a = surv[r_idx, j_idx]
    order = np.argsort(-a, kind="stable")
    r_sorted, j_sorted, a_sorted = r_idx[order], j_idx[order], a[order]

    num_cand = len(order)
    if max_num_verify_tokens is not None:
        num_cand = min(num_cand, max(0, max_num_verify_tokens - bs))

    tau = bs + np.concatenate([[0.0], np.cumsum(a_sorted[:num_cand])])  # [num_cand + 1]
    num_tokens = bs + np.arange(num_cand + 1)  # [num_cand + 1]
    objective = tau * sps_table.sps_many(num_tokens)  # [num_cand + 1]
    improves = objective[1:] > objective[:-1]  # [num_cand]
    k_star = int(np.argmin(improves)) if not improves.all() else num_cand

    lengths = np.bincount(r_sorted[:k_star], minlength=bs)
    # Prefix constraint: (r, j) is admitted only after (r, j - 1). It holds by construction
    # (a is non-increasing in j and ties go to lower j); distinct positions 0..l-1 are the only
    # set of l admitted positions whose sum is l(l-1)/2, which is what this checks.
    pos_sum = np.bincount(r_sorted[:k_star], weights=j_sorted[:k_star], minlength=bs)
    assert np.array_equal(pos_sum, lengths * (lengths - 1) / 2), "prefix constraint violated"
    return ScheduleDecision(
        lengths=lengths.tolist(),
        expected_tau=float(tau[k_star]),
        num_verify_tokens=int(num_tokens[k_star]),
        objective=float(objective[k_star]),
    )


def fixed_lengths(
    draft_lens: Sequence[int],
    max_lengths: Sequence[int] | None = None,
    confidences: ConfidenceInput | None = None,
    sps_table: SPSTable | None = None,
) -> ScheduleDecision:
    """Scheduler off: verify every proposed draft (capped by ``max_lengths``).

    ``expected_tau`` is computed when confidences are given (else NaN); ``objective`` when both
    confidences and a table are given (else NaN).
    """
    lengths = np.asarray(draft_lens, dtype=np.int64)
    if max_lengths is not None:
        lengths = np.minimum(lengths, np.asarray(max_lengths, dtype=np.int64))
    lengths = np.maximum(lengths, 0)
    num_tokens = int(len(lengths) + lengths.sum())
    tau = float("nan")
    if confidences is not None:
        conf, avail = _pad_confidences(confidences, None)
        if np.any(avail < lengths):
            raise ValueError("fewer confidences than draft tokens to verify")
        surv = _prefix_survival(conf)
        admitted = np.arange(conf.shape[1])[None, :] < lengths[:, None]
        tau = float(len(lengths) + (surv * admitted).sum())
    objective = float("nan")
    if sps_table is not None and confidences is not None:
        objective = tau * sps_table.sps(num_tokens)
    return ScheduleDecision(lengths.tolist(), tau, num_tokens, objective)


class PrefixScheduler:
    """Holds the engine's SPS table and verify-token budget; see :func:`schedule_prefix`."""

    def __init__(self, sps_table: SPSTable, max_num_verify_tokens: int | None = None) -> None:
        self.sps_table = sps_table
        self.max_num_verify_tokens = max_num_verify_tokens

    def schedule(
        self, confidences: ConfidenceInput, max_lengths: Sequence[int] | None = None
    ) -> ScheduleDecision:
        return schedule_prefix(confidences, self.sps_table, max_lengths, self.max_num_verify_tokens)
