"""SGLang native API over real HTTP, with the real ``sglang`` frontend, on a tiny random model."""

from __future__ import annotations

import itertools
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.http_server import BackgroundServer
from dspark_sglang.server_args import ServerArgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from programs import (  # after the sys.path insert
    branch_merge,
    few_shot_qa,
    json_extraction,
    multi_turn_chat,
    tool_agent,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_native")
    make_tiny_model(d, seed=3)
    return d


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[str]:
    torch.set_num_threads(1)
    args = ServerArgs(model_path=str(tiny_dir), port=_free_port(), max_total_tokens=4096,
                      max_running_requests=16, num_threads=1, grammar_backend="llguidance")
    engine = Engine(server_args=args)
    srv = BackgroundServer(engine, args)
    yield srv.url
    srv.stop()
    engine.shutdown()


def _gen(url: str, body: Any, status: int = 200) -> Any:
    r = requests.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def _assert_no_leak(url: str) -> dict[str, Any]:
    """Wait until no request is in flight, then check free + cached + in_use == size."""
    for _ in range(200):
        info = requests.get(url + "/debug/check_integrity", timeout=30).json()
        if info["in_use"] == 0 and info["live_rids"] == 0:
            break
        time.sleep(0.05)
    assert info["ok"] and info["in_use"] == 0 and info["live_rids"] == 0, info
    assert info["free"] + info["cached"] == info["size"], info
    return info


# ---- basic protocol ---------------------------------------------------------------------------

def test_model_and_server_info(server: str) -> None:
    info = requests.get(server + "/get_model_info", timeout=10).json()
    assert info["model_path"] and info["is_generation"] is True
    for path in ("/server_info", "/get_server_info"):
        si = requests.get(server + path, timeout=10).json()
        assert "avg_spec_accept_length" in si
        assert si["internal_states"][0]["avg_spec_accept_length"] == si["avg_spec_accept_length"]
        assert "api_key" not in si
    assert requests.get(server + "/health", timeout=10).status_code == 200
    assert requests.get(server + "/health_generate", timeout=30).status_code == 200


def test_generate_single_batch_and_ids(server: str) -> None:
    sp = {"max_new_tokens": 6, "temperature": 0}
    one = _gen(server, {"text": "The quick brown", "sampling_params": sp})
    assert one["meta_info"]["completion_tokens"] == len(one["output_ids"]) <= 6
    assert one["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    batch = _gen(server, {"text": ["The quick brown", "Speculative"], "sampling_params": sp})
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["output_ids"] == one["output_ids"]  # greedy is deterministic
    ids = requests.post(server + "/encode", json={"text": "The quick brown"}).json()["input_ids"]
    by_ids = _gen(server, {"input_ids": ids, "sampling_params": sp})
    assert by_ids["output_ids"] == one["output_ids"]
    nb = _gen(server, {"input_ids": [ids, ids], "sampling_params": {**sp, "n": 2}})
    assert len(nb) == 4 and all(o["output_ids"] == one["output_ids"] for o in nb)
    _assert_no_leak(server)


def test_logprobs_wire_format(server: str) -> None:
    out = _gen(server, {"text": "def add(a, b):", "sampling_params": {"max_new_tokens": 3,
               "temperature": 0}, "return_logprob": True, "logprob_start_len": 2,
               "top_logprobs_num": 2, "return_text_in_logprobs": True})
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert inp[0][0] is None and len(inp) == meta["prompt_tokens"] - 2
    for lp, tid, text in inp[1:] + meta["output_token_logprobs"]:
        assert lp <= 0.0 and isinstance(tid, int) and isinstance(text, str)
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert len(meta["output_top_logprobs"]) == 3
    assert all(len(t) == 2 and len(t[0]) == 3 for t in meta["output_top_logprobs"])
    # greedy: the chosen token is the top-1 entry
    assert meta["output_top_logprobs"][0][0][1] == out["output_ids"][0]
    bare = _gen(server, {"text": "def add(a, b):", "sampling_params": {"max_new_tokens": 1},
                         "return_logprob": True})
    assert all(e[2] is None for e in bare["meta_info"]["output_token_logprobs"])


def test_stream_is_cumulative_sse_and_matches_non_stream(server: str) -> None:
    body = {"text": "Numbers 0123", "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    full = _gen(server, body)
    r = requests.post(server + "/generate", json={**body, "stream": True}, stream=True,
                      timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    texts = [json.loads(ln[5:])["text"] for ln in lines[:-1]]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert texts[-1] == full["text"]


def _stream_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = requests.post(url + "/generate", json={**body, "stream": True}, stream=True, timeout=60)
    assert r.status_code == 200, r.text
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[5:]) for ln in lines[:-1]]


LP_BODY = {"text": "Numbers 0123", "return_logprob": True, "top_logprobs_num": 2,
           "sampling_params": {"max_new_tokens": 12, "temperature": 0}}


def test_stream_logprobs_are_deltas(server: str) -> None:
    full = _gen(server, LP_BODY)["meta_info"]
    events = _stream_events(server, LP_BODY)
    got, tops = [], []
    for ev in events:
        m = ev["meta_info"]
        assert m["output_token_logprobs_length"] == m["completion_tokens"]
        got += m["output_token_logprobs"]
        tops += m["output_top_logprobs"]
        assert len(got) == m["completion_tokens"]
    assert [e[1] for e in got] == [e[1] for e in full["output_token_logprobs"]]
    assert [e[0] for e in got] == pytest.approx([e[0] for e in full["output_token_logprobs"]],
                                                abs=1e-4)
    assert [[t[1] for t in top] for top in tops] == \
        [[t[1] for t in top] for top in full["output_top_logprobs"]]
    assert events[-1]["text"] == _gen(server, LP_BODY)["text"]  # text stays cumulative


@pytest.fixture(scope="module")
def incremental_server(tiny_dir: Path) -> Iterator[str]:
    args = ServerArgs(model_path=str(tiny_dir), port=_free_port(), max_total_tokens=2048,
                      num_threads=1, incremental_streaming_output=True)
    engine = Engine(server_args=args)
    srv = BackgroundServer(engine, args)
    yield srv.url
    srv.stop()
    engine.shutdown()


def test_incremental_streaming_output(incremental_server: str) -> None:
    full = _gen(incremental_server, LP_BODY)
    events = _stream_events(incremental_server, LP_BODY)
    assert "".join(ev["text"] for ev in events) == full["text"]
    assert [i for ev in events for i in ev["output_ids"]] == full["output_ids"]
    got = [e for ev in events for e in ev["meta_info"]["output_token_logprobs"]]
    ref = full["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in got] == [e[1] for e in ref]  # a radix hit may move the 6th decimal
    assert [e[0] for e in got] == pytest.approx([e[0] for e in ref], abs=1e-4)


def test_stream_holds_back_stop_prefix(server: str) -> None:
    base = _gen(server, {"text": "Unicode: caf", "sampling_params": {"max_new_tokens": 10,
                         "temperature": 0}})
    if len(base["text"]) < 4:
        pytest.skip("tiny model produced too little text to build a stop string")
    stop = base["text"][2:4]
    body = {"text": "Unicode: caf", "sampling_params": {"max_new_tokens": 10, "temperature": 0,
            "stop": [stop]}, "stream": True}
    lines = [ln.decode() for ln in requests.post(server + "/generate", json=body, stream=True,
                                                 timeout=60).iter_lines() if ln]
    texts = [json.loads(ln[5:])["text"] for ln in lines[:-1]]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # never shrinks
    assert stop not in texts[-1] and texts[-1] == base["text"][: base["text"].find(stop)]


# ---- programs through sgl.RuntimeEndpoint ----------------------------------------------------

def test_program_multi_turn_chat(server: str) -> None:
    r = multi_turn_chat.main(server, max_tokens=8)
    assert len(r["answers"]) == 3
    assert all(m["completion_tokens"] <= 8 for m in r["meta"])
    # turn 2 re-sends turn 1: its prompt is served from the radix cache
    assert r["meta"][1]["cached_tokens"] > 0 and r["meta"][2]["cached_tokens"] > 0


def test_program_few_shot_select_scores(server: str) -> None:
    r = few_shot_qa.main(server)
    for (_q, choices), ans, meta, conf in zip(few_shot_qa.QUESTIONS, r["answers"],
                                            r["select_meta"], r["confidence"]):
        assert ans in choices and conf in ("low", "high")
        # the decision is the argmax of the mean input logprob of each choice
        scores = []
        for lps in meta["input_token_logprobs"]:
            vals = [e[0] for e in lps if e[0] is not None]
            scores.append(sum(vals) / len(vals))
        assert scores == pytest.approx(meta["normalized_prompt_logprobs"], abs=1e-5)
        assert choices[max(range(len(scores)), key=scores.__getitem__)] == ans


def test_select_logprobs_equal_reference_model(server: str, tiny_dir: Path) -> None:
    """The input logprobs ``select`` scores with are the model's: recompute them with HF."""
    from transformers import AutoModelForCausalLM

    prefix, choice = "Q: Which animal barks?\nA:", " dog"
    ids = requests.post(server + "/encode", json={"text": prefix + choice}).json()["input_ids"]
    out = _gen(server, {"text": [prefix + choice], "sampling_params": {"max_new_tokens": 0,
                        "temperature": 0}, "return_logprob": True,
                        "return_text_in_logprobs": True, "logprob_start_len": 3})[0]
    got = out["meta_info"]["input_token_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert got[0][0] is None and got[0][1] == ids[3]
    for k, (lp, tid, _) in enumerate(got[1:], start=4):
        assert tid == ids[k]
        assert lp == pytest.approx(float(ref[k - 1, tid]), abs=1e-4)


def test_program_branch_merge_hits_cache(server: str) -> None:
    before = requests.get(server + "/server_info").json()["cache_hit_tokens"]
    r = branch_merge.main(server, num_branches=3, max_tokens=6)
    after = requests.get(server + "/server_info").json()["cache_hit_tokens"]
    assert len(r["branch_meta"]) == 3
    prompt_len = r["branch_meta"][0]["prompt_tokens"]
    for m in r["branch_meta"]:  # every branch reuses the shared prompt's KV
        assert m["cached_tokens"] >= prompt_len - 8 > 0
    assert after - before >= 3 * (prompt_len - 8)
    assert r["summary_meta"]["cached_tokens"] > 0
    cat = branch_merge.main(server, num_branches=2, max_tokens=4, join_mode="concate_and_append")
    assert "Summary in one sentence:" in cat["text"]
    _assert_no_leak(server)


def test_program_json_extraction_validates(server: str) -> None:
    import jsonschema

    r = json_extraction.main(server, max_tokens=96)
    for rec in r["records"]:
        jsonschema.validate(rec, r["schema"])


def test_program_tool_agent(server: str) -> None:
    r = tool_agent.main(server, max_steps=3)
    assert 1 <= len(r["trace"]) <= 3
    for step in r["trace"]:
        assert step["tool"] in tool_agent.TOOLS
        if step["tool"] == "calculator":
            assert step["observation"] == tool_agent.run_tool("calculator", step["arg"])


def test_concate_and_append_with_server_rids(server: str) -> None:
    sp = {"max_new_tokens": 4, "temperature": 0}
    base = "The quick brown fox jumps over"
    dst = _gen(server, {"text": base, "sampling_params": {"max_new_tokens": 0}, "rid": "d1"})
    a = _gen(server, {"text": base + " A", "sampling_params": sp, "rid": "s1"})
    b = _gen(server, {"text": base + " B", "sampling_params": sp, "rid": "s2"})
    assert dst["meta_info"]["id"] == "d1"
    r = requests.post(server + "/concate_and_append_request",
                      json={"src_rids": ["s1", "s2"], "dst_rid": "d1"})
    assert r.status_code == 200, r.text
    joined = base + " A" + a["text"] + " B" + b["text"]
    assert r.json()["concatenated"] is True and r.json()["text"] == joined
    nxt = _gen(server, {"text": joined + "!", "sampling_params": {"max_new_tokens": 1}})
    assert nxt["meta_info"]["cached_tokens"] >= r.json()["prompt_tokens"] - 2
    unknown = requests.post(server + "/concate_and_append_request",
                            json={"src_rids": ["s1"], "dst_rid": "nope"})
    assert unknown.status_code == 404
    _assert_no_leak(server)


def test_flush_cache(server: str) -> None:
    _gen(server, {"text": "flush me please", "sampling_params": {"max_new_tokens": 1}})
    assert requests.post(server + "/flush_cache").status_code == 200
    info = _assert_no_leak(server)
    assert info["cached"] == 0


def test_metrics(server: str) -> None:
    _gen(server, {"text": "metrics", "sampling_params": {"max_new_tokens": 3}})
    text = requests.get(server + "/metrics").text
    for name in ("dspark_http_requests_total", "dspark_prompt_tokens_total",
                 "dspark_generation_tokens_total", "dspark_time_to_first_token_seconds_bucket",
                 "dspark_inter_token_latency_seconds_bucket", "dspark_avg_spec_accept_length",
                 "dspark_avg_verify_tokens_per_step", "dspark_cache_hit_rate",
                 "dspark_num_running_reqs", "dspark_num_queue_reqs", "dspark_kv_free_slots"):
        assert name in text, name
    line = next(ln for ln in text.splitlines()
                if ln.startswith("dspark_generation_tokens_total"))
    assert float(line.split()[-1]) >= 3
