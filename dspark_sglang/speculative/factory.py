"""Build the draft worker named by ``--speculative-algorithm`` (lazy imports per algorithm)."""

from __future__ import annotations

from typing import Any

from dspark_sglang.server_args import ServerArgs
from dspark_sglang.speculative.worker import DraftWorker, NgramWorker, NoDraftWorker


def create_draft_worker(args: ServerArgs, ctx: Any) -> DraftWorker:
    """``ctx`` is the engine under construction (runner, cache, tokenizer, paths)."""
    algo = args.speculative_algorithm
    if algo == "NONE":
        return NoDraftWorker()
    if algo == "NGRAM":
        return NgramWorker(args.speculative_num_draft_tokens or 4, args.speculative_ngram_max_match)
    if algo in ("DSPARK", "MTP1", "CHAIN", "TREE"):
        from dspark_sglang.speculative.dspark_worker import create_dspark_worker

        return create_dspark_worker(args, ctx)
    if algo == "STANDALONE":
        from dspark_sglang.speculative.standalone import StandaloneWorker

        return StandaloneWorker(args, ctx)
    raise ValueError(f"unknown speculative_algorithm {algo!r}")
