"""Where a DSPARK draft (``DSparkWorker.propose``) spends its time at batch 1, budget off.

    python docs/bench/s20_probes/prof_draft.py [DRAFTER_DIR]
"""

import sys
import time
from collections import defaultdict

from dspark_sglang.benchmark.workloads import chat_prompt, load_prompts
from dspark_sglang.entrypoints.engine import Engine

kw = {"speculative_algorithm": "DSPARK", "speculative_dspark_disable_draft_budget": True,
      "num_threads": 2}
if len(sys.argv) > 1:
    kw["speculative_draft_model_path"] = sys.argv[1]
eng = Engine(None, **kw)
worker = eng.parts.decoder.worker
drafter = worker.drafter
tot: dict[str, float] = defaultdict(float)
cnt: dict[str, int] = defaultdict(int)


def wrap(obj, name, label):
    inner = getattr(obj, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            tot[label] += time.perf_counter() - t0
            cnt[label] += 1

    object.__setattr__(obj, name, timed)  # (the policy is a frozen dataclass)


wrap(worker, "propose", "propose")
wrap(worker, "_forward_block_stack", "block_stack_fwd")
wrap(drafter, "base_logits", "base_logits")
wrap(drafter, "sample_chain", "sample_chain")
wrap(drafter, "confidence_logits", "confidence_logits")
wrap(worker.policy, "verify_lengths", "verify_lengths")
wrap(worker, "on_target_forward", "on_target_forward")
texts = [chat_prompt(eng.tokenizer, p.text) for p in load_prompts(None, 2)[:6]]
eng.generate(texts[:1], {"max_new_tokens": 16, "temperature": 0})
tot.clear()
cnt.clear()
stack = worker.block_stack()
stack.set_profile(True)
stack.take_times()
for t in texts:
    eng.generate([t], {"max_new_tokens": 128, "temperature": 0})
n = max(cnt["propose"], 1)
for k in sorted(tot, key=lambda k: -tot[k]):
    print(f"  {k:20s} {1e3 * tot[k] / n:7.3f} ms/propose  ({cnt[k]} calls)")
print("C++ stack (matmul, attention, other) ms/propose:",
      [round(1e3 * x / n, 3) for x in stack.take_times()])
eng.shutdown()
