"""No KV slot leaks across thousands of scheduler steps with aborts, stops and retractions."""

from __future__ import annotations

import random

import pytest

from dspark_sglang.core.req import Req
from dspark_sglang.core.sampling_params import SamplingParams


@pytest.mark.parametrize("algo", ["DSPARK", pytest.param("NGRAM", marks=pytest.mark.slow),
                                  pytest.param("TREE", marks=pytest.mark.slow)])
def test_thousands_of_steps_with_aborts(llama_dir, drafter_dir, algo, tmp_path):
    from dspark_sglang.entrypoints.model_setup import build_engine_parts
    from dspark_sglang.server_args import ServerArgs
    from dspark_sglang.speculative.sps_profile import SPSTable

    sps = tmp_path / "sps.json"
    SPSTable.from_measurements({1: 100.0, 8: 90.0, 32: 40.0, 128: 10.0}).save(sps)
    kw = {"speculative_draft_model_path": drafter_dir} if algo != "NGRAM" else {}
    args = ServerArgs(model_path=llama_dir, dtype="float32", max_total_tokens=600,
                      max_running_requests=12, chunked_prefill_size=32,
                      speculative_algorithm=algo, speculative_dspark_sps_table_path=str(sps),
                      **kw)
    parts = build_engine_parts(args, emit=lambda r, f: None)
    sched, cache = parts.scheduler, parts.cache
    tok = parts.tokenizer
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "tokens", "repeat", "a b c", "the end"]
    live: list[str] = []
    steps = n = 0
    while steps < 1200:
        if rng.random() < 0.3 and sched.num_in_flight() < 20:
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
            sp = SamplingParams(max_new_tokens=rng.randint(1, 40),
                                temperature=rng.choice([0.0, 0.0, 0.7]),
                                stop=[rng.choice(words)] if rng.random() < 0.3 else [])
            req = Req(f"r{n}", tok.encode(prompt), sp)
            if sp.temperature > 0:
                import torch

                req.generator = torch.Generator().manual_seed(n)
            sched.add_request(req)
            live.append(req.rid)
            n += 1
        if live and rng.random() < 0.08:
            sched.abort(live.pop(rng.randrange(len(live))))
        if sched.has_work():
            sched.step()
        steps += 1
        if steps % 100 == 0:
            cache.check_integrity()
    while sched.has_work():
        sched.step()
    cache.check_integrity()
    assert cache.in_use() == 0
    assert cache.allocator.available_size() + cache.tree.total_size() == cache.allocator.size
    assert sched.finished_count >= n * 0.9
    if algo == "DSPARK":
        assert parts.decoder.stats.steps > 100
