"""Drafter-side interface of a speculative step, and the weight-free workers (NONE, NGRAM).

A ``DraftWorker`` proposes draft tokens for running requests; the generic ``SpecDecoder``
(spec_decoder.py) verifies them with the target in one batched forward. Every target forward
(prefill chunks and verify passes) is reported to the worker through ``on_target_forward`` so a
drafter can store what it needs per KV slot (the DSpark draft context pool).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dspark_sglang.constrained.draft_walk import valid_draft_prefix
from dspark_sglang.core.forward_batch import ForwardBatch, ModelOutput
from dspark_sglang.core.req import Req

if TYPE_CHECKING:
    from dspark_sglang.speculative.context import DraftContext, SpeculativeConfig
    from dspark_sglang.speculative.prefix_scheduler import ScheduleDecision


@dataclass
class Draft:
    """Draft for one request. A chain when ``parents`` is None; else a tree.

    ``tokens[i]`` is node ``i``; in a tree ``parents[i]`` is the parent node index (-1 = the
    anchor) and nodes are listed parents-first. ``probs`` is the draft distribution ``q`` each
    token was sampled from (``[len(tokens), V]``), or None for deterministic drafts (n-gram,
    greedy), which the verifier treats as one-hot.
    """

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None
    parents: list[int] | None = None
    confidences: list[float] | None = None  # calibrated conditional survival per position
    forced: bool = False  # grammar jump-forward tokens, not the drafter's proposal

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class StepResult:
    """What one committed verify step did for one request: handed to the scheduler (tokens to
    append) and to :meth:`DraftWorker.on_verified` (acceptance the drafter may learn from)."""

    req: Req
    tokens: list[int]  # accepted drafts + one target token (correction or bonus)
    logprobs: list[tuple[Any, Any]] | None
    num_drafted: int  # draft tokens verified this step
    forced: bool = False  # they were grammar jump-forward tokens, not the drafter's proposal

    @property
    def num_accepted(self) -> int:
        return len(self.tokens) - 1


class DraftWorker(ABC):
    """What the spec decoder needs from a drafter. Called only from the scheduler thread.

    Per-request state a drafter keeps (e.g. acceptance estimates) is its own, keyed by
    ``Req.rid``: it learns outcomes from :meth:`on_verified` and drops a request's state in
    :meth:`release`, which the scheduler calls whenever a request finishes, aborts or is
    retracted. Such state must be covered by :meth:`snapshot` / :meth:`restore`.
    """

    name: str = "NONE"
    capture_layer_ids: tuple[int, ...] = ()  # target layers whose hidden states it needs
    # the prefix scheduler's last decision (DSPARK), reported in SpecStats.last_expected_tau
    last_decision: ScheduleDecision | None = None

    @abstractmethod
    def propose(self, reqs: list[Req]) -> list[Draft]: ...

    def on_target_forward(self, fb: ForwardBatch, out: ModelOutput) -> None:  # noqa: B027
        """Called after every target forward (prefill and verify), before acceptance."""

    def max_draft_len(self) -> int:
        return 0

    def on_verified(self, results: list[StepResult]) -> None:  # noqa: B027
        """Called once per committed step with every verified request's result (not for a
        step that was cancelled before its commit)."""

    def release(self, req: Req) -> None:  # noqa: B027
        """``req`` left the running set (finished, aborted or retracted): drop its state."""

    def snapshot(self) -> dict[str, Any]:
        """The worker state ``propose`` may change, for :meth:`restore` when the step is cancelled
        before its commit (``SpecDecoder.step``). The default keeps the instance's attribute
        bindings: enough for a worker whose ``propose`` only rebinds attributes (counters, EMAs,
        the last decision); one that changes a container or buffer in place overrides both."""
        return dict(vars(self))

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back what :meth:`snapshot` returned (attributes set since then are dropped)."""
        state = vars(self)
        state.clear()
        state.update(snapshot)


class NoDraftWorker(DraftWorker):
    """Plain decoding: one target step per token."""

    name = "NONE"

    def __init__(self, ctx: DraftContext | None = None,
                 cfg: SpeculativeConfig | None = None) -> None:
        pass

    def propose(self, reqs: list[Req]) -> list[Draft]:
        return [Draft() for _ in reqs]


class NgramWorker(DraftWorker):
    """Prompt-lookup drafting: no weights; drafts copy what followed the last n-gram earlier."""

    name = "NGRAM"

    def __init__(self, ctx: DraftContext, cfg: SpeculativeConfig) -> None:
        from dspark_sglang.speculative.ngram import NgramProposer

        self.k = cfg.num_draft_tokens or 4
        self.context_len = ctx.context_len
        self.proposer = NgramProposer(max_ngram=cfg.ngram_max_match, min_ngram=1,
                                      num_draft_tokens=self.k)

    def max_draft_len(self) -> int:
        return self.k

    def propose(self, reqs: list[Req]) -> list[Draft]:
        out = []
        for req in reqs:
            toks = self.proposer.propose(req.fill_ids)[: req.draft_room(self.context_len)]
            toks = valid_draft_prefix(req.grammar, toks)  # drafts are never grammar-invalid
            out.append(Draft(tokens=list(toks)))
        return out
