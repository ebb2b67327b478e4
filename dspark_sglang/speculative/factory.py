"""Build the draft worker named by ``--speculative-algorithm`` (lazy imports per algorithm)."""

from __future__ import annotations

from dspark_sglang.speculative.context import DraftContext, SpeculativeConfig
from dspark_sglang.speculative.worker import DraftWorker, NgramWorker, NoDraftWorker


def create_draft_worker(ctx: DraftContext, cfg: SpeculativeConfig) -> DraftWorker:
    algo = cfg.algorithm
    if algo == "NONE":
        return NoDraftWorker()
    if algo == "NGRAM":
        return NgramWorker(cfg.num_draft_tokens or 4, cfg.ngram_max_match)
    if algo in ("DSPARK", "MTP1", "CHAIN", "TREE"):
        from dspark_sglang.speculative.dspark_worker import create_dspark_worker

        return create_dspark_worker(ctx, cfg)
    if algo == "STANDALONE":
        from dspark_sglang.speculative.standalone import StandaloneWorker

        return StandaloneWorker(ctx, cfg)
    raise ValueError(f"unknown speculative_algorithm {algo!r}")
