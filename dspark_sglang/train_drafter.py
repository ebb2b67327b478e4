"""``python -m dspark_sglang.train_drafter``: data -> target cache -> training -> STS -> export.

Stages (``--stages``, comma separated, default ``data,cache,train``), each resumable:

- ``data``: the target regenerates answers to the prompt files with our Engine (batch mode);
- ``cache``: target hidden states at ``--target-layer-ids`` + final hidden, bf16 shards;
- ``train``: DSpark training (random anchors, packed blocks, DeepSpec loss), STS calibration on
  the held-out split, export (DeepSpec layout) to ``--out``.

Example (the shipped SmolLM2 drafter; see docs/drafter.md for the exact run)::

    python -m dspark_sglang.train_drafter --work-dir runs/smollm2 \\
        --out dspark_sglang/assets/drafters/smollm2_135m --steps 600
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dspark_sglang.training import data as data_mod
from dspark_sglang.training.trainer import TrainConfig


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m dspark_sglang.train_drafter",
                                 description="train a DSpark drafter for a target model")
    ap.add_argument("--work-dir", required=True, help="data, cache and training state live here")
    ap.add_argument("--out", required=True, help="exported checkpoint directory")
    ap.add_argument("--stages", default="data,cache,train")
    ap.add_argument("--model-path", default=None, help="target (default: embedded SmolLM2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-threads", type=int, default=None)
    # data
    ap.add_argument("--prompts", nargs="*", default=list(data_mod.DEFAULT_PROMPT_FILES))
    ap.add_argument("--num-prompts", type=int, default=0, help="0 = all")
    ap.add_argument("--gen-dtype", default="float32")
    ap.add_argument("--gen-batch-size", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--sample-fraction", type=float, default=0.25)
    # drafter shape
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--markov-head-type", default="vanilla")
    ap.add_argument("--target-layer-ids", default=None,
                    help="comma-separated target layers (default: upstream DFlash/DSpark's rule, "
                         "5 layers from 1 to n-3; SmolLM2-135M: 1,8,14,20,27)")
    ap.add_argument("--mask-token-id", type=int, default=0)
    ap.add_argument("--qk-norm", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                    help="per-head q/k RMSNorm in draft layers (what upstream engines expect)")
    ap.add_argument("--init-layer", type=int, default=-1,
                    help="init draft layers from this target layer (-1 = last, -2 = random)")
    ap.add_argument("--sps-table", default=None, help="SPS table json to ship with the export")
    ap.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the target forward that fills the cache (stored as bf16 "
                         "either way; bfloat16 is ~3x faster on CPUs with AVX512-BF16)")
    # training
    for name, val in vars(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(val, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=val)
        else:
            ap.add_argument(flag, type=type(val), default=val)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--init-from", default=None,
                    help="start from this drafter checkpoint's weights (same shape as the flags "
                         "describe, or fewer draft layers: the added ones start as identity) "
                         "instead of the target's layers; a resumed run ignores it")
    return ap.parse_args(argv)


def _init_from_checkpoint(drafter: torch.nn.Module, path: str, target: torch.nn.Module) -> None:
    """Load a drafter checkpoint of the shape the flags describe. A checkpoint with fewer draft
    layers grows: its layers stay first, and each added layer starts as a copy of its last layer
    with ``o_proj`` and ``down_proj`` at zero, so it adds nothing to the residual stream and the
    grown drafter computes exactly what the checkpoint computes at step 0. One with more keeps
    its first layers. A vanilla Markov head can grow into a gated one (the same bias at step 0)
    or an RNN one (its output starts at about the vanilla bias)."""
    from dspark_sglang.speculative.dspark.checkpoint import load_dspark_checkpoint

    src = load_dspark_checkpoint(path, target.embed_tokens, target.lm_head)
    mine, theirs = drafter.state_dict(), src.state_dict()
    n_src, n_mine = len(src.layers), len(drafter.layers)
    if n_src < n_mine:
        last = f"layers.{n_src - 1}."
        last_layer = [(k[len(last):], v) for k, v in theirs.items() if k.startswith(last)]
        residual_out = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")
        for i in range(n_src, n_mine):
            for name, v in last_layer:
                theirs[f"layers.{i}.{name}"] = (torch.zeros_like(v) if name in residual_out
                                                else v.clone())
        print(f"[train] --init-from {path}: {n_src} -> {n_mine} draft layers (added layers start "
              "as identity)")
    elif n_src > n_mine:  # keep the first layers (an ablation of depth: the rest re-learn)
        theirs = {k: v for k, v in theirs.items()
                  if not k.startswith("layers.") or int(k.split(".")[1]) < n_mine}
        print(f"[train] --init-from {path}: {n_src} -> {n_mine} draft layers (the first kept)")
    gate = "markov_head.gate_proj."
    if gate + "weight" in mine and gate + "weight" not in theirs:
        # a vanilla checkpoint grown a gated Markov head: every gate starts at sigmoid(0) =
        # 1/2 whatever the hidden state, with W2 doubled, so the bias starts as the vanilla one
        # exactly and the gates sit where their gradient is largest (gates opened by a large
        # bias instead, sigmoid(4) = 0.98, learned nothing in 400 steps: 1/56 the gradient)
        theirs[gate + "weight"] = torch.zeros_like(mine[gate + "weight"])
        theirs[gate + "bias"] = torch.zeros_like(mine[gate + "bias"])
        w2 = "markov_head.markov_w2.weight"
        theirs[w2] = theirs[w2] * 2.0
        print(f"[train] --init-from {path}: vanilla -> gated Markov head (gates 1/2, W2 x 2)")
    joint = "markov_head.joint_proj."
    if joint + "weight" in mine and joint + "weight" not in theirs:
        # a vanilla checkpoint grown an RNN Markov head ([a; c; o] = J [s; e; h] + b): o = e,
        # so the bias W2 tanh(e) starts at about the vanilla W2 e (|e| is small: tanh(e) ~ e),
        # c = e, so the state accumulates the block's previous tokens for o to learn to read,
        # and the update gate a = 0 (half old state, half new)
        r = mine[joint + "weight"].shape[0] // 3
        w = torch.zeros_like(mine[joint + "weight"])
        eye = torch.eye(r, dtype=w.dtype)
        w[r:2 * r, r:2 * r] = eye  # c <- e
        w[2 * r:, r:2 * r] = eye  # o <- e
        theirs[joint + "weight"] = w
        theirs[joint + "bias"] = torch.zeros_like(mine[joint + "bias"])
        print(f"[train] --init-from {path}: vanilla -> RNN Markov head (o = e, c = e)")
    bad = sorted(k for k in set(mine) | set(theirs)
                 if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape)
    if bad:
        raise ValueError(f"--init-from {path} does not match the drafter flags: {bad[:5]}")
    drafter.load_state_dict(theirs)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    layer_ids = ([int(x) for x in args.target_layer_ids.split(",")] if args.target_layer_ids
                 else None)  # None: the default rule, once the target's depth is known
    data_path, cache_dir = work / "data.jsonl", work / "cache"
    report: dict[str, object] = {}

    if "data" in stages:
        from dspark_sglang.entrypoints.engine import Engine

        prompts = data_mod.read_prompts(args.prompts)
        random.Random(args.seed).shuffle(prompts)
        if args.num_prompts:
            prompts = prompts[: args.num_prompts]
        engine = Engine(model_path=args.model_path, dtype=args.gen_dtype,
                        max_total_tokens=args.gen_batch_size * (512 + args.max_new_tokens),
                        max_running_requests=args.gen_batch_size, num_threads=args.num_threads)
        try:
            report["data"] = data_mod.generate_dataset(
                engine, prompts, data_path, args.max_new_tokens, args.gen_batch_size,
                args.sample_fraction, args.seed, domain_max_new_tokens={"chat": 512})
        finally:
            engine.shutdown()

    from dspark_sglang.entrypoints.model_setup import load_target_model

    target = (load_target_model(args.model_path, args.device)
              if stages & {"cache", "train"} else None)
    if target is not None and layer_ids is None:
        from dspark_sglang.speculative.dspark.config import default_target_layer_ids

        layer_ids = default_target_layer_ids(target.config.num_hidden_layers)
    if "cache" in stages:
        from dspark_sglang.training.target_cache import TargetHiddenExtractor, build_target_cache

        samples = data_mod.read_samples(data_path)
        cache_target = (target if args.cache_dtype == "float32"
                        else load_target_model(args.model_path, args.device, torch.bfloat16))
        ext = TargetHiddenExtractor(cache_target, layer_ids, max_batch_tokens=4096,
                                    max_seq_len=args.max_seq_len)
        report["cache"] = build_target_cache(ext, samples, cache_dir)

    if "train" in stages:
        from dspark_sglang.speculative.dspark.model import DSparkDrafter
        from dspark_sglang.training.export import export_drafter
        from dspark_sglang.training.target_cache import load_target_cache
        from dspark_sglang.training.trainer import (
            calibrate,
            init_from_target,
            make_drafter_config,
            split_heldout,
            train_drafter,
        )

        assert target is not None
        cached_ids, seqs = load_target_cache(cache_dir)
        if cached_ids != layer_ids:
            raise ValueError(f"cache layer ids {cached_ids} != --target-layer-ids {layer_ids}")
        tcfg = TrainConfig(**{k: getattr(args, k) for k in vars(TrainConfig())})
        train_seqs, held = split_heldout(seqs, tcfg.heldout_fraction, tcfg.seed)
        dcfg = make_drafter_config(target.config, layer_ids, args.num_layers, args.block_size,
                                   args.markov_rank, args.mask_token_id, args.markov_head_type,
                                   qk_norm=args.qk_norm)
        drafter = DSparkDrafter(dcfg, target.embed_tokens, target.lm_head).to(args.device)
        if args.init_from:
            _init_from_checkpoint(drafter, args.init_from, target)
        elif args.init_layer != -2:
            init_from_target(drafter, target, args.init_layer % target.config.num_hidden_layers)
        n_tok = sum(len(s.input_ids) for s in seqs)
        print(f"[train] {len(train_seqs)} train / {len(held)} held-out sequences, {n_tok} tokens, "
              f"{sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M drafter params")
        t0 = time.monotonic()
        last = train_drafter(drafter, target.lm_head, train_seqs, tcfg, work / "train",
                             args.device, resume=not args.no_resume)
        cal, ev = calibrate(drafter, target.lm_head, held, tcfg, args.device)
        out = export_drafter(drafter, args.out, cal, args.sps_table, tcfg.export_dtype)
        if tcfg.token_map:  # serve the vocabulary it was trained on
            import shutil

            from dspark_sglang.speculative.dspark.token_map import TOKEN_MAP_FILE

            shutil.copyfile(tcfg.token_map, out / TOKEN_MAP_FILE)
        report["train"] = {"last": last, "minutes": (time.monotonic() - t0) / 60,
                           "heldout": ev["metrics"],
                           "sts": cal.to_dict() if cal is not None else None,
                           "checkpoint_bytes": sum(f.stat().st_size for f in out.iterdir())}
    print(json.dumps(report, indent=2, default=float))
    (work / "report.json").write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
