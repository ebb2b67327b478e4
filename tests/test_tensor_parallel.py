"""Tensor parallelism on CPU: 2 gloo ranks give the same greedy tokens as 1 rank (float32),
without speculation and with DSPARK; sharded layers agree with the unsharded ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROMPTS, greedy, random_drafter_for


@pytest.fixture(scope="module")
def tp_model(tiny_model_dir: Any) -> str:
    # vocab, heads, kv heads and intermediate size all divide by 2
    return tiny_model_dir("llama", layers=2, hidden=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def tp_drafter(tp_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return random_drafter_for(tp_model, tmp_path_factory.mktemp("tp_drafter"))


@pytest.fixture(scope="module")
def flat_sps(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dspark_sglang.speculative.sps_profile import SPSTable

    p = tmp_path_factory.mktemp("sps") / "flat.json"
    SPSTable.flat(10.0).save(p)
    return str(p)


def _run(model: str, tp: int, **kw: Any) -> list[list[int]]:
    from dspark_sglang import Engine

    with Engine(model_path=model, dtype="float32", max_total_tokens=2048, tp_size=tp,
                num_threads=1, **kw) as e:
        outs = e.generate(PROMPTS[:4], greedy(16))
        if tp > 1:
            followers = e.parts.runner.tp_driver.followers
            model = e.parts.runner.model
            assert model.tp_shards is not None and model.local_head_counts() == (2, 1)
            assert len(followers) == tp - 1 and all(p.poll() is None for p in followers)
    if tp > 1:  # shutdown stopped the followers
        assert all(p.poll() is not None for p in followers)
    return [o["output_ids"] for o in outs]


@pytest.mark.parametrize("algo", ["NONE", "DSPARK"])
def test_tp2_equals_tp1_greedy(tp_model: str, tp_drafter: str, flat_sps: str, algo: str) -> None:
    kw: dict[str, Any] = {}
    if algo == "DSPARK":
        kw = {"speculative_algorithm": "DSPARK", "speculative_draft_model_path": tp_drafter,
              "speculative_dspark_sps_table_path": flat_sps}
    one = _run(tp_model, 1, **kw)
    two = _run(tp_model, 2, **kw)
    assert two == one
    assert all(len(o) == 16 for o in one)


def test_tp_size_must_divide_heads(tp_model: str) -> None:
    import torch

    from dspark_sglang.distributed.parallel_state import TPGroup
    from dspark_sglang.distributed.tp_layers import shard_llama_
    from dspark_sglang.entrypoints.model_setup import build_target_model
    from dspark_sglang.models.loader import load_model_files

    loaded = load_model_files(tp_model)
    model = build_target_model(loaded.config, loaded.state_dict, torch.float32, "cpu", 256)
    with pytest.raises(ValueError, match="divisible by tp_size"):
        shard_llama_(model, TPGroup(rank=0, size=3, device="cpu"))
    assert Path(tp_model).exists()
