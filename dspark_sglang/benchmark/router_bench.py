"""Cache hit rate and aggregate throughput of replicas behind sglang-router.

    python -m dspark_sglang.benchmark.router_bench [--model-path M] [--sessions 16] \\
        [--concurrency 8] [--configs 1:cache_aware,2:round_robin,2:cache_aware] [--json out.json]

For each ``dp_size:policy`` it starts a :class:`RouterDeployment` (each replica pinned to its own
cores), then runs ``sessions`` multi-call programs through the router, ``concurrency`` at a
time. A program is what ``programs/`` do on the wire: a session-specific prefix, ``fork``
branches that extend it (sent together), then multi-turn continuations that resend the growing
conversation. Reported per configuration: cache hit rate = sum(cached_tokens) /
sum(prompt_tokens) over every request, and completion tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from dspark_sglang.entrypoints.runtime import free_port
from dspark_sglang.launch_router import RouterArgs, RouterDeployment
from dspark_sglang.server_args import ServerArgs

TOPICS = ["rivers", "bread", "compilers", "chess", "volcanoes", "jazz", "bridges", "bees",
          "glaciers", "printing", "tides", "lanterns", "deserts", "clocks", "orchards", "kites"]


def _gen(url: str, text: str, max_new_tokens: int, stats: dict[str, int]) -> str:
    r = requests.post(url + "/generate", json={
        "text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                          "ignore_eos": True}}, timeout=600)
    r.raise_for_status()
    out = r.json()
    meta = out["meta_info"]
    stats["prompt"] += meta["prompt_tokens"]
    stats["cached"] += meta["cached_tokens"]
    stats["completion"] += meta["completion_tokens"]
    return str(out["text"])


def run_session(url: str, i: int, branches: int, turns: int, max_new_tokens: int
                ) -> dict[str, int]:
    """One program: prefix, ``branches`` forks sent together, then ``turns`` continuations."""
    stats = {"prompt": 0, "cached": 0, "completion": 0}
    topic = TOPICS[i % len(TOPICS)]
    prefix = (f"Session {i}. You are an expert on {topic}. " * 6
              + f"Answer questions about {topic} briefly.\n")
    _gen(url, prefix, 0, stats)  # the frontend's fork warm-up
    with ThreadPoolExecutor(branches) as ex:
        list(ex.map(lambda b: _gen(url, prefix + f"Idea {b + 1}:", max_new_tokens, stats),
                    range(branches)))
    convo = prefix
    for t in range(turns):
        convo += f"Q{t + 1}: tell me more about {topic}.\nA:"
        convo += _gen(url, convo, max_new_tokens, stats) + "\n"
    return stats


def measure(server_args: ServerArgs, dp_size: int, policy: str, sessions: int,
            concurrency: int, branches: int, turns: int, max_new_tokens: int) -> dict[str, Any]:
    ra = RouterArgs(dp_size=dp_size, router_policy=policy, replica_cpus="auto")
    with RouterDeployment(server_args.replace(port=free_port()), ra) as dep:
        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as ex:
            parts = list(ex.map(lambda i: run_session(dep.url, i, branches, turns,
                                                      max_new_tokens), range(sessions)))
        wall = time.monotonic() - t0
    tot = {k: sum(p[k] for p in parts) for k in ("prompt", "cached", "completion")}
    return {"dp_size": dp_size, "policy": policy, "sessions": sessions, "wall_s": wall,
            "hit_rate": tot["cached"] / max(1, tot["prompt"]), **tot,
            "completion_tok_s": tot["completion"] / wall}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--speculative-algorithm", default="NONE")
    p.add_argument("--configs", default="1:cache_aware,2:round_robin,2:cache_aware")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    sa = ServerArgs(model_path=a.model_path, speculative_algorithm=a.speculative_algorithm,
                    log_level="warning", max_total_tokens=16384)
    rows = []
    for cfg in a.configs.split(","):
        dp, policy = cfg.split(":")
        rows.append(measure(sa, int(dp), policy, a.sessions, a.concurrency, a.branches,
                            a.turns, a.max_new_tokens))
    print(f"{'replicas':>8} {'policy':>12} {'prompt tok':>10} {'cached':>8} {'hit rate':>8} "
          f"{'out tok':>8} {'wall s':>7} {'out tok/s':>9}")
    for r in rows:
        print(f"{r['dp_size']:>8} {r['policy']:>12} {r['prompt']:>10} {r['cached']:>8} "
              f"{r['hit_rate']:>8.3f} {r['completion']:>8} {r['wall_s']:>7.1f} "
              f"{r['completion_tok_s']:>9.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
