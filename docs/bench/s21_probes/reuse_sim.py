"""Could a step verify the previous draft's unverified tail instead of drafting again? At c=1,
greedy, 15 eval prompts x 64 tokens: how many drafting steps had every verified draft accepted
and the target's next token equal to the next drafted one (the tail would then still be a
valid proposal), and how many tail tokens the target then produced.

    python docs/bench/s21_probes/reuse_sim.py [off]    # off: the draft budget off
"""

import sys

from dspark_sglang.benchmark.workloads import chat_prompt, load_prompts
from dspark_sglang.entrypoints.engine import Engine

budget_off = len(sys.argv) > 1 and sys.argv[1] == "off"
eng = Engine(None, speculative_algorithm="DSPARK",
             speculative_dspark_disable_draft_budget=budget_off, num_threads=2)
worker = eng.parts.decoder.worker
drafter = worker.drafter
records = []  # (rid, tokens generated before the step, the whole drafted chain, verified)
last_chain: list[list[int]] = []
inner_propose, inner_chain = worker._propose, drafter.sample_chain


def chain(*a, **k):  # type: ignore[no-untyped-def]
    ch = inner_chain(*a, **k)
    last_chain[:] = ch.tokens.tolist()
    return ch


def propose(reqs, rooms):  # type: ignore[no-untyped-def]
    out = inner_propose(reqs, rooms)
    for i, (r, d) in enumerate(zip(reqs, out)):
        records.append((r.rid, len(r.output_ids), last_chain[i] if last_chain else [],
                        len(d.tokens)))
    return out


drafter.sample_chain = chain
worker._propose = propose
outs = {}
for text in [chat_prompt(eng.tokenizer, p.text) for p in load_prompts(None, 3)]:
    o = eng.generate([text], {"max_new_tokens": 64, "temperature": 0})[0]
    outs[o["meta_info"]["id"]] = o["output_ids"]
reusable = tail_len = matched = 0
for rid, n, drafted, verified in records:
    out = outs.get(rid)
    if out is None or verified >= len(drafted):
        continue
    if out[n:n + verified] == drafted[:verified] and n + verified < len(out) \
            and out[n + verified] == drafted[verified]:
        reusable += 1
        tail = drafted[verified + 1:]
        tail_len += len(tail)
        j = 0
        while j < len(tail) and n + verified + 1 + j < len(out) \
                and out[n + verified + 1 + j] == tail[j]:
            j += 1
        matched += j
print(f"budget {'off' if budget_off else 'on'}: {len(records)} drafting steps, {reusable} with "
      f"a reusable tail ({reusable / max(len(records), 1):.2f}), mean tail "
      f"{tail_len / max(reusable, 1):.2f} tokens, of which the target produced "
      f"{matched / max(reusable, 1):.2f}")
eng.shutdown()
