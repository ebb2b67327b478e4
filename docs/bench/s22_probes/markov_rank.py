"""Markov-rank ablation without retraining: the shipped drafter with its vanilla Markov bias
``M = W2 W1^T`` cut to its best rank-r approximation (``W2 <- W2 P``, ``W1`` unchanged, so the
confidence head's features stay the same and the checkpoint keeps its shape).

    python docs/bench/s22_probes/markov_rank.py OUTDIR 32 16 8

writes OUTDIR/rank{r}/ (config, weights, STS calibration, token map of the shipped drafter);
compare them with ``python -m dspark_sglang.eval_drafter --compare OUTDIR/rank*``.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SRC = Path(__file__).resolve().parents[3] / "dspark_sglang/assets/drafters/smollm2_135m"


def truncated_w2(w1: torch.Tensor, w2: torch.Tensor, rank: int) -> torch.Tensor:
    """``W2 P`` with ``W2 P W1^T`` the best rank-``rank`` approximation of ``W2 W1^T``."""
    q1, r1 = torch.linalg.qr(w1)  # W1 = Q1 R1
    q2, r2 = torch.linalg.qr(w2)  # W2 = Q2 R2
    u, s, vh = torch.linalg.svd(r2 @ r1.T)  # core = U S V^T
    core = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    p = torch.linalg.solve(r2, core) @ torch.linalg.inv(r1.T)  # R2 P R1^T = core
    return w2 @ p


def main() -> None:
    out = Path(sys.argv[1])
    sd = load_file(SRC / "model.safetensors")
    w1 = sd["markov_head.markov_w1.weight"].double()
    w2 = sd["markov_head.markov_w2.weight"].double()
    full = w2 @ w1[:512].T
    for rank in map(int, sys.argv[2:]):
        d = out / f"rank{rank}"
        shutil.copytree(SRC, d, dirs_exist_ok=True)
        new = truncated_w2(w1, w2, rank)
        err = (new @ w1[:512].T - full).norm() / full.norm()
        print(f"rank {rank}: relative error of the bias on 512 previous tokens {err:.3f}")
        sd2 = dict(sd)
        sd2["markov_head.markov_w2.weight"] = new.to(sd["markov_head.markov_w2.weight"].dtype)
        save_file(sd2, d / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    main()
