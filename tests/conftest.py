"""Shared fixtures: tiny random models built on the fly, and engines over them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """``tiny_model_dir(arch="llama", **kw) -> path``: cached per argument set."""
    from dspark_sglang.benchmark.tiny_model import make_tiny_model

    made: dict[tuple[Any, ...], str] = {}

    def make(arch: str = "llama", **kw: Any) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"tiny_{arch}")
            make_tiny_model(d, arch=arch, **kw)
            made[key] = str(d)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir: Callable[..., str]) -> str:
    return tiny_model_dir("llama", layers=3, hidden=64, heads=4, kv_heads=2)


def random_drafter_for(model_dir: str, out_dir: Path, block_size: int = 4) -> str:
    """A randomly initialised DSpark checkpoint (DeepSpec layout) for the model at ``model_dir``."""
    import json

    from dspark_sglang.models.config import ModelConfig
    from dspark_sglang.speculative.dspark.random_init import write_random_dspark_checkpoint

    cfg = ModelConfig.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))
    return str(write_random_dspark_checkpoint(out_dir, cfg, block_size=block_size))


@pytest.fixture(scope="session")
def drafter_dir(llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Random block-4 DSpark drafter for ``llama_dir``."""
    return random_drafter_for(llama_dir, tmp_path_factory.mktemp("drafter"))


@pytest.fixture
def make_engine() -> Any:
    """Factory for engines that are shut down after the test."""
    from dspark_sglang import Engine

    engines: list[Any] = []

    def make(model_path: str, **kw: Any) -> Any:
        kw.setdefault("max_total_tokens", 4096)
        kw.setdefault("dtype", "float32")
        e = Engine(model_path=model_path, **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown()


def has_default_model() -> bool:
    from dspark_sglang.models.default_model import has_default_model as _has

    return _has()


PROMPTS = [
    "The quick brown fox",
    "def add(a, b):\n    return",
    "Speculative decoding drafts tokens and the target verifies them in one pass. Then",
    "{\"name\": \"Alice\", \"age\":",
    "Numbers 0123456789 and punctuation",
    "Unicode: café, naïve, Straße",
]


@pytest.fixture
def prompts() -> list[str]:
    return list(PROMPTS)


def greedy(max_new_tokens: int = 24, **kw: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **kw}


def root() -> Path:
    return Path(__file__).resolve().parent.parent


def rerun_with_triton_interpreter(test_file: str, allow_skips: bool = True) -> None:
    """Run ``test_file`` (minus its fresh-process test) in a new process with TRITON_INTERPRET=1
    set before triton is imported, and assert it passed."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
         "-k", "not fresh_process"],
        capture_output=True, text=True, check=False, env=env, cwd=str(root()), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
    if not allow_skips:
        assert "skipped" not in result.stdout, result.stdout[-2000:]
