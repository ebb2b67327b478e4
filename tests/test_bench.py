"""The benchmark programs run end to end on a tiny random model and write well-formed JSON.

Nothing here asserts a speed: only that every program runs, reports every mode (a failing mode
as ``error: ...``), and that its numbers are present and consistent.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dspark_sglang.benchmark.metrics import RequestResult, stats_delta, summarize
from dspark_sglang.benchmark.report import format_table, ratio
from dspark_sglang.benchmark.tiny_model import make_tiny_model
from dspark_sglang.benchmark.workloads import load_prompt_file, load_prompts, sampling_for


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench") / "tiny"
    make_tiny_model(d, arch="llama", seed=3)
    return d


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    turns = d / "code.jsonl"
    turns.write_text("\n".join(json.dumps({"turns": [t, "second turn is ignored"]}) for t in (
        "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
        "Numbers 0123456789 and punctuation")) + "\n")
    tasks = d / "tasks.jsonl"
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"]}
    tasks.write_text(json.dumps({"prompt": "Name as JSON: Alice", "schema": schema}) + "\n")
    return turns, tasks


def test_workloads_parse_turns_and_schema_tasks(prompt_files: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    turns, tasks = prompt_files
    items = load_prompt_file(turns)
    assert [it.domain for it in items] == ["code"] * 3
    assert items[1].text.startswith("The quick") and items[1].schema is None
    task = load_prompt_file(tasks)[0]
    assert task.schema is not None and task.domain == "tasks"
    sp = sampling_for(task, 8, 0.0, 1)
    assert json.loads(sp["json_schema"]) == task.schema and "seed" not in sp
    assert len(load_prompts([str(turns), str(tasks)], per_file=2)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\n')
    with pytest.raises(ValueError, match="turns"):
        load_prompt_file(bad)


def test_summary_table_and_stats_delta() -> None:
    rs = [RequestResult(0, "a", 0.5, completion_tokens=10, spec_verify_ct=5,
                        spec_draft_tokens=10),
          RequestResult(1, "b", 1.0, completion_tokens=6, spec_verify_ct=6),
          RequestResult(2, "b", 0.1, error="error: boom")]
    s = summarize(rs, wall_s=2.0)
    assert s["completion_tokens"] == 16 and s["num_errors"] == 1
    assert s["output_tok_s"] == pytest.approx(8.0)
    assert s["tau"] == pytest.approx(16 / 11)
    assert s["verify_tokens_per_req_step"] == pytest.approx(21 / 11)
    assert s["tau_by_domain"] == {"a": pytest.approx(2.0), "b": pytest.approx(1.0)}
    d = stats_delta({"steps": 10, "avg_spec_accept_length": 2.0,
                     "avg_verify_tokens_per_step": 3.0},
                    {"steps": 20, "avg_spec_accept_length": 2.5,
                     "avg_verify_tokens_per_step": 4.0})
    assert d["batch_steps"] == 10
    assert d["tokens_per_batch_step"] == pytest.approx(3.0)
    assert d["verify_tokens_per_batch_step"] == pytest.approx(5.0)
    table = format_table([{"mode": "NONE", "x": 1.5}, {"mode": "NGRAM"}], ["mode", "x"])
    assert "1.50" in table and table.splitlines()[-1].rstrip().endswith("-")
    assert ratio(3.0, 0.0) is None and ratio(3.0, 1.5) == 2.0


def test_bench_offline_runs(tiny_dir: Path, tmp_path: Path) -> None:
    from dspark_sglang.bench_offline import main

    out = tmp_path / "offline.json"
    torch.set_num_threads(1)
    main(["--model-path", str(tiny_dir), "--dtypes", "float32", "--batch-sizes", "1", "2",
          "--prefill-len", "16", "--decode-prompt-len", "8", "--decode-tokens", "12",
          "--repeats", "3",  # a decode too short to time on a busy machine reads as None
          "--num-threads", "1", "--attention-backends", "auto", "torch_native",
          "--output", str(out)])
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "bench_offline" and rep["machine"]["cpu_count"] >= 1
    systems = {r["system"]: r for r in rep["results"]}
    assert set(systems) == {"ours", "ours-alt", "transformers"}
    assert systems["ours-alt"]["attention"] == "torch_native"
    assert systems["ours"]["attention"] in ("cpu", "torch_native")  # what auto resolved to
    for r in systems.values():
        assert "error" not in r, r
        assert r["prefill_tok_s"] > 0 and r["decode_b1_tok_s"] > 0 and r["decode_b2_tok_s"] > 0, r
    cmp = next(r for r in rep["ratios"] if "compare" in r)
    assert cmp["compare"].endswith("/torch_native") and cmp["decode_b2"] > 0
    ratios = next(r for r in rep["ratios"] if "compare" not in r)
    assert ratios["dtype"] == "float32" and ratios["decode_b1_ours/hf"] > 0
    assert ratios["ours_b2/ours_b1"] > 0


def test_bench_speculative_runs_and_compares_with_none(
        tiny_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from dspark_sglang.bench_speculative import main

    out = tmp_path / "spec.json"
    main(["--model-path", str(tiny_dir), "--dtype", "float32", "--modes", "NONE", "NGRAM",
          "MTP1", "--concurrency", "1", "2", "--prompt-file", str(prompt_files[0]),
          "--prompts-per-file", "3",
          "--max-new-tokens", "12", "--num-threads", "1", "--output", str(out),
          "--profile-steps"])
    rep = json.loads(out.read_text())
    rows = {(r["mode"], r["conc"]): r for r in rep["results"]}
    assert set(rows) == {(m, c) for m in ("NONE", "NGRAM", "MTP1") for c in (1, 2)}
    for mode in ("NONE", "NGRAM"):
        prof = rows[(mode, 1)]["step_profile"]
        # 3 requests x 11 decode steps each at concurrency 1 (n-gram steps may emit more)
        assert (prof["steps"] == 33) if mode == "NONE" else (1 <= prof["steps"] <= 33)
        assert 0 < prof["target_ms"] <= prof["step_ms"] and prof["other_ms"] > -0.5
        assert 0 < prof["steps_share"] <= 1 and prof["prefill_s"] > 0
    for c in (1, 2):
        none, ngram = rows[("NONE", c)], rows[("NGRAM", c)]
        assert "error" not in none and "error" not in ngram
        assert none["completion_tokens"] > 0 and none["speedup_vs_NONE"] == pytest.approx(1.0)
        assert ngram["speedup_vs_NONE"] > 0 and ngram["tau"] >= 1.0
        # greedy float32: n-gram speculation is lossless, so every output equals NONE's
        assert ngram["identical_to_none"] == ngram["compared"] == 3
    mtp = rows[("MTP1", 1)]
    assert ("error" in mtp and mtp["error"].startswith("error:")) or mtp["output_tok_s"] > 0
    printed = capsys.readouterr().out
    assert "NGRAM" in printed and "same_as_NONE" in printed and "where a decode step" in printed


@pytest.mark.slow
def test_bench_serving_url_native_openai_and_peers(
        tiny_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path) -> None:
    from dspark_sglang.bench_serving import main
    from dspark_sglang.entrypoints.runtime import Runtime

    files = [str(p) for p in prompt_files]
    plot = importlib.util.find_spec("matplotlib") is not None
    with Runtime(model_path=str(tiny_dir), num_threads=1, max_total_tokens=4096) as rt:
        out = tmp_path / "serving.json"
        main(["--url", rt.url, "--model-path", str(tiny_dir), "--prompt-file", *files,
              "--prompts-per-file", "3",
              "--concurrency", "1", "2", "--request-rate", "50", "--max-new-tokens", "8",
              "--peers", "hf", "llamacpp", "--peer-prompts", "2", "--num-threads", "1",
              "--no-progress", "--output", str(out)]
             + (["--plot", str(tmp_path / "plots")] if plot else []))
        rep = json.loads(out.read_text())
        loads = [r["load"] for r in rep["results"]]
        assert loads == ["conc=1", "conc=2", "rate=50"]
        for r in rep["results"]:
            assert "error" not in r, r
            assert r["num_requests"] == 4 and r["completion_tokens"] > 0
            # the server runs NONE: no verify steps, so no acceptance length (spec_verify_ct 0)
            assert r["tau"] is None and r["verify_tokens_per_req_step"] is None
            assert set(r["tau_by_domain"]) == {"code", "tasks"}
        peers = {p["peer"]: p for p in rep["peers"]}
        assert peers["hf"]["num_requests"] == 2 and peers["hf"]["completion_tokens"] > 0
        assert "llamacpp" in peers
        if plot:
            assert len(list((tmp_path / "plots").glob("*.png"))) == 4
        assert [g["target"] for g in rep["goals"]] == [1.85, 1.0, 3.0, 1.0, 1.0, 1.0]

        out2 = tmp_path / "openai.json"
        main(["--url", rt.url, "--model-path", str(tiny_dir), "--api", "openai",
              "--prompt-file", *files, "--concurrency", "2", "--max-new-tokens", "6",
              "--no-progress", "--output", str(out2)])
        row = json.loads(out2.read_text())["results"][0]
        assert row["num_errors"] == 0, row
        assert row["completion_tokens"] > 0


@pytest.mark.skipif(importlib.util.find_spec("cyllama") is None, reason="cyllama not installed")
def test_llamacpp_peer_prompt_lookup_is_lossless() -> None:
    """llama.cpp peer on the embedded GGUF: n-gram drafting returns exactly the plain greedy
    tokens, in fewer target decode steps on a prompt that repeats itself."""
    from dspark_sglang.benchmark.peers import LlamaCppPeer
    from dspark_sglang.models.default_model import has_default_model

    if not has_default_model():
        pytest.skip("embedded default model not installed")
    plain = LlamaCppPeer(None, prompt_lookup=False, num_threads=1, n_ctx=512)
    lookup = LlamaCppPeer(None, prompt_lookup=True, num_threads=1, n_ctx=512)
    text = ("<|im_start|>user\nRepeat exactly: red, green, blue, red, green, blue, red, green, "
            "blue<|im_end|>\n<|im_start|>assistant\n")
    ids = plain.tokenize(text)
    want, plain_steps = plain.generate_ids(ids, 40, ignore_eos=True)
    got, lookup_steps = lookup.generate_ids(ids, 40, ignore_eos=True)
    assert got == want and len(want) == 40
    assert plain_steps == 39 and lookup_steps < plain_steps
    a, _ = plain.generate_ids(ids, 16, temperature=1.0, seed=7)
    b, _ = lookup.generate_ids(ids, 16, temperature=1.0, seed=7)
    assert len(a) >= 1 and len(b) >= 1
    with pytest.raises(ValueError, match="exceeds the llama.cpp context"):
        plain.generate_ids(ids, 600)


def test_bench_speculative_rounds_report_the_median_round(
        tiny_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path) -> None:
    """--rounds 3: each mode runs three times (order rotated), the row is the median round with
    every round's tokens/s beside it, and greedy outputs agree across rounds and with NONE."""
    from dspark_sglang.bench_speculative import main

    out = tmp_path / "spec.json"
    main(["--model-path", str(tiny_dir), "--dtype", "float32", "--modes", "NONE", "NGRAM",
          "--concurrency", "1", "--prompt-file", str(prompt_files[0]), "--prompts-per-file",
          "2", "--max-new-tokens", "8", "--num-threads", "1", "--rounds", "3",
          "--output", str(out)])
    rep = json.loads(out.read_text())
    assert rep["config"]["rounds"] == 3
    for r in rep["results"]:
        vals = r["rounds_output_tok_s"]
        assert len(vals) == 3 and r["rounds"] == 3 and "outputs_vary" not in r
        assert r["output_tok_s"] == sorted(vals)[1]
        assert r["spread"] == pytest.approx((max(vals) - min(vals)) / sorted(vals)[1])
    ngram = next(r for r in rep["results"] if r["mode"] == "NGRAM")
    assert ngram["identical_to_none"] == ngram["compared"] == 2


def test_median_rounds_picks_the_middle_and_flags_varying_outputs() -> None:
    from dspark_sglang.benchmark.speculative import _median_rounds

    def run(tok_s: float, ids: list[int]) -> tuple[list[dict], dict[int, list]]:
        return [{"mode": "X", "conc": 1, "output_tok_s": tok_s}], {1: [ids]}

    rows, outs = _median_rounds("X", [run(30.0, [1]), run(10.0, [2]), run(20.0, [3])], [1])
    assert rows[0]["output_tok_s"] == 20.0 and outs[1] == [[3]]
    assert rows[0]["rounds_output_tok_s"] == [30.0, 10.0, 20.0] and rows[0]["outputs_vary"]
    assert rows[0]["spread"] == pytest.approx(1.0)
    # an even count takes the lower middle; a failed round is left out
    failed = ([{"mode": "X", "conc": 1, "error": "error: boom"}], {})
    rows, _ = _median_rounds("X", [run(4.0, [1]), failed, run(2.0, [1])], [1])
    assert rows[0]["output_tok_s"] == 2.0 and rows[0]["rounds"] == 2
    assert "outputs_vary" not in rows[0]
    rows, _ = _median_rounds("X", [failed], [1])
    assert rows[0]["error"] == "error: boom"


def test_offline_measure_with_a_prefix_cache_times_decode_only(monkeypatch) -> None:
    """A system with a prefix cache (a simulated one: 1 ms per uncached prompt token, 5 ms per
    decode step of the batch): prefill repeats get uncached prompts of their own, and the decode
    figure is exactly the decode steps' cost, however slow the decode prompts' prefill is."""
    import time
    from types import SimpleNamespace

    from dspark_sglang.benchmark.offline import OfflineConfig, measure

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    cache: set[tuple[int, ...]] = set()
    prefilled = []

    def gen(batch: list[list[int]], n: int) -> None:
        new = sum(1 if tuple(p) in cache else len(p) for p in batch)
        prefilled.append(new)
        cache.update(tuple(p) for p in batch)
        clock[0] += 1e-3 * new + 5e-3 * (n - 1)  # the first token comes with the prefill

    tok = SimpleNamespace(encode=lambda text: [ord(c) % 50 for c in text])
    cfg = OfflineConfig(batch_sizes=[1, 4], prefill_len=64, decode_prompt_len=48,
                        decode_tokens=8, repeats=3)
    res = measure(gen, tok, 50, cfg, prefix_cached=True)
    assert res["prefill_tok_s"] == pytest.approx(64 / 64e-3)  # every repeat uncached
    assert prefilled[1:4] == [64, 64, 64]
    for b in (1, 4):
        assert res[f"decode_b{b}_tok_s"] == pytest.approx(b * 8 / (8 * 5e-3))
    assert "error" not in res
