"""``python -m dspark_sglang.bench_serving``: HTTP load against our server, modes and peers.

    python -m dspark_sglang.bench_serving --launch --modes NONE MTP1 DSPARK NGRAM \
        --concurrency 1 8 32 --peers hf hf-prompt-lookup llamacpp --plot plots/
    python -m dspark_sglang.bench_serving --modes NONE DSPARK --concurrency 1 8 \
        --peers llamacpp-server llamacpp-server-dspark --llama-server PATH/llama-server

Launches one server per mode (or drives ``--url``), runs a concurrency sweep and/or Poisson
request rates over prompt files and JSON-schema task files, and prints a table, ratios against
peers and the project's goals; writes JSON and, with ``--plot``, PNG charts.
"""

from __future__ import annotations

import argparse

from dspark_sglang.benchmark.engine_runner import ENGINE_MODES
from dspark_sglang.benchmark.http_load import LoadLevel
from dspark_sglang.benchmark.peers import PEERS
from dspark_sglang.benchmark.plots import write_plots
from dspark_sglang.benchmark.report import parse_server_args, write_json
from dspark_sglang.benchmark.serving import ServingConfig, run_serving_bench
from dspark_sglang.benchmark.workloads import load_prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dspark_sglang.bench_serving",
                                description=__doc__.split("\n")[0])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="drive this running server")
    target.add_argument("--launch", action="store_true",
                        help="launch our server once per --modes entry (the default)")
    p.add_argument("--modes", nargs="*", default=["NONE", "NGRAM"], choices=list(ENGINE_MODES))
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: what the server picks (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--api", default="native", choices=["native", "openai"])
    p.add_argument("--concurrency", nargs="*", type=int, default=None,
                   help="closed-loop client counts (default: 1 when no --request-rate)")
    p.add_argument("--request-rate", nargs="*", type=float, default=None,
                   help="Poisson arrival rates in requests/s")
    p.add_argument("--prompt-file", nargs="*", default=None,
                   help="prompt / JSON-schema task files or folders; default: "
                        "shared/workloads/eval/*.jsonl")
    p.add_argument("--prompts-per-file", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="native API over SSE (records TTFT)")
    p.add_argument("--peers", nargs="*", default=[], choices=list(PEERS))
    p.add_argument("--peer-prompts", type=int, default=None, help="prompts per peer")
    p.add_argument("--install-peers", action="store_true",
                   help="pip-install missing peer packages (transformers, cyllama) first")
    p.add_argument("--llama-server", default=None,
                   help="llama-server binary for the llamacpp-server peers (default: "
                        "$DSPARK_LLAMA_SERVER, then PATH)")
    p.add_argument("--llamacpp-draft-max", type=int, default=7,
                   help="llamacpp-server-dspark: --spec-draft-n-max")
    p.add_argument("--dspark-drafter", default=None,
                   help="drafter exported for llamacpp-server-dspark (default: the shipped one)")
    p.add_argument("--log-dir", default=None, help="logs of the llama-server peers")
    p.add_argument("--assistant-model-path", default=None, help="hf-assisted draft model")
    p.add_argument("--draft-model-path", default=None, help="STANDALONE draft model")
    p.add_argument("--num-draft-tokens", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra ServerArgs field for every launched mode, e.g. "
                        "quantization=gguf (repeatable)")
    p.add_argument("--output", default="bench_serving.json", help="JSON report path")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts into DIR")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    levels = [LoadLevel("conc", c) for c in (a.concurrency or [])]
    levels += [LoadLevel("rate", r) for r in (a.request_rate or [])]
    if not levels:
        levels = [LoadLevel("conc", 1)]
    if any(lv.value <= 0 for lv in levels):
        raise SystemExit("concurrency and request rates must be > 0")
    cfg = ServingConfig(
        items=load_prompts(a.prompt_file, a.prompts_per_file, a.num_prompts), modes=a.modes,
        levels=levels, url=a.url, model_path=a.model_path, dtype=a.dtype, api=a.api,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
        stream=a.stream, progress=not a.no_progress, peers=a.peers, peer_prompts=a.peer_prompts,
        install_peers=a.install_peers,
        assistant_model_path=a.assistant_model_path, draft_model_path=a.draft_model_path,
        num_draft_tokens=a.num_draft_tokens, num_threads=a.num_threads,
        max_total_tokens=a.max_total_tokens, max_running_requests=a.max_running_requests,
        chat_template=not a.no_chat_template, llama_server=a.llama_server,
        dspark_drafter=a.dspark_drafter, llamacpp_draft_max=a.llamacpp_draft_max,
        log_dir=a.log_dir, server_extra=parse_server_args(a.server_arg))
    report = run_serving_bench(cfg)
    print(f"wrote {write_json(a.output, report)}")
    if a.plot:
        load_key = "conc" if levels[0].kind == "conc" else "rate"
        for path in write_plots(report["results"], a.plot, load_key, report["peers"]):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
