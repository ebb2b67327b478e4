"""bench_step (where a decode step's time goes) runs on a tiny model and its parts add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dspark_sglang.benchmark.step_cost import weight_bytes_per_step
from dspark_sglang.benchmark.tiny_model import make_tiny_model


def test_bench_step_parts_add_up(tmp_path: Path) -> None:
    from dspark_sglang.bench_step import main

    d = tmp_path / "tiny"
    make_tiny_model(d, arch="llama", seed=3)
    out = tmp_path / "step.json"
    main(["--model-path", str(d), "--quantizations", "none", "--batch-size", "2",
          "--prompt-len", "16", "--steps", "6", "--verify-tokens", "1", "4",
          "--num-threads", "1", "--output", str(out)])
    rep = json.loads(out.read_text())
    row = rep["results"][0]
    assert "error" not in row, row
    assert row["batch"] == 2 and row["quantization"] == "none"
    assert 0 < row["matmul_ms"] <= row["forward_ms"] <= row["step_ms"]
    assert 0 < row["attention_ms"] < row["forward_ms"]
    assert row["other_ops_ms"] == pytest.approx(
        row["forward_ms"] - row["matmul_ms"] - row["attention_ms"])
    assert 0 < row["overhead_share"] < 1
    assert row["verify1/verify1"] == 1.0 and row["verify4_ms"] > 0
    bw = rep["machine"]["bandwidth"]
    assert bw["copy_gb_s"] > 0 and bw["read_gb_s"] > 0


def test_weight_bytes_counts_the_path_each_layer_takes() -> None:
    class Quant(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(8, 4, bias=False)
            self.parts = [object()]
            self.max_quant_rows = 2

        def quant_bytes(self) -> int:
            return 10

    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), Quant())
    assert weight_bytes_per_step(model, 1) == 8 * 4 * 4 + 10  # block kernel at 1 row
    assert weight_bytes_per_step(model, 3) == 2 * 8 * 4 * 4  # float32 beyond max_quant_rows
