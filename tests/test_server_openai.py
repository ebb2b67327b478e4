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

from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.http_server import BackgroundServer
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
    r = requests.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                        "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]
    r = requests.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400
    r = requests.post(server + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert r.status_code == 400


def test_unknown_fields_ignored(client: openai.OpenAI, server: str) -> None:
    extra = {"store": False, "metadata": {"a": "b"}, "service_tier": "auto",
             "reasoning_effort": "low", "bogus": 1}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, temperature=0, extra_body=extra)
    assert r.usage.completion_tokens <= 2
    r = requests.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


def test_model_retrieve_tokenize_detokenize(client: openai.OpenAI, server: str) -> None:
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    tok = requests.post(server + "/v1/tokenize", json={"prompt": "The quick brown fox"}).json()
    ids = requests.post(server + "/encode", json={"text": "The quick brown fox"}).json()
    assert tok["tokens"] == ids["input_ids"] and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] > 0
    many = requests.post(server + "/v1/tokenize", json={"prompt": ["a b", "c"]}).json()
    assert many["count"] == [len(t) for t in many["tokens"]]
    de = requests.post(server + "/v1/detokenize", json={"tokens": tok["tokens"]}).json()
    assert de["text"] == "The quick brown fox"
    de = requests.post(server + "/v1/detokenize", json={"tokens": many["tokens"]}).json()
    assert de["text"] == ["a b", "c"]
    assert requests.post(server + "/v1/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_logprobs_are_byte_exact(client: openai.OpenAI) -> None:
    """384-token byte-level vocabulary: many top-20 candidates are lone UTF-8 bytes."""
    r = client.completions.create(model="tiny", prompt="Unicode: caf", max_tokens=12,
                                  temperature=0, logprobs=20)
    lp = r.choices[0].logprobs
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 20  # no two candidates share a key
        assert top[tok] == pytest.approx(val)  # greedy: the sampled token is the best one
    assert any(k.startswith("bytes:") for top in lp.top_logprobs for k in top)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    c = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=20,
                                       messages=[{"role": "user", "content": "Unicode: caf"}])
    content = c.choices[0].logprobs.content
    raw = b"".join(bytes(t.bytes) for t in content)
    assert raw.decode("utf-8", errors="replace") == c.choices[0].message.content
    assert all(len({t2.token for t2 in t.top_logprobs}) == 20 for t in content)


def test_continue_final_message(client: openai.OpenAI, server: str) -> None:
    msgs = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"continue_final_message": True})
    # the same as a raw completion of the rendered prefix left open
    prefix = "<|im_start|>user\nCount<|im_end|>\n<|im_start|>assistant\n1, 2,"
    ids = requests.post(server + "/encode", json={"text": prefix}).json()["input_ids"]
    raw = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == raw.choices[0].text
    assert r.usage.prompt_tokens == len(ids)
    bad = requests.post(server + "/v1/chat/completions", json={
        "messages": msgs[:1], "continue_final_message": True, "max_tokens": 2})
    assert bad.status_code == 400


def test_cached_tokens_once_per_prompt(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "Speculative decoding drafts tokens and the target "
          "verifies them", "max_tokens": 3, "temperature": 0}
    client.completions.create(**kw)  # warm the prefix cache
    r = client.completions.create(**kw, n=3)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= r.usage.prompt_tokens
    chunks = list(client.completions.create(**kw, n=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert 0 < chunks[-1].usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens


def test_echo_and_logit_bias(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="The quick", max_tokens=4,
                                  temperature=0, echo=True, logprobs=1)
    plain = client.completions.create(model="tiny", prompt="The quick", max_tokens=4,
                                      temperature=0)
    assert r.choices[0].text == "The quick" + plain.choices[0].text
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert "".join(lp.tokens[:n_prompt]) == "The quick"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick", max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == r.choices[0].text
    # a +100 bias on one token makes greedy decoding pick it every time
    r = client.completions.create(model="tiny", prompt="The quick", max_tokens=3,
                                  temperature=0, logit_bias={"70": 100})
    assert r.choices[0].text == detokenize(client, [70, 70, 70])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1,
                                  logit_bias={"999999": 1})


def detokenize(client: openai.OpenAI, ids: list[int]) -> str:
    url = str(client.base_url).removesuffix("/")
    return requests.post(url + "/detokenize", json={"tokens": ids}).json()["text"]


def test_stop_regex(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "Numbers 0123", "max_tokens": 16, "temperature": 0}
    base = client.completions.create(**kw).choices[0].text
    if len(base) < 3:
        pytest.skip("tiny model produced too little text")
    import re

    pattern = re.escape(base[1]) + "." if base[1] != "\n" else "\\n."
    r = client.completions.create(**kw, extra_body={"stop_regex": pattern})
    ch = r.choices[0]
    m = re.search(pattern, base)
    assert ch.finish_reason == "stop" and ch.matched_stop == pattern
    assert ch.text == base[:m.start()]
    chat_bad = client.chat.completions.with_raw_response
    with pytest.raises(openai.BadRequestError):
        chat_bad.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                        max_tokens=2, extra_body={"stop_regex": "("})
