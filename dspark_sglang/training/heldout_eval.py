"""Held-out greedy τ of drafter checkpoints, teacher-forced on a training work dir's cache.

The split is ``train_drafter``'s (``split_heldout`` with the default fraction and seed), so a
checkpoint never trained on these sequences; ``--keys`` keeps only sequences whose key starts
with one of the given prompt-file stems (e.g. files no earlier drafter saw, when comparing a
run started from an older checkpoint). Per block of the drafter's size (anchors as in training),
a draft counts as accepted when its argmax, with the true previous tokens, is the data token
(``--labels data``) or the target's argmax there (``--labels target``: what greedy verification
accepts; the two differ on T=1-sampled answers); τ = 1 + mean leading run of accepted drafts:
exact greedy τ along the data's path for greedy answers. ``--token-map``: the argmax over the
map's tokens, as the drafter serves. A cheap selection metric (minutes) that leaves the
evaluation prompts out of model choices.

    python -m dspark_sglang.training.heldout_eval --cache W/cache --keys chat_synth2 \\
        code_math_synth --ckpt OUT_A OUT_B
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np


def greedy_tau(accepted: np.ndarray, observed: np.ndarray) -> dict[str, object]:
    """``accepted`` / ``observed`` ``[blocks, k]`` bool -> τ (1 + mean leading run of accepted,
    observed drafts) and the per-position conditional acceptance ``P(k ok | < k ok)``."""
    ok = accepted.astype(bool) & observed.astype(bool)
    run = np.cumprod(ok, axis=1).sum(axis=1)
    per_pos = []
    for j in range(ok.shape[1]):
        reach = np.all(ok[:, :j], axis=1) & observed[:, j].astype(bool)
        per_pos.append(float(ok[reach, j].mean()) if reach.any() else float("nan"))
    return {"blocks": int(len(run)), "tau_greedy": float(1 + run.mean()) if len(run) else 1.0,
            "per_position": per_pos}


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from dspark_sglang.entrypoints.model_setup import load_target_model
    from dspark_sglang.speculative.dspark.checkpoint import load_dspark_checkpoint
    from dspark_sglang.training.target_cache import load_target_cache
    from dspark_sglang.training.trainer import TrainConfig, evaluate_blocks, split_heldout

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="a train_drafter work dir's cache/")
    ap.add_argument("--ckpt", nargs="+", required=True, help="drafter checkpoint dirs")
    ap.add_argument("--keys", nargs="*", default=None, help="prompt-file stems to keep")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--token-map", default="", help="token map json the drafter serves with")
    ap.add_argument("--labels", nargs="+", default=["data"], choices=["data", "target"])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--num-threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    target = load_target_model(args.model_path, "cpu")
    _, seqs = load_target_cache(args.cache)
    cfg = TrainConfig(max_seq_len=args.max_seq_len, token_map=args.token_map)
    _, held = split_heldout(seqs, cfg.heldout_fraction, cfg.seed)
    if args.keys:
        held = [s for s in held if s.key.split(":")[0] in set(args.keys)]
    print(f"{len(held)} held-out sequences", flush=True)
    for path in args.ckpt:
        drafter = load_dspark_checkpoint(path, target.embed_tokens, target.lm_head).float()
        for mode in args.labels:
            ev = evaluate_blocks(drafter, target.lm_head, held, replace(cfg, ce_label=mode),
                                 "cpu")
            row = {"ckpt": path, "labels": mode, **greedy_tau(ev["accepted"], ev["observed"]),
                   **{k: float(v) for k, v in ev["metrics"].items()}}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
