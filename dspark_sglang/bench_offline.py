"""``python -m dspark_sglang.bench_offline``: prefill and decode tokens/s, ours vs transformers.

    python -m dspark_sglang.bench_offline --dtypes float32 bfloat16 --batch-sizes 1 8 32

Prints a table per system and dtype and the ratios ours/transformers at batch 1 and our
largest-batch aggregate over our batch 1. See docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse

from dspark_sglang.benchmark.offline import OfflineConfig, run_offline_bench
from dspark_sglang.benchmark.report import parse_server_args, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dspark_sglang.bench_offline",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="median of this many runs per time")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    p.add_argument("--attention-backends", nargs="+", default=["auto"],
                   help="measure ours once per backend (the first is compared with "
                        "transformers), e.g. auto torch_native")
    p.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Engine field for ours, e.g. quantization=gguf (repeatable)")
    p.add_argument("--llamacpp", action="store_true",
                   help="also measure llama.cpp on the GGUF with its llama-bench "
                        "(scripts/build_llamacpp.sh)")
    p.add_argument("--llama-bench", default=None, help="llama-bench binary")
    p.add_argument("--output", default="bench_offline.json", help="JSON report path")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if min(a.batch_sizes) < 1 or a.prefill_len < 1 or a.decode_tokens < 1 or a.repeats < 1:
        raise SystemExit("batch sizes, lengths and repeats must be >= 1")
    cfg = OfflineConfig(model_path=a.model_path, dtypes=a.dtypes, batch_sizes=a.batch_sizes,
                        prefill_len=a.prefill_len, decode_prompt_len=a.decode_prompt_len,
                        decode_tokens=a.decode_tokens, repeats=a.repeats,
                        num_threads=a.num_threads, with_transformers=not a.no_transformers,
                        attention_backends=a.attention_backends, with_llamacpp=a.llamacpp,
                        llama_bench=a.llama_bench,
                        engine_extra=parse_server_args(a.server_arg))
    print(f"wrote {write_json(a.output, run_offline_bench(cfg))}")


if __name__ == "__main__":
    main()
