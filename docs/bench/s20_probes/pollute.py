"""NONE's 1-token forward times when something runs between forwards: reading MB of memory,
or (``sleep``) idling MB milliseconds.

    python docs/bench/s20_probes/pollute.py MB [sum|sleep]
"""

import sys
import time

import torch

from dspark_sglang.benchmark.workloads import chat_prompt, load_prompts
from dspark_sglang.entrypoints.engine import Engine

mb = int(sys.argv[1])
how = sys.argv[2] if len(sys.argv) > 2 else "sum"
eng = Engine(None, speculative_algorithm="NONE", num_threads=2)
runner = eng.parts.runner
inner = runner.forward
buf = torch.randn(mb * 262144) if mb else None
rec: list[tuple[int, float]] = []


def forward(fb, *a, **k):
    t0 = time.perf_counter()
    out = inner(fb, *a, **k)
    rec.append((int(fb.input_ids.shape[0]), time.perf_counter() - t0))
    if buf is not None:
        if how == "sum":
            buf.sum()
        else:
            time.sleep(mb / 1000)
    return out


runner.forward = forward
texts = [chat_prompt(eng.tokenizer, p.text) for p in load_prompts(None, 3)[:8]]
eng.generate(texts[:1], {"max_new_tokens": 8, "temperature": 0})
rec.clear()
for t in texts:
    eng.generate([t], {"max_new_tokens": 64, "temperature": 0})
v = sorted(x for n, x in rec if n == 1)
print(f"between forwards {mb} ({how}): 1-token calls={len(v)} "
      f"median={1e3 * v[len(v) // 2]:.2f} ms p10={1e3 * v[len(v) // 10]:.2f}")
eng.shutdown()
