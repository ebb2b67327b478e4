"""Speculation on and off give identical greedy text through both APIs (float32 CPU: exact)."""

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
from dspark_sglang.speculative.dspark.random_init import write_random_dspark_checkpoint

ALGORITHMS = ("NONE", "NGRAM", "DSPARK")
PROMPTS = (
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy",
    "def add(a, b):\n    return a + b\ndef add(a, b):\n",
    "SGLang programs call gen, select and fork",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    torch.set_num_threads(1)
    d: Path = tmp_path_factory.mktemp("tiny_spec")
    cfg = make_tiny_model(d, seed=11)
    drafter = write_random_dspark_checkpoint(tmp_path_factory.mktemp("drafter"), cfg,
                                             block_size=4)
    started: list[tuple[Engine, BackgroundServer]] = []
    out: dict[str, str] = {}
    for algo in ALGORITHMS:
        args = ServerArgs(model_path=str(d), port=_free_port(), max_total_tokens=4096,
                          num_threads=1, speculative_algorithm=algo, served_model_name="tiny",
                          speculative_num_draft_tokens=4 if algo == "NGRAM" else None,
                          speculative_draft_model_path=str(drafter) if algo == "DSPARK" else None)
        engine = Engine(server_args=args)
        srv = BackgroundServer(engine, args)
        started.append((engine, srv))
        out[algo] = srv.url
    yield out
    for engine, srv in started:
        srv.stop()
        engine.shutdown()


def _native(url: str, stream: bool) -> list[str]:
    texts = []
    for p in PROMPTS:
        body = {"text": p, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
        if not stream:
            texts.append(requests.post(url + "/generate", json=body, timeout=60).json()["text"])
            continue
        r = requests.post(url + "/generate", json={**body, "stream": True}, stream=True,
                          timeout=60)
        lines = [ln.decode() for ln in r.iter_lines() if ln]
        texts.append(json.loads(lines[-2][5:])["text"])
    return texts


def _openai(url: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    out = [c.completions.create(model="tiny", prompt=list(PROMPTS), max_tokens=24,
                                temperature=0).choices[i].text for i in range(len(PROMPTS))]
    out.append(c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24,
        temperature=0).choices[0].message.content or "")
    return out


def test_spec_equals_plain_native_and_openai(urls: dict[str, str]) -> None:
    ref_native = _native(urls["NONE"], stream=False)
    ref_openai = _openai(urls["NONE"])
    assert any(ref_native)
    for algo in ALGORITHMS[1:]:
        assert _native(urls[algo], stream=False) == ref_native, algo
        assert _native(urls[algo], stream=True) == ref_native, algo
        assert _openai(urls[algo]) == ref_openai, algo
        info = requests.get(urls[algo] + "/server_info").json()
        assert info["speculative_algorithm"] == algo and info["avg_spec_accept_length"] >= 1.0
        if algo == "NGRAM":  # a random DSpark drafter is rarely right; n-gram on repeats is
            assert info["spec_stats"]["draft_acceptance_rate"] > 0
