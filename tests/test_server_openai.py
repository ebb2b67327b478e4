"""OpenAI-compatible API over real HTTP with the real ``openai`` client, on a tiny random model."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
import torch

from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.http_server import BackgroundServer
from dspark_sglang.models.tiny import make_tiny_model
from dspark_sglang.server_args import ServerArgs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    torch.set_num_threads(1)
    d: Path = tmp_path_factory.mktemp("tiny_openai")
    make_tiny_model(d, seed=5)
    args = ServerArgs(model_path=str(d), port=_free_port(), max_total_tokens=4096,
                      num_threads=1, grammar_backend="llguidance",
                      served_model_name="tiny")
    engine = Engine(server_args=args)
    srv = BackgroundServer(engine, args)
    yield srv.url
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_plain_and_stream(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 10 and full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == \
        full.choices[0].finish_reason


def test_completion_n_batch_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=["Numbers 0123", "def add("],
                                  max_tokens=4, n=2, temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy samples agree
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens).startswith(r.choices[0].text[:1])
    # sampled (T=1) with a seed is reproducible
    a = client.completions.create(model="tiny", prompt="x", max_tokens=6, seed=7)
    b = client.completions.create(model="tiny", prompt="x", max_tokens=6, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_completion_stop(client: openai.OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="Unicode: caf", max_tokens=12,
                                     temperature=0).choices[0].text
    if len(base) < 4:
        pytest.skip("tiny model produced too little text")
    stop = base[2:4]
    r = client.completions.create(model="tiny", prompt="Unicode: caf", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Unicode: caf", max_tokens=12, temperature=0, stop=[stop],
        stream=True))
    assert streamed == r.choices[0].text


def test_chat_plain_stream_n_logprobs(client: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=3)
    ch = full.choices[0]
    assert ch.message.role == "assistant"
    assert len(ch.logprobs.content) == full.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in ch.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ch.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    many = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=5,
                                          n=3, temperature=0)
    assert len(many.choices) == 3 and len({c.message.content for c in many.choices}) == 1
    assert many.usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_json_schema_validates(client: openai.OpenAI) -> None:
    import jsonschema

    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Give a person as JSON."}],
        max_tokens=64, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=48,
        temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_regex_extension(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=16, temperature=0,
                                  extra_body={"regex": "(yes|no)"})
    assert r.choices[0].text in ("yes", "no")


def test_openai_errors_shape(server: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert "max_new_tokens" in str(e.value)
    r = requests.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": [],
                                                            "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = requests.post(server + "/v1/completions", json={"prompt": "x", "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    r = requests.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400
    r = requests.post(server + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert r.status_code == 400
