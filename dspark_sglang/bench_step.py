"""``python -m dspark_sglang.bench_step``: where a decode step's time goes.

    python -m dspark_sglang.bench_step --quantizations none gguf --batch-size 1 --num-threads 2

Per quantization: one decode step split into matmul / attention / other operators / outside any
operator (Python, scheduler), the weight bandwidth it reaches against the machine's, and the
cost of verifying 1/2/4/8 tokens. Method: :mod:`dspark_sglang.benchmark.step_cost`.
"""

from __future__ import annotations

import argparse

from dspark_sglang.benchmark.report import write_json
from dspark_sglang.benchmark.step_cost import StepCostConfig, run_step_cost


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dspark_sglang.bench_step",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--quantizations", nargs="+", default=["none", "gguf"],
                   choices=["none", "gguf"])
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--verify-tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--output", default="bench_step.json", help="JSON report path")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.steps < 2 or min(a.verify_tokens) < 1:
        raise SystemExit("batch size, steps and verify token counts must be >= 1")
    cfg = StepCostConfig(model_path=a.model_path, quantizations=a.quantizations,
                         attention_backend=a.attention_backend, batch_size=a.batch_size,
                         prompt_len=a.prompt_len, steps=a.steps,
                         verify_tokens=tuple(sorted(set(a.verify_tokens))),
                         num_threads=a.num_threads)
    print(f"wrote {write_json(a.output, run_step_cost(cfg))}")


if __name__ == "__main__":
    main()
