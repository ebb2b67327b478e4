"""``python -m dspark_sglang.launch_server`` and ``dspark_sglang.Runtime`` in a subprocess; the
programs against the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import requests

from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.entrypoints.runtime import Runtime, server_cli_args
from dspark_sglang.server_args import ServerArgs, parse_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_cli_round_trip() -> None:
    args = ServerArgs(model_path="/m", port=1234, api_key="k", disable_radix_cache=True,
                      speculative_algorithm="NGRAM", num_threads=1)
    assert parse_args(server_cli_args(args)) == args
    assert parse_args([]).host == "127.0.0.1"


def test_runtime_subprocess_tiny(tmp_path: Path) -> None:
    import sglang as sgl

    make_tiny_model(tmp_path / "m", seed=2)
    with Runtime(model_path=str(tmp_path / "m"), max_total_tokens=2048, num_threads=1,
                 api_key="k") as rt:
        assert rt.url.startswith("http://127.0.0.1:")
        assert requests.get(rt.url + "/get_model_info").status_code == 401

        @sgl.function
        def hi(s: object) -> None:
            s += "Hello" + sgl.gen("x", max_tokens=4, temperature=0)  # type: ignore[operator]

        st = hi.run(backend=rt.endpoint)
        assert st.get_meta_info("x")["completion_tokens"] <= 4
        pid = rt.pid
    assert rt.pid is None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the server process is gone


@pytest.mark.slow
def test_programs_on_default_model() -> None:
    """SmolLM2 (the embedded default) through the real frontend: coherent, valid outputs."""
    import jsonschema

    from programs import few_shot_qa, json_extraction, multi_turn_chat

    with Runtime(max_total_tokens=8192, num_threads=2) as rt:
        info = requests.get(rt.url + "/get_model_info").json()
        assert "SmolLM2" in json.dumps(info) or info["model_path"]
        chat = multi_turn_chat.main(rt.url, max_tokens=12,
                                    questions=("What is 2 + 2?", "And 3 + 3?"))
        assert all(a.strip() for a in chat["answers"])
        qa = few_shot_qa.main(rt.url, questions=(("Which planet do we live on?",
                                                  ("Mars", "Earth", "Venus")),))
        assert qa["answers"] == ["Earth"]
        js = json_extraction.main(rt.url, documents=json_extraction.DOCUMENTS[:1])
        jsonschema.validate(js["records"][0], js["schema"])
        assert js["records"][0]["name"] == "Alice"
