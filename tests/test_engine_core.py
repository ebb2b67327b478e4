"""Engine core without speculation: batching, radix cache, chunked prefill, KV integrity."""

from __future__ import annotations

import pytest

from tests.conftest import PROMPTS, greedy


def _solo_outputs(engine, prompts, n=24):
    return [engine.generate(p, greedy(n))["output_ids"] for p in prompts]


def test_batch_equals_solo(make_engine, llama_dir):
    e = make_engine(llama_dir)
    solo = _solo_outputs(e, PROMPTS)
    batch = e.generate(PROMPTS, greedy(24))
    assert [o["output_ids"] for o in batch] == solo
    assert all(o["meta_info"]["completion_tokens"] == 24 for o in batch)
    e.check_integrity()


def test_radix_prefix_computes_only_suffix(make_engine, llama_dir):
    e = make_engine(llama_dir)
    base = "Speculative decoding drafts tokens and the target verifies them. " * 6
    first = e.generate(base + "First question?", greedy(8))
    before = e.get_server_info()["num_forward_tokens"]
    second = e.generate(base + "Second question?", greedy(8))
    computed = e.get_server_info()["num_forward_tokens"] - before
    n_prompt = second["meta_info"]["prompt_tokens"]
    cached = second["meta_info"]["cached_tokens"]
    assert cached >= len(e.tokenize(base)) - 2
    # prefill computes prompt - cached tokens, decode one per step after the first token
    assert computed == (n_prompt - cached) + (8 - 1)
    # identical output to an engine without the radix cache
    e2 = make_engine(llama_dir, disable_radix_cache=True)
    assert e2.generate(base + "Second question?", greedy(8))["output_ids"] == second["output_ids"]
    assert first["meta_info"]["cached_tokens"] == 0
    e.check_integrity()
    e2.check_integrity()


def test_eviction_under_pressure_keeps_outputs(make_engine, llama_dir):
    big = make_engine(llama_dir, max_total_tokens=8192)
    small = make_engine(llama_dir, max_total_tokens=300, max_running_requests=4)
    prompts = [f"Request number {i}: " + "tokens and more tokens " * (1 + i % 3) for i in range(10)]
    assert max(len(small.tokenize(p)) for p in prompts) < 120
    want = [big.generate(p, greedy(16))["output_ids"] for p in prompts]
    got = small.generate(prompts, greedy(16))
    assert [o["output_ids"] for o in got] == want
    info = small.check_integrity()
    assert info["in_use"] == 0 and info["free"] + info["cached"] == info["size"]


def test_chunked_prefill_matches(make_engine, llama_dir):
    long_prompt = "A long prompt that spans several prefill chunks. " * 12
    a = make_engine(llama_dir, chunked_prefill_size=16)
    b = make_engine(llama_dir, chunked_prefill_size=-1)
    assert a.generate(long_prompt, greedy(12))["output_ids"] == \
        b.generate(long_prompt, greedy(12))["output_ids"]
    a.check_integrity()


def test_allocator_returns_after_finish_abort_stop(make_engine, llama_dir):
    e = make_engine(llama_dir, disable_radix_cache=True)
    size = e.check_integrity()["free"]
    e.generate(PROMPTS[:3], greedy(10))
    assert e.check_integrity()["free"] == size
    # stop string inside the output: text trimmed, slots returned
    out = e.generate(PROMPTS[0], greedy(30))
    text = out["text"]
    stop = text[5:8]
    if stop.strip():
        o2 = e.generate(PROMPTS[0], greedy(30, stop=[stop]))
        assert o2["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert stop not in o2["text"] and text.startswith(o2["text"])
    assert e.check_integrity()["free"] == size
    # abort mid-stream
    it = e.generate(PROMPTS[1], greedy(200), stream=True)
    next(it)
    it.close()
    import time

    for _ in range(100):
        if e.check_integrity()["free"] == size:
            break
        time.sleep(0.05)
    assert e.check_integrity()["free"] == size


def test_stop_token_ids_and_max_new_tokens(make_engine, llama_dir):
    e = make_engine(llama_dir)
    out = e.generate(PROMPTS[2], greedy(12))
    ids = out["output_ids"]
    stop_tok = ids[4]
    o2 = e.generate(PROMPTS[2], greedy(12, stop_token_ids=[stop_tok]))
    k = ids.index(stop_tok)
    assert o2["output_ids"] == ids[: k + 1]
    assert o2["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    o0 = e.generate(PROMPTS[2], {"max_new_tokens": 0})
    assert o0["output_ids"] == [] and o0["meta_info"]["completion_tokens"] == 0


def test_sampling_seeded_deterministic(make_engine, llama_dir):
    e = make_engine(llama_dir)
    sp = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 7,
          "ignore_eos": True}
    a = e.generate(PROMPTS[0], sp)["output_ids"]
    b = e.generate(PROMPTS[0], sp)["output_ids"]
    c = e.generate(PROMPTS[0], {**sp, "seed": 8})["output_ids"]
    assert a == b and a != c


@pytest.mark.parametrize("bad,field", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"bogus": 1}, "bogus"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
])
def test_bad_sampling_params(make_engine, llama_dir, bad, field):
    e = make_engine(llama_dir)
    with pytest.raises(ValueError, match=field):
        e.generate("hello", bad)
    assert e.generate("hello", greedy(3))["meta_info"]["completion_tokens"] == 3


def test_bad_prompts_and_model(make_engine, llama_dir, tmp_path):
    e = make_engine(llama_dir, context_length=64)
    with pytest.raises(ValueError, match="context length"):
        e.generate("word " * 200, greedy(3))
    with pytest.raises(ValueError, match="empty"):
        e.generate(input_ids=[], sampling_params=greedy(3))
    with pytest.raises(ValueError, match="model_path"):
        make_engine(str(tmp_path / "nope"))
    e.check_integrity()


def test_queueing_when_pool_full(make_engine, llama_dir):
    e = make_engine(llama_dir, max_total_tokens=200, max_running_requests=16)
    outs = e.generate([f"Prompt {i} with some words" for i in range(12)], greedy(20))
    assert all(o["meta_info"]["completion_tokens"] == 20 for o in outs)
    info = e.check_integrity()
    assert info["in_use"] == 0


def test_siblings_sent_together_share_prefix(make_engine, llama_dir):
    """fork-style batches: requests with a common uncached prefix hit the cache after the first."""
    e = make_engine(llama_dir)
    base = "A shared system prompt that every branch of the fork repeats verbatim. " * 4
    outs = e.generate([base + f"Branch {i}." for i in range(4)], greedy(6))
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached[0] == 0 and all(c >= len(e.tokenize(base)) - 2 for c in cached[1:])
    solo = make_engine(llama_dir, disable_radix_cache=True)
    assert [o["output_ids"] for o in outs] == \
        [solo.generate(base + f"Branch {i}.", greedy(6))["output_ids"] for i in range(4)]


def test_model_loads_and_runs_on_the_scheduler_thread(make_engine, llama_dir, monkeypatch):
    """The scheduler thread loads the model, so it is the only engine thread that opens OpenMP
    regions (a second worker team makes libgomp sleep between kernels: 2x slower steps)."""
    import threading

    from dspark_sglang.entrypoints import engine as engine_mod

    seen: list[str] = []
    real = engine_mod.build_engine_parts

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(engine_mod, "build_engine_parts", spy)
    eng = make_engine(llama_dir)
    assert seen == ["dspark-scheduler"]
    forwards: list[str] = []
    runner = eng.parts.runner
    real_forward = runner.forward
    runner.forward = lambda fb: forwards.append(threading.current_thread().name) or \
        real_forward(fb)
    eng.generate(PROMPTS[:2], greedy(3))
    assert forwards and set(forwards) == {"dspark-scheduler"}

