"""Draft-length policies: how much the DSpark drafter drafts per step, and how much of it is
verified, for each algorithm it serves (``--speculative-algorithm``):

- ``DSPARK`` (``Scheduled``): a chain of up to ``block_size`` drafts; verify lengths from the
  hardware-aware prefix scheduler (calibrated confidences x profiled SPS table); the worker's
  draft budget decides how deep to draft;
- ``CHAIN`` (``FixedChain``): the whole chain (``--speculative-num-draft-tokens`` caps it);
- ``MTP1`` (``SingleToken``): exactly one draft token per step, always verified;
- ``TREE`` (``Tree``): a top-k tree from the drafter's per-position distributions.

Policies are immutable: what changes from step to step (budget, timings, the last decision) is
the worker's, so a worker snapshot needs no copy of its policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dspark_sglang.speculative.prefix_scheduler import schedule_prefix
from dspark_sglang.speculative.sps_profile import SPSTable


@dataclass(frozen=True)
class DraftLengthPolicy:
    num_draft: int  # chain positions drafted at most
    tree: ClassVar[bool] = False  # draft a top-k tree instead of a chain
    budgeted: ClassVar[bool] = False  # the worker's draft budget (DSparkWorker._draft_budget)

    def max_draft_len(self) -> int:
        """Draft tokens one request may verify in a step, at most."""
        return self.num_draft

    def verify_lengths(self, confidences: torch.Tensor, limits: list[int]
                       ) -> tuple[list[int], Any]:
        """How many drafted positions of each request are verified, at most ``limits[i]``
        (drafted, room, grammar), from ``confidences [bs, k]`` (never the drafted tokens); and
        the scheduling decision to report, or None."""
        return limits, None


class FixedChain(DraftLengthPolicy):
    """CHAIN: verify every drafted position."""


class SingleToken(FixedChain):
    """MTP1: one draft token per step (``num_draft`` 1), always verified."""


@dataclass(frozen=True)
class Scheduled(DraftLengthPolicy):
    """DSPARK: verify lengths from the prefix scheduler (Algorithm 1) over the SPS table; every
    drafted position when there is no table."""

    sps_table: SPSTable | None = None
    budgeted: ClassVar[bool] = True

    def verify_lengths(self, confidences: torch.Tensor, limits: list[int]
                       ) -> tuple[list[int], Any]:
        if self.sps_table is None:
            return limits, None
        decision = schedule_prefix(confidences.float(), self.sps_table, max_lengths=limits)
        return decision.lengths, decision


@dataclass(frozen=True)
class Tree(DraftLengthPolicy):
    """TREE: up to ``num_nodes`` nodes, ``topk`` children per node (``num_draft``: the chain
    drafted instead for a request with a grammar, which trees do not walk)."""

    topk: int = 1
    num_nodes: int = 1
    tree: ClassVar[bool] = True

    def max_draft_len(self) -> int:
        return self.num_nodes


def draft_length_policy(algorithm: str, block_size: int, num_draft_tokens: int | None,
                        sps_table: SPSTable | None, tree_topk: int) -> DraftLengthPolicy:
    """The policy of ``algorithm``; ``num_draft_tokens`` caps the chain (for DSPARK already in
    draft tokens, not the upstream verify window) or sizes the tree (default 2 x block)."""
    num_draft = min(block_size, num_draft_tokens or block_size)
    if algorithm == "DSPARK":
        return Scheduled(num_draft, sps_table)
    if algorithm == "CHAIN":
        return FixedChain(num_draft)
    if algorithm == "MTP1":
        return SingleToken(1)
    if algorithm == "TREE":
        return Tree(num_draft, tree_topk, num_draft_tokens or 2 * block_size)
    raise ValueError(f"no DSpark draft-length policy for {algorithm!r}")
