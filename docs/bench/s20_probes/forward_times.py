"""Target forward times by token count in one speculative mode, optionally with something run
after every forward: reading MB of memory (``--read-mb``) or idling (``--sleep-ms``).

    python docs/bench/s20_probes/forward_times.py NONE|NGRAM|MTP1|DSPARK [--read-mb N]
        [--sleep-ms N] [--prompts 15]
"""

import argparse
import time
from collections import defaultdict

import torch

from dspark_sglang.benchmark.workloads import chat_prompt, load_prompts
from dspark_sglang.entrypoints.engine import Engine

ap = argparse.ArgumentParser()
ap.add_argument("mode")
ap.add_argument("--read-mb", type=int, default=0)
ap.add_argument("--sleep-ms", type=float, default=0.0)
ap.add_argument("--prompts", type=int, default=15)
args = ap.parse_args()
eng = Engine(None, speculative_algorithm=args.mode, num_threads=2)
runner = eng.parts.runner
inner = runner.forward
buf = torch.randn(args.read_mb * 262144) if args.read_mb else None
rec: dict[int, list[float]] = defaultdict(list)


def forward(fb, *a, **k):
    t0 = time.perf_counter()
    out = inner(fb, *a, **k)
    rec[int(fb.input_ids.shape[0])].append(time.perf_counter() - t0)
    if buf is not None:
        buf.sum()
    if args.sleep_ms:
        time.sleep(args.sleep_ms / 1000)
    return out


runner.forward = forward
texts = [chat_prompt(eng.tokenizer, p.text) for p in load_prompts(None, 3)[:args.prompts]]
eng.generate(texts[:1], {"max_new_tokens": 8, "temperature": 0})
rec.clear()
for t in texts:
    eng.generate([t], {"max_new_tokens": 64, "temperature": 0})
for n in sorted(rec):
    v = sorted(rec[n])
    if len(v) >= 5 and n <= 16:
        print(f"{args.mode} read {args.read_mb} MB sleep {args.sleep_ms} ms: n={n:3d} "
              f"calls={len(v):4d} median={1e3 * v[len(v) // 2]:.2f} ms "
              f"p10={1e3 * v[len(v) // 10]:.2f}")
eng.shutdown()
