"""Speculative algorithms: ``--speculative-algorithm`` name -> draft-worker factory.

A factory is called as ``factory(ctx: DraftContext, cfg: SpeculativeConfig) -> DraftWorker``; a
``DraftWorker`` subclass whose ``__init__`` takes ``(ctx, cfg)`` is one. Built-in entries are
``"module:attr"`` strings imported when first built, so importing this module stays light
(``ServerArgs`` lists the names from here). Adding an algorithm is one worker class plus one
``register_speculative_algorithm`` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspark_sglang.speculative.context import DraftContext, SpeculativeConfig
    from dspark_sglang.speculative.worker import DraftWorker

_DSPARK = "dspark_sglang.speculative.dspark_worker:create_dspark_worker"
_ALGORITHMS: dict[str, str | Callable[..., Any]] = {
    "NONE": "dspark_sglang.speculative.worker:NoDraftWorker",
    "DSPARK": _DSPARK,  # chain, lengths from the prefix scheduler
    "MTP1": _DSPARK,  # one draft token per step
    "CHAIN": _DSPARK,  # the whole chain, no scheduler
    "NGRAM": "dspark_sglang.speculative.worker:NgramWorker",
    "STANDALONE": "dspark_sglang.speculative.standalone:StandaloneWorker",
    "TREE": _DSPARK,  # top-k tree from the drafter's distributions
}


def register_speculative_algorithm(name: str, factory: str | Callable[..., Any]) -> None:
    """Register ``factory`` (a callable or ``"module:attr"``) under ``name`` (replaces one)."""
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"factory must be callable or 'module:attr', got {factory!r}")
    _ALGORITHMS[name] = factory


def unregister_speculative_algorithm(name: str) -> None:
    _ALGORITHMS.pop(name, None)


def speculative_algorithm_names() -> tuple[str, ...]:
    return tuple(_ALGORITHMS)


def create_draft_worker(ctx: DraftContext, cfg: SpeculativeConfig) -> DraftWorker:
    """The worker for ``cfg.algorithm``; ValueError for a name nobody registered."""
    factory = _ALGORITHMS.get(cfg.algorithm)
    if factory is None:
        raise ValueError(f"unknown speculative_algorithm {cfg.algorithm!r}; registered: "
                         f"{', '.join(_ALGORITHMS)}")
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(ctx, cfg)
