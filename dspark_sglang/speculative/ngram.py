"""Prompt-lookup (n-gram) drafting: no weights, proposals copied from the request's own context."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    """Propose the tokens that followed the most recent earlier occurrence of the context suffix.

    For ``n`` from ``max_ngram`` down to ``min_ngram``: if the last ``n`` tokens occurred earlier
    in ``token_ids`` (an occurrence ending before the last token), return up to
    ``num_draft_tokens`` tokens that followed its most recent such occurrence (the continuation
    may run into the suffix itself, and may be shorter than asked near the end). No match: ``[]``.

    Cost: one vectorised numpy comparison of the whole context against the last token, then
    ``max_ngram - 1`` filters over the surviving candidate end positions only, so ``O(len)`` per
    call with a small constant (well under a millisecond for 8k-token contexts); no index is kept
    between calls, so it needs no cleanup when a request is aborted or its context is edited.
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, num_draft_tokens: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if num_draft_tokens < 0:
            raise ValueError("num_draft_tokens must be >= 0")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.num_draft_tokens = num_draft_tokens

    def propose(self, token_ids: Sequence[int], num_draft_tokens: int | None = None) -> list[int]:
        k = self.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        n_ctx = len(token_ids)
        if k <= 0 or n_ctx < self.min_ngram + 1:
            return []
        arr = np.asarray(token_ids, dtype=np.int64)  # [n_ctx]
        # candidate end positions e (< n_ctx - 1) of earlier occurrences of the 1-gram suffix
        ends = np.flatnonzero(arr[:-1] == arr[-1])
        best_ends: np.ndarray | None = ends if self.min_ngram == 1 and ends.size else None
        max_n = min(self.max_ngram, n_ctx - 1)
        for n in range(2, max_n + 1):
            ends = ends[ends >= n - 1]
            ends = ends[arr[ends - (n - 1)] == arr[n_ctx - n]]
            if ends.size == 0:
                break
            if n >= self.min_ngram:
                best_ends = ends
        if best_ends is None:
            return []
        start = int(best_ends[-1]) + 1
        return arr[start : start + k].tolist()
