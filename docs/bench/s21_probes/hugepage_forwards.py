"""Target forward times by token count (15 eval prompts x 64 tokens, NONE or DSPARK): run it
with DSPARK_HUGEPAGES=0 and =1 (the repacked GGUF weights on 4 KiB or 2 MiB pages,
dspark_kernels/hugepages.py), alternating processes.

    DSPARK_HUGEPAGES=0|1 python docs/bench/s21_probes/hugepage_forwards.py NONE|DSPARK
"""

import os
import sys
import time
from collections import defaultdict

from dspark_kernels.hugepages import hugepages_available
from dspark_sglang.benchmark.workloads import chat_prompt, load_prompts
from dspark_sglang.entrypoints.engine import Engine

mode = sys.argv[1] if len(sys.argv) > 1 else "NONE"
eng = Engine(None, speculative_algorithm=mode, num_threads=2)
runner = eng.parts.runner
inner = runner.forward
rec: dict[int, list[float]] = defaultdict(list)


def forward(fb, *a, **k):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = inner(fb, *a, **k)
    rec[int(fb.input_ids.shape[0])].append(time.perf_counter() - t0)
    return out


runner.forward = forward
texts = [chat_prompt(eng.tokenizer, p.text) for p in load_prompts(None, 3)[:15]]
eng.generate(texts[:1], {"max_new_tokens": 8, "temperature": 0})
rec.clear()
t0 = time.perf_counter()
for t in texts:
    eng.generate([t], {"max_new_tokens": 64, "temperature": 0})
wall = time.perf_counter() - t0
line = [f"huge pages {'on' if hugepages_available() else 'off'} "
        f"(DSPARK_HUGEPAGES={os.environ.get('DSPARK_HUGEPAGES', '1')}) {mode} wall {wall:.2f} s"]
for n in sorted(rec):
    v = sorted(rec[n])
    if len(v) >= 5 and n <= 8:
        line.append(f"n{n}: {1e3 * v[len(v) // 2]:.2f} ms ({len(v)})")
print("  ".join(line))
eng.shutdown()
