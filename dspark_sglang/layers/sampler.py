"""Turning logits into tokens: temperature, top-k, top-p, min-p, seeded sampling.

Everything here is a pure function of tensors plus per-row generators; no module state. The same
code serves plain decoding (one logit row per request) and speculative verification (several rows
per request, see :meth:`SamplingBatchInfo.expand`).

Filter semantics (applied in this order, all vectorised over rows with different parameters):

1. temperature: ``logits / T``; rows with ``T == 0`` or ``top_k == 1`` are *greedy*.
2. top-k: keep the ``k`` highest-scoring tokens by rank (ties broken towards the lower token id,
   so exactly ``k`` tokens survive). ``k <= 0`` means off.
3. top-p: on the distribution renormalised after top-k, keep the shortest rank prefix whose mass
   reaches ``top_p`` (a token is kept when the mass strictly before it is ``< top_p``; the first
   token is always kept). ``top_p >= 1`` means off.
4. min-p: keep tokens with ``p >= min_p * max_p`` (scale invariant, so the order relative to the
   renormalisations does not matter). ``min_p <= 0`` means off.

Greedy rows become a one-hot of ``argmax(logits)``; ``torch.argmax`` returns the first maximum, so
ties go to the lowest token id. Logprobs reported to users come from :func:`compute_logprobs` on
the raw logits (before temperature and filters), as SGLang reports them by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for a seeded request. The request owns it and it advances with every
    draw."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


@dataclass
class SamplingBatchInfo:
    """Per-row sampling parameters of ``n`` logit rows.

    ``generators[i]`` is the request's own generator (shared by all rows of one request after
    :meth:`expand`) or None to use torch's global RNG. Draws are made in row order, one uniform
    per non-greedy row, so a seeded request's samples do not depend on what else is in the batch.
    """

    temperatures: torch.Tensor  # [n] float32, 0 for greedy rows
    top_ks: torch.Tensor  # [n] int64, <= 0 = off
    top_ps: torch.Tensor  # [n] float32
    min_ps: torch.Tensor  # [n] float32
    is_greedy: torch.Tensor  # [n] bool
    generators: list[torch.Generator | None]

    @classmethod
    def from_lists(
        cls,
        temperatures: Sequence[float],
        top_ks: Sequence[int] | None = None,
        top_ps: Sequence[float] | None = None,
        min_ps: Sequence[float] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingBatchInfo:
        """Build from per-request Python lists (missing lists mean "filter off")."""
        n = len(temperatures)
        top_ks = list(top_ks) if top_ks is not None else [-1] * n
        top_ps = list(top_ps) if top_ps is not None else [1.0] * n
        min_ps = list(min_ps) if min_ps is not None else [0.0] * n
        gens = list(generators) if generators is not None else [None] * n
        if not (len(top_ks) == len(top_ps) == len(min_ps) == len(gens) == n):
            raise ValueError("all per-request lists must have the same length")
        if any(t < 0 for t in temperatures):
            raise ValueError("temperature must be >= 0")
        greedy = [t == 0.0 or k == 1 for t, k in zip(temperatures, top_ks)]
        return cls(
            temperatures=torch.tensor(list(temperatures), dtype=torch.float32, device=device),
            top_ks=torch.tensor(top_ks, dtype=torch.int64, device=device),
            top_ps=torch.tensor(top_ps, dtype=torch.float32, device=device),
            min_ps=torch.tensor(min_ps, dtype=torch.float32, device=device),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            generators=gens,
        )

    @property
    def num_rows(self) -> int:
        return int(self.temperatures.shape[0])

    @property
    def all_greedy(self) -> bool:
        return bool(self.is_greedy.all())

    def expand(self, rows_per_req: Sequence[int]) -> SamplingBatchInfo:
        """Repeat request ``i``'s parameters over ``rows_per_req[i]`` consecutive rows."""
        if len(rows_per_req) != self.num_rows:
            raise ValueError("rows_per_req must have one entry per request")
        reps = torch.tensor(list(rows_per_req), dtype=torch.int64, device=self.temperatures.device)
        gens: list[torch.Generator | None] = []
        for g, r in zip(self.generators, rows_per_req):
            gens.extend([g] * r)
        return SamplingBatchInfo(
            temperatures=self.temperatures.repeat_interleave(reps),
            top_ks=self.top_ks.repeat_interleave(reps),
            top_ps=self.top_ps.repeat_interleave(reps),
            min_ps=self.min_ps.repeat_interleave(reps),
            is_greedy=self.is_greedy.repeat_interleave(reps),
            generators=gens,
        )


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` in float32 of the raw logits (no temperature): the user-facing logprobs."""
    return torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]


def _filter_keep_mask(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Bool mask of tokens that survive top-k, top-p and min-p. probs: [n, vocab], rows sum to 1."""
    vocab = probs.shape[1]
    # stable descending sort: equal probabilities keep ascending token order (lower id first)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [n, vocab]
    rank = torch.arange(vocab, device=probs.device).unsqueeze(0)  # [1, vocab]

    k = info.top_ks.clamp(min=0)
    k = torch.where(k <= 0, torch.full_like(k, vocab), k).unsqueeze(1)  # [n, 1]
    keep_sorted = rank < k  # [n, vocab]

    topk_probs = sorted_probs * keep_sorted
    topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    mass_before = torch.cumsum(topk_probs, dim=-1) - topk_probs
    top_p = info.top_ps.unsqueeze(1)  # [n, 1]
    keep_sorted &= (mass_before < top_p) | (top_p >= 1.0) | (rank == 0)

    max_p = sorted_probs[:, :1]  # [n, 1]
    keep_sorted &= sorted_probs >= info.min_ps.unsqueeze(1) * max_p

    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep  # [n, vocab]


def logits_to_probs(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Filtered, renormalised sampling distribution per row.

    ``logits``: ``[n, vocab]`` (``-inf`` allowed, e.g. grammar masks, but not a whole row).
    Returns ``[n, vocab]`` float32; greedy rows are one-hot at ``argmax(logits)``. Does not modify
    ``logits``.
    """
    assert logits.dim() == 2 and logits.shape[0] == info.num_rows, "logits must be [n, vocab]"
    logits = logits.float()
    temps = torch.where(info.is_greedy, torch.ones_like(info.temperatures), info.temperatures)
    probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)  # [n, vocab]
    needs_filter = bool(((info.top_ks > 0) | (info.top_ps < 1.0) | (info.min_ps > 0.0)).any())
    if needs_filter:
        probs = probs * _filter_keep_mask(probs, info)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if bool(info.is_greedy.any()):
        one_hot = torch.zeros_like(probs)
        one_hot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(info.is_greedy.unsqueeze(1), one_hot, probs)
    return probs


def draw_uniforms(
    generators: Sequence[torch.Generator | None],
    counts: Sequence[int],
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """``counts[i]`` uniforms in ``[0, 1)`` for row group ``i``, drawn in order from its generator.

    Groups without a generator draw from torch's global RNG (one batched call). Returned tensors
    are float64 on ``device``.
    """
    empty = torch.empty(0, dtype=torch.float64, device=device)
    out: list[torch.Tensor] = [empty] * len(counts)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        flat = torch.rand(sum(counts[i] for i in unseeded), dtype=torch.float64).to(device)
        offset = 0
        for i in unseeded:
            out[i] = flat[offset : offset + counts[i]]
            offset += counts[i]
    for i, g in enumerate(generators):
        if g is not None:
            u = torch.rand(counts[i], generator=g, dtype=torch.float64, device=g.device)
            out[i] = u.to(device)
    return out


def sample_with_uniforms(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row ``i`` picks the token where its CDF first exceeds ``u_i``.

    ``probs``: ``[n, vocab]`` non-negative (need not be normalised, must not be all zero);
    ``uniforms``: ``[n]`` in ``[0, 1)``. Zero-probability tokens are never returned.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)  # [n, vocab]
    target = uniforms.double().unsqueeze(1) * cdf[:, -1:]  # [n, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [n]
    # rounding can put the target at the very end; fall back to the last token with mass
    vocab = probs.shape[1]
    last_nonzero = vocab - 1 - torch.argmax((probs > 0).flip(-1).to(torch.int8), dim=-1)
    return torch.minimum(idx, last_nonzero)


def sample(
    probs: torch.Tensor, info: SamplingBatchInfo, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from ``probs`` (``[n, vocab]``, from :func:`logits_to_probs`).

    Greedy rows take ``argmax`` (of ``logits`` if given, else of ``probs``; ties -> lowest id) and
    consume no random numbers. Every other row draws exactly one uniform from its generator, in row
    order. Returns ``[n]`` int64.
    """
    n = probs.shape[0]
    assert n == info.num_rows
    greedy_src = logits if logits is not None else probs
    tokens = greedy_src.argmax(dim=-1)  # [n]
    if info.all_greedy:
        return tokens
    greedy_list = info.is_greedy.tolist()
    rows = [i for i in range(n) if not greedy_list[i]]
    uniforms = draw_uniforms([info.generators[i] for i in rows], [1] * len(rows), probs.device)
    u = torch.cat(uniforms)  # [num_sampled]
    rows_t = torch.tensor(rows, dtype=torch.int64, device=probs.device)
    tokens[rows_t] = sample_with_uniforms(probs[rows_t], u)
    return tokens
