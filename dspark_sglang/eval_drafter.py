"""``python -m dspark_sglang.eval_drafter``: offline, exact acceptance of a DSpark drafter.

Per eval set (``<eval-dir>/<name>.jsonl``, ``{"turns": [...]}``, first turn, first ``--num``
prompts): the target generates its greedy continuation with our Engine (float32), the target
is re-run over prompt + continuation to get its hidden states and logits, and speculative
decoding is simulated at every step along that trajectory (:mod:`training.simulate`).

Reported per set, greedy and T=1: ``tau`` (incl. bonus) for DSPARK (block ``gamma``, no
scheduler), the same drafter without its Markov head (DFlash-like), and MTP-1 (first draft
only); per-position conditional acceptance; confidence-head ROC-AUC and ECE of the prefix
survival before / after STS. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark_sglang.speculative.dspark.model import DSparkDrafter
from dspark_sglang.training.blocks import block_forward, build_block_batch, prev_tokens
from dspark_sglang.training.calibration import (
    expected_calibration_error,
    prefix_labels,
    roc_auc,
    survival,
)
from dspark_sglang.training.simulate import SimSummary, leading_true, trace_sequence
from dspark_sglang.training.target_cache import CachedSequence, TargetHiddenExtractor
from dspark_sglang.utils.jsonl import read_jsonl
from dspark_sglang.utils.paths import workloads_dir

EVAL_SETS = ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench")


def drafter_logit_fn(drafter: DSparkDrafter, seq: CachedSequence) -> Any:
    """A :data:`LogitFn` for ``seq`` (hidden states already computed)."""

    @torch.no_grad()
    def fn(anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch = build_block_batch([seq], [anchors.tolist()], drafter.gamma)
        hidden = block_forward(drafter, batch)
        prev = prev_tokens(batch)
        base = drafter.base_logits(hidden)
        draft = base
        if drafter.markov_head is not None:
            draft = base + drafter.markov_head.block_bias(prev, hidden).float()
        return draft, base, drafter.confidence_logits(hidden, prev)

    return fn


def confidence_metrics(summary: SimSummary, temps: Sequence[float]) -> dict[str, float]:
    """ROC-AUC and ECE of the survival ``Π sigmoid(z)`` vs greedy prefix acceptance."""
    tr = [t for t in summary.traces if t.conf_logits is not None]
    if not tr:
        return {}
    z = np.concatenate([t.conf_logits for t in tr])
    acc = np.concatenate([t.accepted for t in tr])
    valid = np.concatenate([t.valid for t in tr])
    y = prefix_labels(acc)
    raw, cal = survival(z), survival(z, np.asarray(temps))
    m = valid.astype(bool)
    return {"auc_raw": roc_auc(raw[m], y[m]), "auc_sts": roc_auc(cal[m], y[m]),
            "ece_raw": expected_calibration_error(raw[m], y[m]),
            "ece_sts": expected_calibration_error(cal[m], y[m]),
            "mean_len_greedy": float(leading_true(acc).mean())}


def evaluate_set(
    engine: Any, extractor: TargetHiddenExtractor, drafters: Sequence[DSparkDrafter],
    lm_head: Any, prompts: Sequence[str], max_new_tokens: int,
) -> list[SimSummary]:
    """One summary per drafter, all on the same greedy continuations and target states."""
    tok = engine.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
           for p in prompts]
    ids = [x[: extractor.max_seq_len - max_new_tokens - 1] for x in ids]
    outs = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": max_new_tokens,
                                                           "temperature": 0})
    summaries = [SimSummary(d.gamma) for d in drafters]
    for pid, o in zip(ids, outs):
        full = pid + list(o["output_ids"])
        if len(full) - len(pid) < 2:
            continue
        aux, fin = extractor.run([full])[0]
        seq = CachedSequence("eval", torch.tensor(full), aux.float(), fin.float(), len(pid))
        with torch.no_grad():
            tgt_logits = lm_head(fin.float())  # [L, V]
        for drafter, summary in zip(drafters, summaries):
            tr = trace_sequence(drafter_logit_fn(drafter, seq), seq.input_ids, len(pid),
                                tgt_logits, drafter.gamma)
            if tr is not None:
                summary.add(tr)
    return summaries


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'set':<10} {'n':>3} | {'DSPARK g':>8} {'DFlash g':>8} {'MTP1 g':>6} | "
            f"{'DSPARK T1':>9} {'DFlash T1':>9} {'MTP1 T1':>7} {'seeded T1':>9} | "
            f"{'markov+%':>8} | "
            f"{'AUC raw/sts':>11} {'ECE raw/sts':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.get("confidence", {})
        gain = 100.0 * (r["greedy"]["dspark"] / max(r["greedy"]["dflash"], 1e-9) - 1.0)
        lines.append(
            f"{r['set']:<10} {r['num_prompts']:>3} | {r['greedy']['dspark']:>8.2f} "
            f"{r['greedy']['dflash']:>8.2f} {r['greedy']['mtp1']:>6.2f} | "
            f"{r['t1']['dspark']:>9.2f} {r['t1']['dflash']:>9.2f} {r['t1']['mtp1']:>7.2f} "
            f"{r.get('t1_seeded', float('nan')):>9.2f} | "
            f"{gain:>+7.1f}% | {c.get('auc_raw', float('nan')):>5.3f}/"
            f"{c.get('auc_sts', float('nan')):<5.3f} {c.get('ece_raw', float('nan')):>5.3f}/"
            f"{c.get('ece_sts', float('nan')):<5.3f}")
    lines.append("")
    lines.append("per-position conditional acceptance (greedy, DSPARK):")
    for r in rows:
        lines.append(f"  {r['set']:<10} " + " ".join(f"{a:.2f}" for a in r["cond_accept"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dspark_sglang.eval_drafter")
    ap.add_argument("--drafter", default=None, help="checkpoint dir (default: shipped SmolLM2)")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--eval-dir", default=str(workloads_dir() / "eval"),
                    help="eval prompt sets (default: $DSPARK_SHARED_DIR or ../shared)")
    ap.add_argument("--sets", default=",".join(EVAL_SETS))
    ap.add_argument("--num", type=int, default=10, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write JSON here")
    ap.add_argument("--token-map", default=None,
                    help="draft over these ids (as --speculative-token-map; default: the "
                         "drafter's token_map.json when present, 'none' = full vocabulary)")
    ap.add_argument("--token-map-size", type=int, default=None)
    ap.add_argument("--compare", nargs="*", default=[],
                    help="more checkpoint dirs, measured on the same continuations (each with "
                         "its own token map; reported after the first)")
    args = ap.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from dspark_sglang.entrypoints.engine import Engine
    from dspark_sglang.entrypoints.model_setup import load_target_model
    from dspark_sglang.speculative.dspark.checkpoint import load_dspark_checkpoint
    from dspark_sglang.speculative.dspark.token_map import resolve_token_map
    from dspark_sglang.speculative.dspark_worker import DEFAULT_DRAFTER_DIR

    target = load_target_model(args.model_path, "cpu")
    paths = [args.drafter or DEFAULT_DRAFTER_DIR, *args.compare]
    drafters, temps_of, maps = [], [], []
    for i, path in enumerate(paths):
        d = load_dspark_checkpoint(path, target.embed_tokens, target.lm_head).eval()
        token_map = resolve_token_map(path, args.token_map if i == 0 else None,
                                      args.token_map_size if i == 0 else None)
        if token_map is not None:
            d.set_token_map(token_map)
        drafters.append(d)
        temps_of.append(d.sts_calibration().temperatures)
        maps.append(token_map)
    layer_ids = drafters[0].config.target_layer_ids
    if any(d.config.target_layer_ids != layer_ids for d in drafters):
        raise SystemExit("--compare drafters must read the same target layers")
    extractor = TargetHiddenExtractor(target, layer_ids, 4096, 2048)
    engine = Engine(model_path=args.model_path, dtype="float32", max_total_tokens=32768,
                    max_running_requests=max(args.num, 1), num_threads=args.num_threads)
    rows: list[list[dict[str, Any]]] = [[] for _ in drafters]
    try:
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            t0 = time.monotonic()
            rows_in = read_jsonl(Path(args.eval_dir, f"{name}.jsonl"))
            prompts = [r["turns"][0] for r in rows_in][: args.num]
            sums = evaluate_set(engine, extractor, drafters, target.lm_head, prompts,
                                args.max_new_tokens)
            for j, s in enumerate(sums):
                rows[j].append({
                    "set": name, "num_prompts": len(prompts), "num_anchors": s.t1_n,
                    "greedy": {k: s.tau_greedy(k) for k in ("dspark", "dflash", "mtp1")},
                    # greedy DSPARK tau with the chain capped at 1 .. block drafts a step
                    "greedy_by_cap": [s.tau_greedy_capped(c) for c in range(1, s.gamma + 1)],
                    "t1": {k: s.tau_t1(k) for k in ("dspark", "dflash", "mtp1")},
                    # seeded requests verify by Gumbel coupling instead of rejection sampling
                    "t1_seeded": s.tau_t1_coupled(),
                    "cond_accept": s.conditional_acceptance(),
                    "confidence": confidence_metrics(s, temps_of[j]),
                    "seconds": time.monotonic() - t0,
                })
            print(f"[eval] {name}: greedy tau "
                  + " / ".join(f"{r[-1]['greedy']['dspark']:.2f}" for r in rows)
                  + f" ({time.monotonic() - t0:.0f}s)", flush=True)
    finally:
        engine.shutdown()
    reports = []
    for path, d, token_map, temps, r in zip(paths, drafters, maps, temps_of, rows):
        print(f"\n{path}: token map "
              f"{'full vocabulary' if token_map is None else len(token_map)} ids")
        print(format_table(r))
        for row in r:
            print(f"  {row['set']}: greedy tau with the chain capped at 1..{d.gamma} drafts: "
                  + " ".join(f"{t:.2f}" for t in row["greedy_by_cap"]))
        reports.append({"drafter": str(path), "block_size": d.gamma, "sts": temps,
                        "token_map_size": None if token_map is None else len(token_map),
                        "max_new_tokens": args.max_new_tokens, "rows": r})
    if args.out:
        out = dict(reports[0])
        if len(reports) > 1:
            out["compare"] = reports[1:]
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
