"""Speculative modes side by side in one process (``python -m dspark_sglang.bench_speculative``).

One engine per mode, loaded, warmed up, run at every concurrency level, shut down before the
next mode is loaded (two engines in one process would share the CPUs' OpenMP teams badly: see
entrypoints/engine.py). A mode that fails to load or run is reported as ``error: ...`` and the
others continue. Greedy outputs of each mode are compared with NONE's at the same concurrency.
With ``rounds`` > 1 the whole sequence of modes runs that many times, the order rotated each
round (so no mode always runs first or last on a machine whose speed drifts), and each row is
the round with the median output tokens/s, with every round's value and spread beside it; greedy
outputs must then also agree across rounds.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

from dspark_sglang.benchmark.engine_runner import (
    engine_kwargs_for_mode,
    reset_engine_stats,
    run_closed_loop,
    spec_stats,
)
from dspark_sglang.benchmark.metrics import stats_delta, summarize
from dspark_sglang.benchmark.report import error_text, format_table, machine_info, ratio
from dspark_sglang.benchmark.step_timer import STEP_PARTS, StepTimer
from dspark_sglang.benchmark.workloads import PromptItem, chat_prompt, sampling_for


@dataclass
class SpecBenchConfig:
    """Everything one ``bench_speculative`` run needs (the CLI maps onto it)."""

    prompts: list[PromptItem]
    modes: list[str]
    concurrency: list[int]
    model_path: str | None = None
    dtype: str = "auto"
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    num_draft_tokens: int | None = None
    draft_model_path: str | None = None
    max_total_tokens: int = 32768
    num_threads: int | None = None
    chat_template: bool = True
    profile_steps: bool = False
    rounds: int = 1
    engine_extra: dict[str, Any] = field(default_factory=dict)


TABLE_COLUMNS = ["mode", "conc", "out_tok_s", "per_user_tok_s", "vs_NONE", "vs_MTP1", "tau",
                 "verify_tok/step", "batch_verify_tok/step", "same_as_NONE", "note"]
ROUNDS_COLUMNS = ["spread", "rounds_out_tok_s"]


def _run_mode(cfg: SpecBenchConfig, mode: str) -> tuple[list[dict[str, Any]], dict[int, list]]:
    """Rows for one mode (one per concurrency) and its output ids per concurrency."""
    from dspark_sglang.entrypoints.engine import Engine

    outputs: dict[int, list[list[int]]] = {}
    try:
        kw = engine_kwargs_for_mode(mode, cfg.num_draft_tokens, cfg.draft_model_path)
        engine = Engine(cfg.model_path, dtype=cfg.dtype, max_total_tokens=cfg.max_total_tokens,
                        max_running_requests=max(cfg.concurrency), num_threads=cfg.num_threads,
                        **kw, **cfg.engine_extra)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        return [{"mode": mode, "conc": c, "error": error_text(e)} for c in cfg.concurrency], {}
    rows: list[dict[str, Any]] = []
    try:
        tok = engine.tokenizer
        texts = [chat_prompt(tok, p.text) if cfg.chat_template else p.text for p in cfg.prompts]
        sps = [sampling_for(p, cfg.max_new_tokens, cfg.temperature, cfg.seed + i)
               for i, p in enumerate(cfg.prompts)]
        domains = [p.domain for p in cfg.prompts]
        timer = StepTimer(engine.parts) if cfg.profile_steps else None
        for c in cfg.concurrency:
            try:
                # warm-up at this concurrency: the first batch of this size pays one-time costs
                # (allocator growth, first-touch of buffers) that would favour later modes
                w = min(c, len(texts))
                engine.generate(texts[:w], [{**sp, "max_new_tokens": 4} for sp in sps[:w]])
                engine.flush_cache()
                reset_engine_stats(engine)
                if timer is not None:
                    timer.reset()
                results, wall = run_closed_loop(engine, texts, sps, domains, c)
                row = {"mode": mode, "conc": c, **summarize(results, wall),
                       **stats_delta(None, spec_stats(engine))}
                if timer is not None:
                    row["step_profile"] = timer.summary(wall)
                if row["num_errors"]:
                    row["error"] = row["first_error"]
                outputs[c] = [r.output_ids for r in results]
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                row = {"mode": mode, "conc": c, "error": error_text(e)}
            rows.append(row)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    return rows, outputs


def add_comparisons(rows: list[dict[str, Any]], outputs: dict[str, dict[int, list]],
                    greedy: bool) -> None:
    """Fill speedups vs NONE and MTP1 (same concurrency) and greedy equality with NONE."""
    base = {(r["mode"], r["conc"]): r for r in rows if not r.get("error")}
    for r in rows:
        if r.get("error"):
            continue
        c = r["conc"]
        for ref in ("NONE", "MTP1"):
            other = base.get((ref, c))
            r[f"speedup_vs_{ref}"] = ratio(r.get("output_tok_s"),
                                           other.get("output_tok_s") if other else None)
        ref_out = outputs.get("NONE", {}).get(c)
        mine = outputs.get(r["mode"], {}).get(c)
        if greedy and ref_out is not None and mine is not None:
            r["identical_to_none"] = sum(a == b for a, b in zip(mine, ref_out))
            r["compared"] = len(ref_out)


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        same = (f"{r['identical_to_none']}/{r['compared']}" if "identical_to_none" in r
                else None)
        out.append({
            "mode": r["mode"], "conc": r["conc"], "out_tok_s": r.get("output_tok_s"),
            "per_user_tok_s": r.get("per_user_tok_s"), "vs_NONE": r.get("speedup_vs_NONE"),
            "vs_MTP1": r.get("speedup_vs_MTP1"), "tau": r.get("tau"),
            "verify_tok/step": r.get("verify_tokens_per_req_step"),
            "batch_verify_tok/step": r.get("verify_tokens_per_batch_step"),
            "same_as_NONE": same,
            "note": r.get("error") or ("outputs differ across rounds"
                                       if r.get("outputs_vary") else ""),
            "spread": r.get("spread"),
            "rounds_out_tok_s": (" ".join(f"{v:.1f}" for v in r["rounds_output_tok_s"])
                                 if "rounds_output_tok_s" in r else None),
        })
    return out


def _median_rounds(mode: str, runs: list[tuple[list[dict[str, Any]], dict[int, list]]],
                   concurrency: list[int]) -> tuple[list[dict[str, Any]], dict[int, list]]:
    """One row per concurrency from a mode's rounds: the round with the median output tokens/s
    (the lower middle one for an even count), every round's value (``rounds_output_tok_s``, in
    run order) and their spread ((max - min) / median); its outputs, with ``outputs_vary``
    set when rounds produced different output ids (greedy runs must not)."""
    rows, outputs = [], {}
    for i, c in enumerate(concurrency):
        ok = [(rs[i], out.get(c)) for rs, out in runs
              if i < len(rs) and not rs[i].get("error")]
        if not ok:  # every round failed: report the first error
            rows.append(runs[0][0][i] if runs[0][0] else {"mode": mode, "conc": c,
                                                           "error": "error: no rounds ran"})
            continue
        vals = [r["output_tok_s"] for r, _ in ok]
        order = sorted(range(len(ok)), key=lambda j: vals[j])
        row, out = ok[order[(len(ok) - 1) // 2]]
        row = {**row, "rounds_output_tok_s": vals, "rounds": len(ok),
               "spread": (max(vals) - min(vals)) / row["output_tok_s"]
               if row["output_tok_s"] else None}
        if any(o != out for _, o in ok):
            row["outputs_vary"] = True
        rows.append(row)
        if out is not None:
            outputs[c] = out
    return rows, outputs


def run_spec_bench(cfg: SpecBenchConfig, log: Any = print) -> dict[str, Any]:
    """Run every mode (``cfg.rounds`` times, rotating the order); print the table through
    ``log``; return the JSON-ready report."""
    runs: dict[str, list[tuple[list[dict[str, Any]], dict[int, list]]]] = {
        m: [] for m in cfg.modes}
    for rnd in range(max(1, cfg.rounds)):
        k = rnd % len(cfg.modes)
        for mode in cfg.modes[k:] + cfg.modes[:k]:
            log(f"[bench_speculative] mode {mode} ..." if cfg.rounds <= 1 else
                f"[bench_speculative] round {rnd + 1}/{cfg.rounds}: mode {mode} ...")
            mode_rows, mode_out = _run_mode(cfg, mode)
            for r in mode_rows:
                if r.get("error"):
                    log(f"[bench_speculative]   {mode} conc={r['conc']}: {r['error']}")
            runs[mode].append((mode_rows, mode_out))
    rows: list[dict[str, Any]] = []
    outputs: dict[str, dict[int, list]] = {}
    for mode in cfg.modes:
        if cfg.rounds <= 1:
            mode_rows, mode_out = runs[mode][0]
        else:
            mode_rows, mode_out = _median_rounds(mode, runs[mode], cfg.concurrency)
        rows += mode_rows
        outputs[mode] = mode_out
    greedy = cfg.temperature == 0
    add_comparisons(rows, outputs, greedy)
    title = (f"speculative modes: {len(cfg.prompts)} prompts, max_new_tokens="
             f"{cfg.max_new_tokens}, T={cfg.temperature}, dtype={cfg.dtype}")
    cols = TABLE_COLUMNS + (ROUNDS_COLUMNS if cfg.rounds > 1 else [])
    if cfg.rounds > 1:
        title += f", median of {cfg.rounds} rounds"
    log(format_table(table_rows(rows), cols, title))
    prof = [{"mode": r["mode"], "conc": r["conc"], **r["step_profile"]}
            for r in rows if r.get("step_profile")]
    if prof:
        log(format_table(prof, ["mode", "conc", "steps", "step_ms",
                                *[f"{p}_ms" for p in STEP_PARTS], "other_ms", "prefill_s",
                                "steps_share", "prefill_share"],
                         "where a decode step's time goes (ms per step; shares of wall time)"))
    return {
        "benchmark": "bench_speculative",
        "machine": machine_info(),
        "config": {"modes": cfg.modes, "concurrency": cfg.concurrency,
                   "model_path": cfg.model_path, "dtype": cfg.dtype,
                   "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                   "num_prompts": len(cfg.prompts),
                   "domains": sorted({p.domain for p in cfg.prompts}),
                   "num_draft_tokens": cfg.num_draft_tokens, "rounds": cfg.rounds},
        "results": rows,
    }
