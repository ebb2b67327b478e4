"""Reduced draft vocabulary ("token map", FR-Spec style; SGLang's ``--speculative-token-map``).

On a CPU the drafter's cost per step is dominated by reading the target's LM head
(49k x 576 floats for SmolLM2: 113 MB per call) and the Markov head's ``W2`` once per drafted
position. Drafting only over the ``N`` most frequent tokens reads ``N / V`` of both. Tokens
outside the map get logit ``-inf`` in the draft distribution, so they are never drafted; the
target still verifies every draft, so greedy output and the sampled distribution are unchanged
(a rejection-sampling draft may have zeros anywhere). Only acceptance can drop, by at most the
map's miss rate on the target's own tokens.

File formats read: ``.json`` (a list of ids or ``{"token_ids": [...]}``, ranked most frequent
first) and ``.pt`` (a 1-D integer tensor, the format SGLang's EAGLE token maps ship in).
``build_token_map`` ranks the answer tokens of self-distilled training data and fills the rest
in id order (BPE ids are roughly frequency ranked).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dspark_sglang.layers.linear import linear

TOKEN_MAP_FILE = "token_map.json"
FORMAT = "dspark_sglang.token_map/1"


def build_token_map(answers: Iterable[Sequence[int]], vocab_size: int, size: int) -> list[int]:
    """The ``size`` token ids ranked by frequency in ``answers``; ties and unseen ids follow in
    ascending id order."""
    counts: Counter[int] = Counter()
    for ids in answers:
        counts.update(int(t) for t in ids)
    ranked = sorted((t for t in counts if 0 <= t < vocab_size), key=lambda t: (-counts[t], t))
    seen = set(ranked)
    ranked += [t for t in range(vocab_size) if t not in seen]
    return ranked[: min(size, vocab_size)]


def save_token_map(path: str | Path, token_ids: Sequence[int], vocab_size: int,
                   source: dict[str, Any] | None = None) -> None:
    Path(path).write_text(json.dumps({"format": FORMAT, "vocab_size": vocab_size,
                                      "source": source or {}, "token_ids": list(token_ids)}))


def load_token_map(path: str | Path, size: int | None = None) -> list[int]:
    """Ranked ids from ``path`` (first ``size`` of them when given)."""
    p = Path(path)
    if p.suffix == ".pt":
        ids = [int(t) for t in torch.load(p, map_location="cpu").flatten().tolist()]
    else:
        raw = json.loads(p.read_text())
        ids = [int(t) for t in (raw["token_ids"] if isinstance(raw, dict) else raw)]
    if size is not None:
        if size < 1:
            raise ValueError("token map size must be >= 1")
        ids = ids[:size]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"token map {p} must list distinct ids")
    return ids


def resolve_token_map(drafter_dir: str | Path, choice: str | None,
                      size: int | None = None) -> list[int] | None:
    """``--speculative-token-map`` semantics: ``"none"`` = full vocabulary (None); a path = that
    file (an error when it is not one); unset = the drafter directory's ``token_map.json`` when
    it ships one, else None."""
    if choice is not None and choice.lower() == "none":
        return None
    path = Path(choice) if choice is not None else Path(drafter_dir) / TOKEN_MAP_FILE
    if not path.is_file():
        if choice is not None:
            raise ValueError(f"speculative_token_map {choice!r} is not a file")
        return None
    return load_token_map(path, size)


class DraftVocab:
    """The sub-matrices of the LM head and the Markov ``W2`` for the map's rows.

    ``logits`` / ``markov_bias`` return full-vocabulary tensors (``-inf`` / ``0`` outside the
    map), so every caller keeps working in token ids. ``dtype`` is the matmul precision of the
    sub-head (default: the LM head's). It changes drafts only, never verification. On the CPUs
    measured so far bfloat16 is the slower choice in serving even with AVX512-BF16: a one-row
    bf16 matmul ran at ~2 GB/s of weights against ~8 GB/s for float32 once the target's forward
    had evicted the rows from cache (a hot-cache micro-benchmark says the opposite).
    """

    def __init__(self, token_ids: Sequence[int], head_weight: torch.Tensor,
                 markov_weight: torch.Tensor | None, dtype: str | None = None,
                 block_head: Any = None) -> None:
        vocab = head_weight.shape[0]
        # ascending: a first-maximum argmax over the map's columns picks the token the
        # vocabulary-wide argmax picks on ties
        ids = torch.tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token map ids must lie in [0, {vocab})")
        self.vocab_size = vocab
        self.token_ids = ids.to(head_weight.device)
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"token map dtype must be float32|bfloat16|float16, got {dtype!r}")
        self.dtype = head_weight.dtype if dtype is None else getattr(torch, dtype)
        self.head_weight = head_weight.detach()[self.token_ids].to(self.dtype).contiguous()
        self.markov_weight = (None if markov_weight is None else
                              markov_weight.detach()[self.token_ids].to(self.dtype).contiguous())
        # the target's LM head on GGUF blocks (--quantization gguf): the map's rows of its own
        # blocks, so the sub-head streams 4x fewer bytes than float32 (drafts only)
        self.head_blocks = None
        self.markov_blocks = None  # the Markov head's map rows on Q8_0 blocks, likewise
        if block_head is not None and dtype in (None, "float32"):
            from dspark_sglang.layers.quantized_linear import q8_linear_of, subset_rows

            self.head_blocks = subset_rows(block_head, self.token_ids)
            if self.markov_weight is not None and self.markov_weight.shape[1] % 32 == 0:
                self.markov_blocks = q8_linear_of(self.markov_weight, block_head.ops)

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    def _scatter(self, sub: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((*sub.shape[:-1], self.vocab_size), fill, dtype=torch.float32,
                         device=sub.device)
        out[..., self.token_ids] = sub.float()
        return out

    def logits(self, hidden: torch.Tensor, scatter: bool = True) -> torch.Tensor:
        """``[..., H] -> [..., V]`` float32, ``-inf`` outside the map (``scatter=False``: the
        map's columns only, ``[..., len(map)]``)."""
        if self.head_blocks is not None:
            sub = self.head_blocks(hidden.float())
        else:
            sub = linear(hidden.to(self.dtype), self.head_weight)
        return self._scatter(sub, float("-inf")) if scatter else sub.float()

    def markov_bias(self, u: torch.Tensor, scatter: bool = True) -> torch.Tensor:
        """``W2 · u`` on the map's rows: ``[..., r] -> [..., V]`` float32, 0 outside
        (``scatter=False``: ``[..., len(map)]``)."""
        assert self.markov_weight is not None
        if self.markov_blocks is not None:
            sub = self.markov_blocks(u.float())
        else:
            sub = linear(u.to(self.dtype), self.markov_weight)
        return self._scatter(sub, 0.0) if scatter else sub.float()

