"""``python -m dspark_sglang.bench_speculative``: speculative modes side by side, one process.

    python -m dspark_sglang.bench_speculative --modes NONE MTP1 CHAIN DSPARK NGRAM TREE \
        --concurrency 1 8 32 --max-new-tokens 64 --output spec.json

Prints per mode and concurrency: output tokens/s, speedup vs NONE and vs MTP1, tau, verify
tokens per step, and (greedy) how many outputs equal NONE's. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from dspark_sglang.benchmark.engine_runner import ENGINE_MODES
from dspark_sglang.benchmark.plots import write_plots
from dspark_sglang.benchmark.report import parse_server_args, write_json
from dspark_sglang.benchmark.speculative import SpecBenchConfig, run_spec_bench
from dspark_sglang.benchmark.workloads import load_prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dspark_sglang.bench_speculative",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: what the server picks (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--modes", nargs="+", default=["NONE", "MTP1", "CHAIN", "DSPARK", "NGRAM",
                                                   "TREE"], choices=list(ENGINE_MODES))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-file", nargs="*", default=None,
                   help="prompt files / folders ({'turns': [...]} lines); default: "
                        "shared/workloads/eval/*.jsonl")
    p.add_argument("--prompts-per-file", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=None, help="cap on prompts in all")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; e.g. 1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="--speculative-num-draft-tokens for CHAIN / NGRAM / TREE / STANDALONE")
    p.add_argument("--draft-model-path", default=None, help="STANDALONE draft LM")
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--output", default="bench_speculative.json", help="JSON report path")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts into DIR")
    p.add_argument("--profile-steps", action="store_true",
                   help="time each decode step's parts (draft, target, context update, accept)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the modes this many times (order rotated each round) and report "
                        "each mode's median round: steadier ratios on a machine whose speed "
                        "drifts")
    p.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Engine / ServerArgs field for every mode, e.g. "
                        "speculative_token_map=none (repeatable)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    prompts = load_prompts(args.prompt_file, args.prompts_per_file, args.num_prompts)
    cfg = SpecBenchConfig(
        prompts=prompts, modes=args.modes, concurrency=args.concurrency,
        model_path=args.model_path, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, num_draft_tokens=args.num_draft_tokens,
        draft_model_path=args.draft_model_path, max_total_tokens=args.max_total_tokens,
        num_threads=args.num_threads, chat_template=not args.no_chat_template,
        profile_steps=args.profile_steps, rounds=args.rounds,
        engine_extra=parse_server_args(args.server_arg))
    report = run_spec_bench(cfg)
    print(f"wrote {write_json(args.output, report)}")
    if args.plot:
        for path in write_plots(report["results"], args.plot, load_key="conc"):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
