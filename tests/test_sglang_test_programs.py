"""The ``sglang`` package's own frontend test programs (``sglang/test/test_programs.py``) against
our native API, on a tiny random model.

Each program either passes, or fails only on the assertion this file names for it: an
answer-quality check (a capital city, 257 * 983, "Noah") that no 135M model -- let alone a random
one -- is expected to meet. Any other failure (an HTTP error, a protocol field the frontend misses,
an exception inside the frontend) fails the test. Programs that need what this server does not
have are skipped with the reason.
"""

from __future__ import annotations

import inspect
import json
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sgl = pytest.importorskip("sglang")
test_programs = pytest.importorskip("sglang.test.test_programs")

from dspark_sglang.benchmark.tiny_model import make_tiny_model  # noqa: E402
from dspark_sglang.entrypoints.engine import Engine  # noqa: E402
from dspark_sglang.entrypoints.http_server import BackgroundServer  # noqa: E402
from dspark_sglang.entrypoints.runtime import RuntimeClient  # noqa: E402
from dspark_sglang.server_args import ServerArgs  # noqa: E402

# program -> the start of the source line of the only statement it may fail on (answer
# quality), or None. Besides asserts on facts: the JSON programs parse what the model wrote (a
# random model puts control characters in REGEX_STR strings, or leaves a gen_string unclosed at
# max_new_tokens), test_tool_use eval()s the model's expression, test_react reads "answer",
# which exists only if the model ever selected "Finish".
ANSWER_QUALITY: dict[str, str | tuple[str, ...] | None] = {
    "test_few_shot_qa": 'assert "washington" in ret["answer"].strip().lower()',
    "test_mt_bench": None,
    "test_select": 'assert ret["answer"] == "True", ret.text()',
    "test_decode_int": 'assert int(ret["hours"]) == 24, ret.text()',
    "test_decode_json_regex": 'js_obj = json.loads(ret["json_output"])',
    "test_decode_json": 'js_obj = json.loads(ret["json_output"])',
    "test_expert_answer": 'assert "paris" in ret.text().lower()',
    "test_tool_use": 'return f"{eval(expression)}"',
    "test_react": ('answer = ret["answer"].lower()',
                   'assert "finland" in answer or "states" in answer'),
    "test_parallel_decoding": None,
    "test_parallel_encoding": 'assert "Noah" in answer',
    "test_stream": None,
    "test_stream_logprobs": None,
    "test_regex": None,
    "test_dtype_gen": None,
    "test_gen_min_new_tokens": None,
}
SKIPPED = {
    "test_image_qa": "images: this server serves text-only models",
    "test_completion_speculative": "needs sgl.OpenAI, which needs tiktoken's downloaded "
                                   "encodings (no network in tests)",
    "test_chat_completion_speculative": "needs sgl.OpenAI (tiktoken, network)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    torch.set_num_threads(1)
    d: Path = tmp_path_factory.mktemp("tiny_programs")
    make_tiny_model(d, seed=3)
    cfg = json.loads((d / "config.json").read_text())  # the programs' prompts are long in
    cfg["max_position_embeddings"] = 4096  # the tiny byte-level BPE
    (d / "config.json").write_text(json.dumps(cfg))
    args = ServerArgs(model_path=str(d), port=_free_port(), max_total_tokens=8192,
                      max_running_requests=16, num_threads=1, grammar_backend="llguidance")
    engine = Engine(server_args=args)
    srv = BackgroundServer(engine, args)
    client = RuntimeClient(srv.url)  # sgl.Runtime's surface; programs read ``.endpoint``
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(client)
    yield client
    sgl.global_config.default_backend = previous
    srv.stop()
    engine.shutdown()


def test_every_program_is_listed() -> None:
    names = {n for n, f in vars(test_programs).items() if n.startswith("test_")
             and inspect.isfunction(f)}
    assert names == set(ANSWER_QUALITY) | set(SKIPPED)


def _tokenizer_helper_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_gen_min_new_tokens imports ``sglang.srt.utils.hf_transformers_utils.get_tokenizer``,
    whose module pulls in torchvision (never installed here); give it transformers' loader."""
    import types

    from transformers import AutoTokenizer

    stub = types.ModuleType("sglang.srt.utils.hf_transformers_utils")
    stub.get_tokenizer = AutoTokenizer.from_pretrained  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, stub.__name__, stub)


def _pace_stream_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """The frontend's executor thread overwrites ``meta_info[name]`` per stream event, and
    ``text_async_iter`` reads only the latest: two events arriving between two of its wake-ups
    lose the first one's logprob delta (a client race; the tiny model emits a token every ~1 ms).
    Pacing the client's reading of events removes the race and leaves what the server sends
    untouched."""
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    original = RuntimeEndpoint.generate_stream

    def paced(self: object, *args: object, **kwargs: object) -> Iterator[object]:
        for item in original(self, *args, **kwargs):
            yield item
            time.sleep(0.05)

    monkeypatch.setattr(RuntimeEndpoint, "generate_stream", paced)


@pytest.mark.parametrize("name", sorted(ANSWER_QUALITY))
def test_program(backend: object, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "test_gen_min_new_tokens":
        _tokenizer_helper_without_torchvision(monkeypatch)
    if name == "test_stream_logprobs":
        _pace_stream_events(monkeypatch)
    fn = getattr(test_programs, name)
    kwargs = {"check_answer": True} if "check_answer" in inspect.signature(fn).parameters \
        else {}
    try:
        fn(**kwargs)
    except (AssertionError, ValueError, KeyError, SyntaxError, NameError, TypeError) as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if f.filename.endswith("test_programs.py")]
        line = (frames[-1].line or "") if frames else ""
        expected = ANSWER_QUALITY[name]
        if expected is None or not line.startswith(expected):
            raise
        pytest.xfail(f"answer quality (random tiny model): {line}")


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_program_not_applicable(name: str) -> None:
    pytest.skip(SKIPPED[name])


def test_runtime_client_surface(backend: RuntimeClient) -> None:
    import asyncio

    sp = {"max_new_tokens": 6, "temperature": 0}
    out = json.loads(backend.generate("The quick brown", sp))
    assert out["meta_info"]["completion_tokens"] <= 6
    batch = json.loads(backend.generate(["The quick brown", "Hi"], sp))
    assert isinstance(batch, list) and batch[0]["text"] == out["text"]

    async def stream() -> str:
        return "".join([d async for d in backend.async_generate("The quick brown", sp)])

    assert asyncio.run(stream()) == out["text"]
    ids = json.loads(backend.encode("The quick brown"))["input_ids"]
    tok = backend.get_tokenizer()
    assert tok.encode("The quick brown") == ids
    info = asyncio.run(backend.get_server_info())
    assert "avg_spec_accept_length" in info
    prefix = "A shared prefix that the next request reuses from the radix cache. " * 2
    backend.cache_prefix(prefix)
    hit = json.loads(backend.generate(prefix + "Then", {"max_new_tokens": 1}))
    assert hit["meta_info"]["cached_tokens"] > 0
