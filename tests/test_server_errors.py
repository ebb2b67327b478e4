"""Bad input, aborts, client disconnects and API keys: clear 4xx, the server keeps serving, no KV
slot leaks (checked through /debug/check_integrity after every case)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch

from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.http_server import BackgroundServer
from dspark_sglang.server_args import ServerArgs

KEY = "s3cret-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(open server, server with --api-key), both on one engine."""
    torch.set_num_threads(1)
    d: Path = tmp_path_factory.mktemp("tiny_errors")
    make_tiny_model(d, seed=7)
    args = ServerArgs(model_path=str(d), port=_free_port(), max_total_tokens=2048,
                      num_threads=1, grammar_backend="llguidance", context_length=256)
    engine = Engine(server_args=args)
    open_srv = BackgroundServer(engine, args)
    key_srv = BackgroundServer(engine, args.replace(port=_free_port(), api_key=KEY))
    yield open_srv.url, key_srv.url
    key_srv.stop()
    open_srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def server(servers: tuple[str, str]) -> str:
    return servers[0]


def _assert_no_leak(url: str) -> None:
    for _ in range(400):
        info = requests.get(url + "/debug/check_integrity", timeout=30).json()
        if info["in_use"] == 0 and info["live_rids"] == 0:
            break
        time.sleep(0.05)
    assert info["ok"] and info["in_use"] == 0 and info["live_rids"] == 0, info
    assert info["free"] + info["cached"] == info["size"]


def _post(url: str, path: str, data: bytes | None = None, js: Any = None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    return requests.post(url + path, data=data, json=js, headers=headers, timeout=60)


GOOD_SP = {"max_new_tokens": 2}
LONG = "The quick brown fox jumps over the lazy dog. " * 40  # > 256 tokens

BAD_NATIVE: list[tuple[str, bytes]] = [
    ("malformed json", b'{"text": "hi", '),
    ("non-utf8", b'{"text": "\xff\xfe caf\xe9"}'),
    ("not an object", b'["text"]'),
    ("empty body", b""),
    ("unknown field", json.dumps({"text": "hi", "temperature": 0}).encode()),
    ("unknown sampling key", json.dumps({"text": "hi", "sampling_params": {"foo": 1}}).encode()),
    ("text wrong type", json.dumps({"text": 5}).encode()),
    ("logprob wrong type", json.dumps({"text": "hi", "return_logprob": "yes"}).encode()),
    ("max_new_tokens str", json.dumps({"text": "hi", "sampling_params":
                                       {"max_new_tokens": "10"}}).encode()),
    ("negative max", json.dumps({"text": "hi", "sampling_params":
                                 {"max_new_tokens": -1}}).encode()),
    ("huge max", json.dumps({"text": "hi", "sampling_params":
                             {"max_new_tokens": 10**9}}).encode()),
    ("invalid regex", json.dumps({"text": "hi", "sampling_params": {"regex": "(ab"}}).encode()),
    ("invalid schema json", json.dumps({"text": "hi", "sampling_params":
                                        {"json_schema": "{not json"}}).encode()),
    ("invalid schema type", json.dumps({"text": "hi", "sampling_params":
                                        {"json_schema": '{"type": "nonsense"}'}}).encode()),
    ("empty prompt", json.dumps({"text": "", "sampling_params": GOOD_SP}).encode()),
    ("empty ids", json.dumps({"input_ids": [], "sampling_params": GOOD_SP}).encode()),
    ("ids out of vocab", json.dumps({"input_ids": [10**6]}).encode()),
    ("both text and ids", json.dumps({"text": "a", "input_ids": [1]}).encode()),
    ("prompt too long", json.dumps({"text": LONG, "sampling_params": GOOD_SP}).encode()),
    ("unsupported image", json.dumps({"text": "a", "image_data": "x.png"}).encode()),
    ("temperature negative", json.dumps({"text": "a", "sampling_params":
                                         {"temperature": -1}}).encode()),
]


@pytest.mark.parametrize(("case", "body"), BAD_NATIVE, ids=[c for c, _ in BAD_NATIVE])
def test_bad_native_input_is_400(server: str, case: str, body: bytes) -> None:
    r = _post(server, "/generate", data=body)
    assert r.status_code == 400, (case, r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_server_keeps_serving_during_bad_input(server: str) -> None:
    result: dict[str, Any] = {}

    def long_request() -> None:
        result["r"] = _post(server, "/generate", js={
            "text": "Speculative decoding", "sampling_params": {
                "max_new_tokens": 60, "ignore_eos": True, "temperature": 0}})

    t = threading.Thread(target=long_request)
    t.start()
    for _, body in BAD_NATIVE:
        assert _post(server, "/generate", data=body).status_code == 400
    t.join(timeout=120)
    r = result["r"]
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 60
    _assert_no_leak(server)


def test_bad_openai_input(server: str) -> None:
    cases = [
        ("/v1/completions", b"{oops"),
        ("/v1/completions", b'{"prompt": "\xff"}'),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -5}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**7}).encode()),
        ("/v1/completions", json.dumps({"prompt": "", "max_tokens": 2}).encode()),
        ("/v1/completions", json.dumps({"prompt": LONG, "max_tokens": 2}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "regex": "[a-"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot",
                                                             "content": "x"}]}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "tools": [{"type": "function"}]}).encode()),
    ]
    for path, body in cases:
        r = _post(server, path, data=body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["code"] == 400
    _assert_no_leak(server)


def test_unknown_path_and_abort_unknown_rid(server: str) -> None:
    assert requests.get(server + "/no_such_endpoint").status_code == 404
    r = _post(server, "/abort_request", js={"rid": "does-not-exist"})
    assert r.status_code == 404 and "does-not-exist" in r.json()["error"]["message"]
    assert _post(server, "/abort_request", js={"rid": 5}).status_code == 400


def test_abort_running_request(server: str) -> None:
    body = {"text": "abort me", "rid": "to-abort", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    resp = requests.post(server + "/generate", json=body, stream=True, timeout=60)
    lines = resp.iter_lines()
    first = next(ln for ln in lines if ln)
    assert first.startswith(b"data:")
    r = _post(server, "/abort_request", js={"rid": "to-abort"})
    assert r.status_code == 200 and r.json()["aborted"] == ["to-abort"]
    rest = [ln.decode() for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2][5:]) if len(rest) > 1 else json.loads(first[5:])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 200
    _assert_no_leak(server)


def test_client_disconnect_mid_stream(server: str) -> None:
    for path, body in (
        ("/generate", {"text": "disconnect", "stream": True,
                       "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}),
        ("/v1/completions", {"prompt": "disconnect", "stream": True, "max_tokens": 200,
                             "ignore_eos": True}),
    ):
        resp = requests.post(server + path, json=body, stream=True, timeout=60)
        it = resp.iter_lines()
        assert next(ln for ln in it if ln).startswith(b"data:")
        resp.close()  # the client goes away mid-stream
        _assert_no_leak(server)
    # and while not streaming: the client times out, the server aborts the request
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server + "/generate", json={
            "text": "impatient", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}},
            timeout=(5.0, 0.02))  # 200 tokens take well over 20 ms even on an idle machine
    _assert_no_leak(server)
    ok = _post(server, "/generate", js={"text": "still alive", "sampling_params": GOOD_SP})
    assert ok.status_code == 200


def test_api_key(servers: tuple[str, str]) -> None:
    _, url = servers
    assert requests.get(url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/get_model_info"), ("POST", "/generate"),
                             ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/server_info"), ("POST", "/flush_cache")):
            r = requests.request(method, url + path, headers=headers, json={"text": "x"})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == 401
    good = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(url + "/get_model_info", headers=good).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list().data

    import sglang as sgl

    with pytest.raises(RuntimeError):
        sgl.RuntimeEndpoint(url)
    ep = sgl.RuntimeEndpoint(url, api_key=KEY)

    @sgl.function
    def hello(s: Any) -> None:
        s += "Hello" + sgl.gen("x", max_tokens=3, temperature=0)

    assert hello.run(backend=ep).get_meta_info("x")["completion_tokens"] <= 3
