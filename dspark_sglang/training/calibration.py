"""Sequential Temperature Scaling (STS) of the DSpark confidence head, and calibration metrics.

The prefix scheduler consumes survival ``a_k = Π_{i≤k} c_i``, where per-position errors compound,
so STS fits each position's temperature against the *cumulative* product (DSpark paper §3.2.1;
SGLang ``dspark_sts_fit``): left to right, with ``T_0 .. T_{k-1}`` frozen, pick ``T_k`` from a
grid minimising ``ECE(a_{k-1} · sigmoid(z_k / T_k), accepted_prefix_k)``.

Conventions (SGLang's): grid ``logspace(0.1, 10, 41)``; ECE with 15 equal-width bins, bin index
``floor(p · bins)`` clamped, probabilities clamped to ``[1e-8, 1 - 1e-8]``. Ties keep the
temperature closest to 1 (then the smaller). Everything here is numpy; no sklearn.
"""

from __future__ import annotations

import numpy as np

from dspark_sglang.speculative.dspark.confidence import StsCalibration

EPS_PROB = 1e-8
NUM_BINS = 15


def default_temperature_grid() -> np.ndarray:
    return np.logspace(np.log10(0.1), np.log10(10.0), 41)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def expected_calibration_error(
    probs: np.ndarray, targets: np.ndarray, num_bins: int = NUM_BINS
) -> float:
    """``Σ_b (n_b / n) · |mean p_b − mean y_b|`` over equal-width bins; nan when empty."""
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), EPS_PROB, 1.0 - EPS_PROB)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and targets {y.shape} differ")
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    count = np.bincount(idx, minlength=num_bins).astype(np.float64)
    p_sum = np.bincount(idx, weights=p, minlength=num_bins)
    y_sum = np.bincount(idx, weights=y, minlength=num_bins)
    denom = np.maximum(count, 1.0)
    return float(np.sum(np.abs(p_sum / denom - y_sum / denom) * count) / p.size)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann–Whitney rank statistic (ties get average ranks).

    nan when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty_like(s)
    i = 0
    while i < s.size:  # average rank over runs of equal scores
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def prefix_labels(accepted: np.ndarray) -> np.ndarray:
    """``accepted [N, k]`` per-position flags -> prefix form (all drafts ``≤ k`` accepted)."""
    return np.cumprod(np.asarray(accepted, dtype=bool), axis=1).astype(bool)


def apply_sts(conf_logits: np.ndarray, temps: np.ndarray) -> np.ndarray:
    """Per-position calibrated confidences ``sigmoid(z_k / T_k)``: ``[N, k] -> [N, k]``."""
    z = np.asarray(conf_logits, dtype=np.float64)
    return sigmoid(z / np.asarray(temps, dtype=np.float64)[: z.shape[-1]])


def survival(conf_logits: np.ndarray, temps: np.ndarray | None = None) -> np.ndarray:
    """Cumulative products ``a_k = Π_{i≤k} sigmoid(z_i / T_i)``: ``[N, k] -> [N, k]``."""
    z = np.asarray(conf_logits, dtype=np.float64)
    t = np.ones(z.shape[-1]) if temps is None else np.asarray(temps, dtype=np.float64)
    return np.cumprod(apply_sts(z, t), axis=1)


def _ordered_grid(grid: np.ndarray) -> np.ndarray:
    """Grid sorted so that, scanned with strict ``<``, ties keep the value closest to 1."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size == 0 or np.any(~np.isfinite(g)) or np.any(g <= 0):
        raise ValueError("temperature grid must be a non-empty vector of positive values")
    return g[np.lexsort((g, np.abs(np.log(g))))]


def fit_sts_calibration(
    conf_raw: np.ndarray,
    accepted: np.ndarray,
    observed: np.ndarray | None = None,
    grid: np.ndarray | None = None,
    num_bins: int = NUM_BINS,
    dataset: str = "",
) -> StsCalibration:
    """Fit STS and report ECE of the survival before (T = 1) and after, per position.

    ``conf_raw [N, k]``: raw confidence-head *logits*; ``accepted [N, k]`` bool per-position
    acceptance (converted to prefix form); ``observed [N, k]`` bool marks positions that were
    actually verified (a shorter verify window leaves later positions unobserved; those rows are
    left out of that position's ECE, unless an earlier draft was rejected, which fixes the prefix
    label at 0). Positions with no observation keep ``T = 1``.
    """
    z = np.asarray(conf_raw, dtype=np.float64)
    labels = prefix_labels(accepted).astype(np.float64)
    if z.ndim != 2 or labels.shape != z.shape:
        raise ValueError(f"conf_raw {z.shape} and accepted {labels.shape} must both be [N, k]")
    obs = np.ones_like(labels, dtype=bool) if observed is None else np.asarray(observed, bool)
    # after a rejection every later prefix label is known to be 0, verified or not
    broken_before = np.concatenate([np.zeros((z.shape[0], 1)), 1.0 - labels[:, :-1]], axis=1)
    obs = obs | (broken_before > 0)
    g = _ordered_grid(default_temperature_grid() if grid is None else grid)
    n, k = z.shape
    temps, ece_before, ece_after = [], [], []
    surv_raw = np.ones(n)
    surv_fit = np.ones(n)
    for j in range(k):
        rows = obs[:, j]
        surv_raw = surv_raw * sigmoid(z[:, j])
        if not rows.any():
            temps.append(1.0)
            ece_before.append(float("nan"))
            ece_after.append(float("nan"))
            surv_fit = surv_fit * sigmoid(z[:, j])
            continue
        y = labels[rows, j]
        ece_before.append(expected_calibration_error(surv_raw[rows], y, num_bins))
        best_t, best_e = 1.0, float("inf")
        for t in g:
            e = expected_calibration_error(surv_fit[rows] * sigmoid(z[rows, j] / t), y, num_bins)
            if e < best_e:
                best_t, best_e = float(t), e
        temps.append(best_t)
        ece_after.append(best_e)
        surv_fit = surv_fit * sigmoid(z[:, j] / best_t)
    return StsCalibration(temperatures=temps, dataset=dataset, num_samples=n,
                          ece_before=ece_before, ece_after=ece_after)


def fit_sts(
    conf_raw: np.ndarray,
    accepted: np.ndarray,
    observed: np.ndarray | None = None,
    grid: np.ndarray | None = None,
    num_bins: int = NUM_BINS,
) -> np.ndarray:
    """STS temperatures ``[k]`` (see :func:`fit_sts_calibration`)."""
    cal = fit_sts_calibration(conf_raw, accepted, observed, grid, num_bins)
    return np.asarray(cal.temperatures, dtype=np.float64)
