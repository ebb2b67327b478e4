"""llama.cpp's ``llama-server`` as a bench_serving peer.

A stand-in ``llama-server`` (a Python script speaking the three things the peer uses: ``--help``,
``/health``, ``/completion``) checks the launch command, the request payload, the τ arithmetic and
the report rows; with a real binary (``$DSPARK_LLAMA_SERVER``) a second test runs llama.cpp's own
DSpark on our exported drafter and checks its greedy output equals llama.cpp's plain decoding.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from dspark_sglang.benchmark.llamacpp_server import (
    LlamaServerConfig,
    completion_output,
    completion_payload,
    find_llama_server,
)

FAKE = r'''#!{python}
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
argv = sys.argv[1:]
if "--help" in argv:
    print("--spec-type [none|draft-simple|draft-dflash|draft-dspark]")
    sys.exit(0)
with open({argv_log!r}, "a") as f:
    f.write(json.dumps(argv) + "\n")
port = int(argv[argv.index("--port") + 1])
spec = "-md" in argv
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self._send({{"status": "ok"}})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open({req_log!r}, "a") as f:
            f.write(json.dumps(body) + "\n")
        n = body["n_predict"]
        timings = {{"predicted_n": n}}
        if spec:
            timings.update(draft_n=n, draft_n_accepted=n // 2)
        self._send({{"content": "x" * n, "tokens": list(range(n)), "tokens_predicted": n,
                    "timings": timings}})
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture()
def fake_server(tmp_path: Path) -> tuple[Path, Path, Path]:
    argv_log, req_log = tmp_path / "argv.jsonl", tmp_path / "req.jsonl"
    exe = tmp_path / "llama-server"
    exe.write_text(FAKE.format(python=sys.executable, argv_log=str(argv_log),
                               req_log=str(req_log)))
    exe.chmod(0o755)
    return exe, argv_log, req_log


def test_completion_payload_and_tau_arithmetic() -> None:
    p = completion_payload("hi", {"max_new_tokens": 9, "temperature": 0.0})
    assert p["n_predict"] == 9 and p["temperature"] == 0.0 and "seed" not in p
    assert "top_k" not in p  # greedy: llama.cpp takes the argmax at temperature 0
    p = completion_payload("hi", {"max_new_tokens": 4, "temperature": 1.0, "seed": 3,
                                  "ignore_eos": True})
    assert p["seed"] == 3 and p["ignore_eos"] and p["top_k"] == 0 and p["min_p"] == 0.0
    # 10 tokens, 6 accepted drafts: 4 target steps (each emits one token + its accepted drafts)
    out = completion_output({"content": "abc", "tokens_predicted": 10, "tokens": [1, 2],
                             "timings": {"draft_n": 14, "draft_n_accepted": 6}})
    meta = out["meta_info"]
    assert meta == {"completion_tokens": 10, "spec_verify_ct": 4, "spec_draft_tokens": 14}
    assert out["text"] == "abc" and out["output_ids"] == [1, 2]
    plain = completion_output({"content": "", "tokens_predicted": 5, "timings": {}})
    assert plain["meta_info"]["spec_verify_ct"] == 5  # τ = 1 without drafting


def test_command_line(tmp_path: Path) -> None:
    cfg = LlamaServerConfig(Path("/bin/llama-server"), tmp_path / "m.gguf",
                            drafter_gguf=tmp_path / "d.gguf", threads=2, parallel=8,
                            ctx_per_slot=1024, draft_max=5)
    cmd = cfg.command(1234)
    assert cmd[cmd.index("-c") + 1] == str(8 * 1024) and cmd[cmd.index("-np") + 1] == "8"
    assert cmd[cmd.index("--spec-type") + 1] == "draft-dspark"
    assert cmd[cmd.index("--spec-draft-n-max") + 1] == "5"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "-md" not in LlamaServerConfig(Path("x"), Path("m.gguf")).command(1)


def test_find_binary_env(fake_server: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
                         ) -> None:
    exe = fake_server[0]
    monkeypatch.setenv("DSPARK_LLAMA_SERVER", str(exe))
    assert find_llama_server() == exe
    monkeypatch.setenv("DSPARK_LLAMA_SERVER", str(exe.parent / "missing"))
    monkeypatch.setenv("PATH", str(exe.parent.parent))
    assert find_llama_server() is None
    from dspark_sglang.benchmark.peers import peer_unavailable

    assert "no llama-server binary" in (peer_unavailable("llamacpp-server") or "")


def test_bench_serving_drives_llama_server_peers(fake_server: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    from dspark_sglang.bench_serving import main
    from dspark_sglang.models.default_model import has_default_model

    if not has_default_model():
        pytest.skip("embedded default model not installed")
    exe, argv_log, req_log = fake_server
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"question {i}"]}) + "\n"
                               for i in range(3)))
    out = tmp_path / "report.json"
    main(["--modes", "--peers", "llamacpp-server", "llamacpp-server-dspark",
          "--llama-server", str(exe), "--prompt-file", str(prompts), "--prompts-per-file", "3",
          "--concurrency", "1", "2", "--max-new-tokens", "6", "--num-threads", "1",
          "--llamacpp-draft-max", "5", "--log-dir", str(tmp_path), "--no-progress",
          "--output", str(out)])
    rep = json.loads(out.read_text())
    rows = {(r["mode"], r["load"]): r for r in rep["results"]}
    assert set(rows) == {(m, lv) for m in ("llamacpp-server", "llamacpp-server-dspark")
                         for lv in ("conc=1", "conc=2")}
    for (mode, _), r in rows.items():
        assert "error" not in r, r
        assert r["num_requests"] == 3 and r["completion_tokens"] == 18
        # fake: 6 tokens, 3 accepted drafts -> 3 steps -> τ 2; plain: τ 1
        assert r["tau"] == pytest.approx(2.0 if mode.endswith("dspark") else 1.0)
    launches = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert len(launches) == 2 and "-md" not in launches[0]
    spec = launches[1]
    assert spec[spec.index("--spec-type") + 1] == "draft-dspark"
    assert spec[spec.index("-np") + 1] == "2" and spec[spec.index("-t") + 1] == "1"
    drafter = Path(spec[spec.index("-md") + 1])
    from gguf import GGUFReader

    assert GGUFReader(str(drafter)).fields["general.architecture"].contents() == "dflash"
    reqs = [json.loads(line) for line in req_log.read_text().splitlines()]
    assert all(r["temperature"] == 0.0 for r in reqs)
    assert {r["n_predict"] for r in reqs} == {4, 6}  # warm-up, then the runs
    assert "<|im_start|>" in reqs[-1]["prompt"]  # same chat-formatted text as our modes get
    goals = {g["goal"]: g for g in rep["goals"]}
    assert goals["DSPARK / llama.cpp DSpark"]["measured"] is None  # no DSPARK row this run


@pytest.mark.skipif(not os.environ.get("DSPARK_LLAMA_SERVER"),
                    reason="needs a real llama-server (scripts/build_llamacpp.sh)")
def test_real_llama_server_dspark_matches_plain(tmp_path: Path) -> None:
    """llama.cpp's own DSpark with our exported drafter: greedy output equals its plain
    decoding, and some drafts are accepted (the export is read as we mean it)."""
    import asyncio

    from dspark_sglang.benchmark.http_load import LoadLevel, run_load
    from dspark_sglang.benchmark.llamacpp_server import LlamaServer, drafter_gguf
    from dspark_sglang.benchmark.peers import gguf_file
    from dspark_sglang.benchmark.workloads import PromptItem

    binary = find_llama_server()
    model = gguf_file(None)
    assert binary is not None and model is not None
    items = [PromptItem(text=t, domain="x") for t in (
        "<|im_start|>user\nWhat is 12 times 13? Explain step by step.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\nWrite a Python function that reverses a list.<|im_end|>\n"
        "<|im_start|>assistant\n")]
    sps = [{"max_new_tokens": 48, "temperature": 0.0}] * len(items)
    outs = {}
    for name, draft in (("plain", None), ("dspark", drafter_gguf(None, model, tmp_path))):
        cfg = LlamaServerConfig(binary, model, draft, threads=2, parallel=1,
                                ctx_per_slot=2048)
        with LlamaServer(cfg, tmp_path / f"{name}.log") as srv:
            res, _ = asyncio.run(run_load(srv.url, "llamacpp", items, [i.text for i in items],
                                          sps, LoadLevel("conc", 1), progress=False))
        assert all(r.error is None for r in res), [r.error for r in res]
        outs[name] = res
    for a, b in zip(outs["plain"], outs["dspark"]):
        assert a.output_ids == b.output_ids and len(a.output_ids) > 0
    assert sum(r.completion_tokens for r in outs["dspark"]) > sum(
        r.spec_verify_ct for r in outs["dspark"])  # τ > 1


def test_llama_bench_records_and_ratios() -> None:
    from dspark_sglang.benchmark.offline import OfflineConfig, compute_ratios, parse_llama_bench

    recs = [{"model_type": "llama ?B Q4_1", "n_prompt": 512, "n_gen": 0, "n_depth": 0,
             "avg_ts": 900.0},
            {"model_type": "llama ?B Q4_1", "n_prompt": 0, "n_gen": 32, "n_depth": 32,
             "avg_ts": 40.0}]
    got = parse_llama_bench(recs)
    assert got == {"prefill_tok_s": 900.0, "decode_b1_tok_s": 40.0,
                   "attention": "llama.cpp llama ?B Q4_1"}
    cfg = OfflineConfig(dtypes=["float32"], batch_sizes=[1, 8])
    rows = [{"system": "ours", "dtype": "float32", "prefill_tok_s": 450.0,
             "decode_b1_tok_s": 20.0, "decode_b8_tok_s": 80.0},
            {"system": "llama.cpp", "dtype": "gguf", **got}]
    lc = next(r for r in compute_ratios(rows, cfg) if r.get("compare") == "ours/llama.cpp")
    assert lc["prefill"] == pytest.approx(0.5) and lc["decode_b1"] == pytest.approx(0.5)


def test_bench_offline_reports_missing_llama_bench(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from dspark_sglang.benchmark.offline import OfflineConfig, _measure_llamacpp

    monkeypatch.delenv("DSPARK_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    res = _measure_llamacpp(OfflineConfig(llama_bench=str(tmp_path / "nope")))
    assert res["error"].startswith("skipped: no llama-bench")
