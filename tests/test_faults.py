"""One bad request must never hurt another (issue 15): poison inputs get a 4xx naming the field,
failures inside a step finish only the failing request, disconnects / timeouts / overload are
handled, and a victim request running alongside finishes token-identical to running alone."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.core.forward_batch import ForwardMode
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.http_server import BackgroundServer
from dspark_sglang.server_args import ServerArgs, parse_args

VICTIM = {"text": "The victim request keeps going", "sampling_params": {
    "max_new_tokens": 40, "temperature": 0, "ignore_eos": True}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d: Path = tmp_path_factory.mktemp("tiny_faults")
    make_tiny_model(d, seed=11)
    return str(d)


def _args(model_dir: str, **kw: Any) -> ServerArgs:
    base: dict[str, Any] = dict(model_path=model_dir, port=_free_port(), max_total_tokens=2048,
                                num_threads=1, context_length=512, dtype="float32",
                                chunked_prefill_size=64)
    base.update(kw)
    return ServerArgs(**base)


@pytest.fixture(scope="module")
def srv(model_dir: str) -> Iterator[tuple[str, Engine]]:
    torch.set_num_threads(1)
    args = _args(model_dir, max_total_tokens=300, context_length=512)  # pool < context
    engine = Engine(server_args=args)
    server = BackgroundServer(engine, args)
    yield server.url, engine
    server.stop()
    engine.shutdown()


def _post(url: str, body: Any, path: str = "/generate", **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"},
                         timeout=kw.pop("timeout", 60), **kw)


def _assert_clean(url: str) -> None:
    for _ in range(200):
        info = requests.get(url + "/debug/check_integrity", timeout=30).json()
        if info["in_use"] == 0 and info["live_rids"] == 0:
            break
        time.sleep(0.05)
    assert info["ok"] and info["in_use"] == 0 and info["live_rids"] == 0, info
    assert info["free"] + info["cached"] == info["size"]


def _slow_forward(engine: Engine, delay: float) -> Callable[[], None]:
    """Make every target forward take ``delay`` s longer; returns the undo function."""
    runner = engine.parts.runner
    orig = runner.forward

    def slow(fb: Any) -> Any:
        time.sleep(delay)
        return orig(fb)

    runner.forward = slow  # type: ignore[method-assign]
    return lambda: setattr(runner, "forward", orig)


def _deep(n: int) -> str:
    return '{"text": "x", "sampling_params": {"custom_params": ' + "[" * n + "]" * n + "}}"


POISON: list[tuple[str, bytes, str]] = [  # (case, body, the field the message must name)
    ("top_k 2^63", json.dumps({"text": "x", "sampling_params": {"top_k": 2**63}}).encode(),
     "top_k"),
    ("skip_special_tokens str", json.dumps({"text": "x", "sampling_params": {
        "max_new_tokens": 4, "skip_special_tokens": "no"}}).encode(), "skip_special_tokens"),
    ("ignore_eos int", json.dumps({"text": "x", "sampling_params": {"ignore_eos": 1}}).encode(),
     "ignore_eos"),
    ("seed 2^64", json.dumps({"text": "x", "sampling_params": {"seed": 2**64}}).encode(),
     "seed"),
    ("seed negative", json.dumps({"text": "x", "sampling_params": {"seed": -1}}).encode(),
     "seed"),
    ("regex too large", json.dumps({"text": "x", "sampling_params": {
        "regex": "(a{1000}){1000}"}}).encode(), "regex"),
    ("schema too deep", json.dumps({"text": "x", "sampling_params": {
        "json_schema": '{"type": "array", "items": ' * 200 + "{}" + "}" * 200}}).encode(),
     "json_schema"),
    ("sampling_params list short", json.dumps({"text": ["a", "b", "c"],
                                               "sampling_params": [{}]}).encode(),
     "sampling_params"),
    ("rid list short", json.dumps({"text": ["a", "b"], "rid": ["r1"]}).encode(), "rid"),
    ("logprob_start_len short", json.dumps({"text": ["a", "b"], "return_logprob": True,
                                            "logprob_start_len": [0]}).encode(),
     "logprob_start_len"),
    ("top_logprobs_num short", json.dumps({"text": ["a", "b"], "return_logprob": True,
                                           "top_logprobs_num": [1]}).encode(),
     "top_logprobs_num"),
    ("deep json body", _deep(100_000).encode(), "nested"),
    ("lone surrogate text", b'{"text": "a\\ud800b"}', "text"),
    ("lone surrogate stop", b'{"text": "a", "sampling_params": {"stop": "\\udfff"}}', "stop"),
    ("never fits the pool", json.dumps({"text": "x", "sampling_params": {
        "max_new_tokens": 400}}).encode(), "max_new_tokens"),
    ("huge text", json.dumps({"text": "y" * 3_000_000}).encode(), "text"),
]


@pytest.mark.parametrize(("case", "body", "field"), POISON, ids=[c for c, _, _ in POISON])
def test_poison_is_4xx_naming_the_field(srv: tuple[str, Engine], case: str, body: bytes,
                                        field: str) -> None:
    url, _ = srv
    t0 = time.monotonic()
    r = _post(url, body)
    assert r.status_code == 400, (case, r.status_code, r.text[:300])
    assert field in r.json()["error"]["message"], (case, r.text[:300])
    assert time.monotonic() - t0 < 10


def test_victim_unharmed_by_poison(srv: tuple[str, Engine]) -> None:
    url, _ = srv
    alone = _post(url, VICTIM).json()["output_ids"]
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _post(url, VICTIM)))
    t.start()
    for _, body, _ in POISON:
        assert _post(url, body).status_code == 400
    t.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["output_ids"] == alone
    _assert_clean(url)


def test_skip_special_tokens_str_leaves_no_live_rid(srv: tuple[str, Engine]) -> None:
    url, engine = srv
    r = _post(url, {"text": "x", "rid": "sst", "sampling_params": {
        "max_new_tokens": 4, "skip_special_tokens": "no"}})
    assert r.status_code == 400 and "skip_special_tokens" in r.text
    assert engine.num_live() == 0
    _assert_clean(url)


# ---- failures inside a scheduler step --------------------------------------------------------

def _run_pair(engine: Engine, victim_sp: dict[str, Any], poison_rid: str,
              prompts: tuple[str, str] = ("A victim prompt", "A poison prompt")
              ) -> list[dict[str, Any]]:
    return engine.generate(list(prompts), [victim_sp, {"max_new_tokens": 30,
                                                       "ignore_eos": True}],
                           rid=["victim", poison_rid])


@pytest.mark.parametrize("algo", ["NONE", "NGRAM", "DSPARK"])
@pytest.mark.parametrize("where", ["verify", "prefill", "output"])
def test_step_failure_finishes_only_the_failing_request(
        model_dir: str, drafter_dir_for: Callable[[str], tuple[str, str]], algo: str,
        where: str) -> None:
    kw: dict[str, Any] = {"speculative_algorithm": algo}
    if algo == "DSPARK":
        drafter, sps = drafter_dir_for(model_dir)
        kw.update(speculative_draft_model_path=drafter, speculative_dspark_sps_table_path=sps,
                  speculative_dspark_disable_draft_budget=True)
    with Engine(server_args=_args(model_dir, **kw)) as engine:
        sched, dec = engine.parts.scheduler, engine.parts.decoder
        greedy = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
        sampled = {"max_new_tokens": 24, "temperature": 0.9, "seed": 5, "ignore_eos": True}
        alone = [engine.generate("A victim prompt", sp)["output_ids"] for sp in (greedy, sampled)]
        size = engine.check_integrity()["size"]

        def poisoned(reqs: list[Any]) -> bool:
            return any(r.rid == "poison" and len(r.output_ids) >= 3 for r in reqs)

        if where == "verify":  # after the slots were allocated and the target ran
            orig_accept = dec._accept

            def accept(reqs: list[Any], drafts: Any, logits: Any) -> Any:
                out = orig_accept(reqs, drafts, logits)  # sampling consumed the generators
                if poisoned(reqs):
                    raise RuntimeError("injected verify fault")
                return out
            dec._accept = accept  # type: ignore[method-assign]
        elif where == "prefill":
            orig_pf = sched._prefill_forward

            def prefill_forward(batch: list[Any], slots: Any) -> Any:
                if any(r.rid == "poison" for r, _ in batch):
                    raise RuntimeError("injected prefill fault")
                return orig_pf(batch, slots)
            sched._prefill_forward = prefill_forward  # type: ignore[method-assign]
        else:
            orig_append = engine.parts.output.append_tokens

            def append(req: Any, tokens: list[int], lps: Any = None) -> int:
                if req.rid == "poison" and len(req.output_ids) >= 3:
                    raise RuntimeError("injected output fault")
                return orig_append(req, tokens, lps)
            engine.parts.output.append_tokens = append  # type: ignore[method-assign]

        for sp, want in zip((greedy, sampled), alone):
            victim, poison = _run_pair(engine, sp, "poison")
            assert victim["output_ids"] == want, (algo, where)
            fr = poison["meta_info"]["finish_reason"]
            assert fr["type"] == "abort" and fr["status_code"] == 500, fr
            assert "injected" in fr["message"]
        info = engine.check_integrity()
        assert info["in_use"] == 0 and info["free"] + info["cached"] == size
        assert engine.num_live() == 0 and sched.num_isolated_failures >= 2


@pytest.fixture(scope="module")
def drafter_dir_for(tmp_path_factory: pytest.TempPathFactory
                    ) -> Callable[[str], tuple[str, str]]:
    """(random DSpark drafter, SPS table) for a model dir (no SPS profiling at engine start)."""
    from dspark_sglang.speculative.sps_profile import SPSTable
    from tests.conftest import random_drafter_for

    made: dict[str, tuple[str, str]] = {}

    def make(model_dir: str) -> tuple[str, str]:
        if model_dir not in made:
            d = tmp_path_factory.mktemp("drafter")
            sps = d / "sps.json"
            SPSTable.from_measurements({1: 100.0, 8: 90.0, 32: 40.0, 128: 10.0}).save(sps)
            made[model_dir] = (random_drafter_for(model_dir, d / "ckpt"), str(sps))
        return made[model_dir]
    return make


def test_unvalidated_bad_field_is_isolated(model_dir: str) -> None:
    """A Req that bypassed validation (Engine API misuse) fails alone, the victim goes on."""
    with Engine(server_args=_args(model_dir)) as engine:
        sp = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
        want = engine.generate("victim text", sp)["output_ids"]
        (bad,), _ = engine.build_requests("poison text", {"max_new_tokens": 20,
                                                          "temperature": 0.7})
        bad.sampling_params.top_k = 2**63  # overflows the int64 top_k tensor in sampling
        got: dict[str, Any] = {}
        bad.callback = lambda out, fin: got.update(out) if fin else None
        engine.submit([bad])
        assert engine.generate("victim text", sp)["output_ids"] == want
        for _ in range(200):
            if got:
                break
            time.sleep(0.02)
        assert got["meta_info"]["finish_reason"]["status_code"] == 500
        assert engine.check_integrity()["in_use"] == 0 and engine.num_live() == 0


# ---- disconnects, metrics switch, backpressure, timeouts, prompt control endpoints -------------

def test_non_streaming_disconnect_aborts(srv: tuple[str, Engine]) -> None:
    url, engine = srv
    undo = _slow_forward(engine, 0.02)
    try:
        before = engine.metrics.num_aborted
        body = json.dumps({"text": "leave early", "sampling_params": {
            "max_new_tokens": 250, "ignore_eos": True}}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.5)
        t0 = time.monotonic()
        while engine.metrics.num_aborted == before and time.monotonic() - t0 < 20:
            time.sleep(0.02)
        # finishing normally would leave num_aborted unchanged (250 tokens take >= 5 s)
        assert engine.metrics.num_aborted == before + 1
    finally:
        undo()
    _assert_clean(url)


def test_enable_metrics_switch(model_dir: str) -> None:
    assert parse_args(["--no-enable-metrics"]).enable_metrics is False
    assert parse_args([]).enable_metrics is True
    args = _args(model_dir, enable_metrics=False)
    with Engine(server_args=args) as engine:
        server = BackgroundServer(engine, args)
        try:
            assert requests.get(server.url + "/metrics").status_code == 404
            assert _post(server.url, {"text": "x", "sampling_params": {
                "max_new_tokens": 2}}).status_code == 200
        finally:
            server.stop()


def test_backpressure_body_limit_and_timeout(model_dir: str) -> None:
    args = _args(model_dir, max_running_requests=1, max_queued_requests=1,
                 max_request_body_bytes=4096)
    with Engine(server_args=args) as engine:
        server = BackgroundServer(engine, args)
        undo = _slow_forward(engine, 0.01)
        try:
            url = server.url
            body = {"text": "queue me", "sampling_params": {"max_new_tokens": 30,
                                                            "ignore_eos": True}}
            results: list[requests.Response] = []
            threads = [threading.Thread(target=lambda: results.append(_post(url, body)))
                       for _ in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            codes = sorted(r.status_code for r in results)
            assert 200 in codes and 429 in codes, codes
            r429 = next(r for r in results if r.status_code == 429)
            assert r429.headers["Retry-After"] and "max_queued_requests" in r429.text
            big = _post(url, {"text": "z" * 5000})
            assert big.status_code == 413 and "max-request-body-bytes" in big.text
            engine.server_args = args.replace(request_timeout=1.0)  # --request-timeout 1
            slow = _post(url, {"text": "too slow", "sampling_params": {
                "max_new_tokens": 250, "ignore_eos": True}})  # >= 2.5 s of forwards
            assert slow.status_code == 408 and "timed out" in slow.text
            _assert_clean(url)
        finally:
            undo()
            server.stop()


def test_abort_and_flush_answer_while_a_step_blocks(srv: tuple[str, Engine]) -> None:
    url, engine = srv
    gate = threading.Event()
    runner = engine.parts.runner
    orig = runner.forward
    seen = threading.Event()

    def blocking(fb: Any) -> Any:
        if fb.mode != ForwardMode.EXTEND:
            seen.set()
            gate.wait(20)
        return orig(fb)

    runner.forward = blocking  # type: ignore[method-assign]
    try:
        resp: dict[str, Any] = {}
        t = threading.Thread(target=lambda: resp.setdefault("r", _post(url, {
            "text": "blocked", "rid": "blk", "sampling_params": {"max_new_tokens": 50}})))
        t.start()
        assert seen.wait(20)
        t0 = time.monotonic()
        assert _post(url, {}, "/flush_cache").status_code == 400  # a request is live
        a = _post(url, {"rid": "blk"}, "/abort_request")
        assert a.status_code == 200 and a.json()["aborted"] == ["blk"]
        assert time.monotonic() - t0 < 10  # the step stays blocked for up to 20 s
    finally:
        gate.set()
        runner.forward = orig  # type: ignore[method-assign]
    t.join(30)
    assert resp["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    _assert_clean(url)
    assert _post(url, {}, "/flush_cache").status_code == 200


# ---- admission -------------------------------------------------------------------------------

def test_lone_request_without_headroom_does_not_spin(model_dir: str) -> None:
    from dspark_sglang.core.req import Req
    from dspark_sglang.core.sampling_params import SamplingParams
    from dspark_sglang.entrypoints.model_setup import build_engine_parts

    args = _args(model_dir, max_total_tokens=64, speculative_algorithm="NGRAM",
                 speculative_num_draft_tokens=8)
    parts = build_engine_parts(args, emit=lambda r, f: None)
    sched = parts.scheduler
    req = Req("lone", list(range(3, 3 + 60)), SamplingParams(max_new_tokens=4))
    sched.add_request(req)  # 60 prompt tokens fit 64 slots, 60 + 1 + 8 do not
    for _ in range(5):
        if not sched.has_work():
            break
        sched.step()
    assert req.finished and req.finish_reason["status_code"] == 400
    parts.cache.check_integrity()


# ---- rids and seeds --------------------------------------------------------------------------

def test_duplicate_rids_and_exact_abort(srv: tuple[str, Engine]) -> None:
    url, engine = srv
    undo = _slow_forward(engine, 0.005)
    try:
        body = {"text": "dup", "rid": "dup", "sampling_params": {"max_new_tokens": 20,
                                                                 "ignore_eos": True}}
        results: list[requests.Response] = []
        threads = [threading.Thread(target=lambda: results.append(_post(url, body)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 1 and codes.count(400) >= 1, codes
        assert all("rid" in r.text for r in results if r.status_code == 400)
        stream = requests.post(url + "/generate", json={
            "text": "job", "rid": "job_1", "stream": True,
            "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}},
            stream=True, timeout=60)
        lines = stream.iter_lines()
        assert next(ln for ln in lines if ln).startswith(b"data:")
        assert _post(url, {"rid": "job"}, "/abort_request").status_code == 404
        a = _post(url, {"rid": "job_1"}, "/abort_request")
        assert a.status_code == 200 and a.json()["aborted"] == ["job_1"]
        stream.close()
    finally:
        undo()
    _assert_clean(url)


def test_default_seeds_do_not_repeat_with_reused_rid(srv: tuple[str, Engine]) -> None:
    _, engine = srv
    sp = {"max_new_tokens": 16, "temperature": 1.0, "ignore_eos": True}
    outs = [engine.generate("same rid", sp, rid="reused")["output_ids"] for _ in range(3)]
    assert len({tuple(o) for o in outs}) == 3
    seeded = [engine.generate("same rid", dict(sp, seed=2**64 - 1))["output_ids"]
              for _ in range(2)]
    assert seeded[0] == seeded[1]


# ---- memory: grammar cache and concate_and_append --------------------------------------------

def test_grammar_cache_bounded_and_flushed(srv: tuple[str, Engine]) -> None:
    url, engine = srv
    for rx in ("[ab]{3}", "[cd]{4}"):
        r = _post(url, {"text": "g", "sampling_params": {"regex": rx, "max_new_tokens": 8}})
        assert r.status_code == 200
    backend = engine.parts.grammar_backend()
    assert backend.cache_len() >= 2 and backend.cache_cost_bytes() > 0
    limit = backend.cache_bytes
    try:
        backend.cache_bytes = 1  # every entry costs more: only the newest stays
        backend.compile("regex", "[ef]{5}")
        assert backend.cache_len() == 1
    finally:
        backend.cache_bytes = limit
    _assert_clean(url)
    assert _post(url, {}, "/flush_cache").status_code == 200
    assert backend.cache_len() == 0


def test_concate_and_append_is_capped(srv: tuple[str, Engine]) -> None:
    url, _ = srv
    for rid, text in (("cat-a", "Alpha says hello. " * 4), ("cat-b", "Beta answers. " * 4)):
        assert _post(url, {"text": text, "rid": rid, "sampling_params": {
            "max_new_tokens": 4}}).status_code == 200
    r = _post(url, {"src_rids": ["cat-b"] * 5000, "dst_rid": "cat-a"},
              "/concate_and_append_request")
    assert r.status_code == 400 and "src_rids" in r.json()["error"]["message"]
    ok = _post(url, {"src_rids": ["cat-b"], "dst_rid": "cat-a"}, "/concate_and_append_request")
    assert ok.status_code == 200 and ok.json()["concatenated"]


# ---- mixed chunked prefill: bounded inter-token latency --------------------------------------

@pytest.mark.parametrize("interleave", [True, False])
def test_decode_interleaves_with_long_prefill(model_dir: str, interleave: bool) -> None:
    args = _args(model_dir, chunked_prefill_size=16,
                 disable_prefill_decode_interleave=not interleave)
    with Engine(server_args=args) as engine:
        sp = {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}
        want = engine.generate("a running stream", sp)["output_ids"]
        log: list[tuple[ForwardMode, int]] = []
        runner = engine.parts.runner
        orig = runner.forward

        def record(fb: Any) -> Any:
            log.append((fb.mode, fb.batch_size))
            return orig(fb)

        runner.forward = record  # type: ignore[method-assign]
        it = engine.generate("a running stream", sp, stream=True)
        first = next(it)
        assert first["output_ids"]
        long_prompt = "word " * 60
        assert 160 <= len(engine.tokenize(long_prompt)) < 500  # 10+ chunks of 16 tokens
        done: dict[str, Any] = {}
        t = threading.Thread(target=lambda: done.setdefault(
            "o", engine.generate(long_prompt, {"max_new_tokens": 2})))
        t.start()
        outs = list(it)
        t.join(60)
        runner.forward = orig  # type: ignore[method-assign]
        assert outs[-1]["output_ids"] == want
        modes = [m for m, _ in log]
        n_ext = modes.count(ForwardMode.EXTEND)
        assert n_ext >= 10, modes
        # while the victim decodes, never two prefill chunks back to back
        last_decode = max(i for i, m in enumerate(modes) if m != ForwardMode.EXTEND)
        window = modes[: last_decode + 1]
        back_to_back = sum(a == b == ForwardMode.EXTEND for a, b in zip(window, window[1:]))
        # interleaved: one decode step per chunk, so a stream waits at most one chunk per token
        assert (back_to_back == 0) == interleave, window


# ---- big bodies: tokenized off the GIL -------------------------------------------------------

def test_big_texts_tokenize_without_stalling_other_threads(srv: tuple[str, Engine]) -> None:
    from dspark_sglang.entrypoints.tokenize_pool import TokenizePool

    _, engine = srv
    pool = TokenizePool(engine.tokenizer, min_chars=1000)
    try:
        small = "hello world, " * 10
        big = "The quick brown fox jumps over the lazy dog. " * 12000  # 540 KB
        assert pool.encode(small) == engine.tokenizer.encode(small)
        assert pool.encode(big[:5000]) == engine.tokenizer.encode(big[:5000])  # child: warm up
        gaps: list[float] = []
        stop = threading.Event()

        def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = threading.Thread(target=ticker)
        t.start()
        t0 = time.perf_counter()
        ids = pool.encode(big)
        took = time.perf_counter() - t0
        stop.set()
        t.join()
        assert len(ids) > 100_000
        assert max(gaps) < max(0.25, took / 4), (max(gaps), took)  # in-process: one gap = took
    finally:
        pool.shutdown()
