"""Target forward times by token count in one speculative mode (15 eval prompts, 64 tokens).

    python docs/bench/s20_probes/fwd_times.py NONE|NGRAM|MTP1|DSPARK
"""

import sys
import time
from collections import defaultdict

from dspark_sglang.benchmark.workloads import chat_prompt, load_prompts
from dspark_sglang.entrypoints.engine import Engine

mode = sys.argv[1]
eng = Engine(None, speculative_algorithm=mode, num_threads=2)
runner = eng.parts.runner
inner = runner.forward
rec: dict[int, list[float]] = defaultdict(list)


def forward(fb, *a, **k):
    t0 = time.perf_counter()
    out = inner(fb, *a, **k)
    rec[int(fb.input_ids.shape[0])].append(time.perf_counter() - t0)
    return out


runner.forward = forward
texts = [chat_prompt(eng.tokenizer, p.text) for p in load_prompts(None, 3)[:15]]
eng.generate(texts[:1], {"max_new_tokens": 8, "temperature": 0})
rec.clear()
for t in texts:
    eng.generate([t], {"max_new_tokens": 64, "temperature": 0})
for n in sorted(rec):
    v = sorted(rec[n])
    if len(v) >= 5 and n <= 16:
        print(f"{mode} n={n:3d} calls={len(v):4d} median={1e3 * v[len(v) // 2]:.2f} ms "
              f"p10={1e3 * v[len(v) // 10]:.2f}")
eng.shutdown()
