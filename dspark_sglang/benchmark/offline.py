"""Raw engine speed (``python -m dspark_sglang.bench_offline``): prefill and decode tokens/s.

Method, identical for every system:
- prefill tokens/s = ``prefill_len`` / time of one request of ``prefill_len`` prompt tokens and
  one new token;
- decode tokens/s at batch B = ``B * decode_tokens`` / (time(B prompts, ``decode_tokens + 1``
  new tokens) - time(same B prompts, 1 new token)): the prefill cancels out. EOS is ignored, so
  every request produces exactly the asked number of tokens.
Prompts are token ids (no tokenizer in the timing), distinct per request. Our engine runs with
its radix cache on: each prefill repeat gets a prompt of its own (no cached prefix shortens it),
and the decode batch's prompts are prefilled once before the two timed runs, which then prefill
one token per request; the difference of two full prefills of B x ``decode_prompt_len`` tokens
was mostly run-to-run noise at batch 64 (a 32-step decode inside ~80 s of prefill).
transformers has no prefix cache and is timed with full prefills. Each time is the median of
``repeats`` runs.

llama.cpp (``with_llamacpp``) is measured by its own ``llama-bench`` on the GGUF file (its own
quantized weights): prefill = its ``pp`` test of ``prefill_len`` tokens, batch-1 decode = its
``tg`` test of ``decode_tokens`` tokens after ``decode_prompt_len`` tokens of context
(``-d``), mean of ``repeats`` runs. ``llama-bench`` measures one sequence, so llama.cpp has no
batch > 1 decode figures here (bench_serving drives its server at higher concurrency).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dspark_sglang.benchmark.peers import HFPeer, peer_unavailable
from dspark_sglang.benchmark.report import error_text, format_table, machine_info, ratio

GenFn = Callable[[list[list[int]], int], Any]

_BASE_TEXT = ("The history of computing is a story of abstraction: each generation of engineers "
              "builds tools that hide the details of the layer below, so that the next can think "
              "in larger steps. Compilers hid machine code, operating systems hid hardware, and "
              "networks hid distance. ")


@dataclass
class OfflineConfig:
    model_path: str | None = None
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    prefill_len: int = 512
    decode_prompt_len: int = 32
    decode_tokens: int = 32
    repeats: int = 1
    num_threads: int | None = None
    with_transformers: bool = True
    # ours once per backend ("auto" = the engine's default); the first is the one compared with
    # transformers, the others are reported against it
    attention_backends: list[str] = field(default_factory=lambda: ["auto"])
    with_llamacpp: bool = False
    llama_bench: str | None = None  # binary; default: next to llama-server, or on PATH
    engine_extra: dict[str, Any] = field(default_factory=dict)  # more Engine fields for ours


def make_prompt_ids(tokenizer: Any, num: int, length: int, vocab_size: int,
                    start: int = 0) -> list[list[int]]:
    """``num`` distinct prompts of exactly ``length`` token ids (request-numbered text)."""
    out = []
    for i in range(start, start + num):
        ids = tokenizer.encode(f"Request {i}. " + _BASE_TEXT)
        while len(ids) < length:
            ids = ids + ids
        row = ids[:length]
        row[0] = (row[0] + i) % vocab_size if i else row[0]
        out.append(row)
    return out


def _timed(fn: GenFn, batch: list[list[int]], n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch, n)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(gen: GenFn, tokenizer: Any, vocab_size: int, cfg: OfflineConfig,
            prefix_cached: bool = False) -> dict[str, Any]:
    """Prefill and per-batch decode tokens/s of one system (``gen(batch_ids, max_new)``).
    ``prefix_cached``: the system keeps prompts' KV in a prefix cache (see the module doc)."""
    gen(make_prompt_ids(tokenizer, 1, 16, vocab_size, start=10**6), 2)  # warm-up
    res: dict[str, Any] = {}
    long_prompt = make_prompt_ids(tokenizer, 1, cfg.prefill_len, vocab_size)
    prefill = gen
    if prefix_cached:  # a prompt of its own per repeat
        fresh = iter(make_prompt_ids(tokenizer, cfg.repeats, cfg.prefill_len, vocab_size,
                                     start=10**5))
        prefill = lambda _batch, n: gen([next(fresh)], n)  # noqa: E731
    res["prefill_tok_s"] = cfg.prefill_len / _timed(prefill, long_prompt, 1, cfg.repeats)
    for b in cfg.batch_sizes:
        try:
            batch = make_prompt_ids(tokenizer, b, cfg.decode_prompt_len, vocab_size)
            if prefix_cached:
                gen(batch, 1)  # the prompts' KV into the cache: the timed runs decode only
            t1 = _timed(gen, batch, 1, cfg.repeats)
            tn = _timed(gen, batch, cfg.decode_tokens + 1, cfg.repeats)
            res[f"decode_b{b}_tok_s"] = (b * cfg.decode_tokens / (tn - t1) if tn > t1
                                         else None)
            if tn <= t1:  # the decode time is inside the two prefills' run-to-run spread
                res.setdefault("error", f"batch {b}: decode lost in prefill noise (generate "
                               f"of {cfg.decode_tokens + 1} tokens {tn:.2f}s <= of 1 token "
                               f"{t1:.2f}s); bench_step --batch-size {b} times steps directly")
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            res[f"decode_b{b}_tok_s"] = None
            res.setdefault("error", error_text(e))
    return res


def _measure_ours(cfg: OfflineConfig, dtype: str, attention_backend: str = "auto"
                  ) -> tuple[dict[str, Any], Any]:
    from dspark_sglang.entrypoints.engine import Engine

    max_b = max(cfg.batch_sizes)
    total = max(cfg.prefill_len + 64,
                max_b * (cfg.decode_prompt_len + 2 * cfg.decode_tokens + 16)) + 256
    engine = Engine(cfg.model_path, dtype=dtype, max_running_requests=max_b,
                    max_total_tokens=total, disable_radix_cache=False,
                    num_threads=cfg.num_threads,
                    chunked_prefill_size=max(2048, cfg.prefill_len),
                    attention_backend=attention_backend, **cfg.engine_extra)
    try:
        def gen(batch: list[list[int]], n: int) -> Any:
            return engine.generate(input_ids=batch, sampling_params={
                "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True})

        res = measure(gen, engine.tokenizer, engine.parts.vocab_size, cfg, prefix_cached=True)
        res["attention"] = engine.parts.runner.attention_backend
        return res, engine.tokenizer
    finally:
        engine.shutdown()
        gc.collect()


def _measure_hf(cfg: OfflineConfig, dtype: str, tokenizer: Any) -> dict[str, Any]:
    peer = HFPeer(cfg.model_path, dtype)
    vocab = int(peer.model.config.vocab_size)

    def gen(batch: list[list[int]], n: int) -> Any:
        return peer.generate_ids(batch, n, ignore_eos=True)

    try:
        return measure(gen, tokenizer, vocab, cfg)
    finally:
        peer.model = None
        gc.collect()


def find_llama_bench(explicit: str | None = None) -> str | None:
    """``llama-bench``: ``explicit``, beside the llama-server that bench_serving would use, or
    on ``PATH``."""
    import os
    import shutil
    from pathlib import Path

    from dspark_sglang.benchmark.llamacpp_server import find_llama_server

    server = find_llama_server()
    for cand in (explicit, str(server.parent / "llama-bench") if server else None,
                 shutil.which("llama-bench")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def parse_llama_bench(records: list[dict[str, Any]], decode_batch: int = 1) -> dict[str, Any]:
    """``llama-bench -o json`` records -> our row: prefill (``n_gen == 0``) and decode
    (``n_prompt == 0``) tokens/s, and the quantization llama.cpp ran."""
    res: dict[str, Any] = {}
    for r in records:
        if int(r.get("n_gen", 0)) == 0 and int(r.get("n_prompt", 0)) > 0:
            res["prefill_tok_s"] = float(r["avg_ts"])
        elif int(r.get("n_prompt", 0)) == 0 and int(r.get("n_gen", 0)) > 0:
            res[f"decode_b{decode_batch}_tok_s"] = float(r["avg_ts"])
        if r.get("model_type"):
            res["attention"] = f"llama.cpp {r['model_type']}"
    return res


def _measure_llamacpp(cfg: OfflineConfig) -> dict[str, Any]:
    import json
    import os
    import subprocess

    from dspark_sglang.benchmark.peers import gguf_file

    binary = find_llama_bench(cfg.llama_bench)
    if binary is None:
        return {"error": "skipped: no llama-bench binary (scripts/build_llamacpp.sh)"}
    model = gguf_file(cfg.model_path)
    if model is None:
        return {"error": "skipped: llama.cpp needs a single .gguf file as the model"}
    threads = cfg.num_threads or len(os.sched_getaffinity(0))
    cmd = [binary, "-m", str(model), "-p", str(cfg.prefill_len), "-n", "0", "-t", str(threads),
           "-r", str(cfg.repeats), "-o", "json", "-ngl", "0"]
    cmd2 = [binary, "-m", str(model), "-p", "0", "-n", str(cfg.decode_tokens), "-d",
            str(cfg.decode_prompt_len), "-t", str(threads), "-r", str(cfg.repeats), "-o",
            "json", "-ngl", "0"]
    records = []
    for c in (cmd, cmd2):
        out = subprocess.run(c, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            return {"error": f"llama-bench exited {out.returncode}: {out.stderr[-200:]}"}
        records += json.loads(out.stdout)
    return parse_llama_bench(records, min(cfg.batch_sizes))


def run_offline_bench(cfg: OfflineConfig, log: Any = print) -> dict[str, Any]:
    """Measure our engine (and transformers) per dtype; print tables; return the report."""
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rows: list[dict[str, Any]] = []
    hf_skip = peer_unavailable("hf") if cfg.with_transformers else "skipped: --no-transformers"
    for dtype in cfg.dtypes:
        tokenizer = None
        for i, backend in enumerate(cfg.attention_backends):
            log(f"[bench_offline] ours {dtype} attention={backend} ...")
            system = "ours" if i == 0 else "ours-alt"
            try:
                res, tokenizer = _measure_ours(cfg, dtype, backend)
                rows.append({"system": system, "dtype": dtype, **res})
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                rows.append({"system": system, "dtype": dtype, "attention": backend,
                             "error": error_text(e)})
        if hf_skip:
            rows.append({"system": "transformers", "dtype": dtype, "error": hf_skip})
            continue
        log(f"[bench_offline] transformers {dtype} ...")
        try:
            if tokenizer is None:
                from dspark_sglang.models.loader import load_model_files

                tokenizer = load_model_files(cfg.model_path).tokenizer
            rows.append({"system": "transformers", "dtype": dtype,
                         **_measure_hf(cfg, dtype, tokenizer)})
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            rows.append({"system": "transformers", "dtype": dtype, "error": error_text(e)})
    if cfg.with_llamacpp:
        log("[bench_offline] llama.cpp (llama-bench) ...")
        try:
            rows.append({"system": "llama.cpp", "dtype": "gguf", **_measure_llamacpp(cfg)})
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            rows.append({"system": "llama.cpp", "dtype": "gguf", "error": error_text(e)})
    ratios = compute_ratios(rows, cfg)
    dec_cols = [f"decode_b{b}_tok_s" for b in cfg.batch_sizes]
    cols = ["system", "dtype", "attention", "prefill_tok_s", *dec_cols, "error"]
    log(format_table(rows, cols, f"prefill {cfg.prefill_len} tokens; decode "
                                 f"{cfg.decode_tokens} tokens after a {cfg.decode_prompt_len}-"
                                 "token prompt (tokens/s, aggregate over the batch)"))
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}  # one table per row shape
    for r in ratios:  # backend against backend, ours against llama.cpp, against transformers
        groups.setdefault(tuple(r), []).append(r)
    for cols_, part in groups.items():
        log(format_table(part, list(cols_), "ratios"))
    return {"benchmark": "bench_offline", "machine": machine_info(),
            "config": vars(cfg), "results": rows, "ratios": ratios}


def compute_ratios(rows: list[dict[str, Any]], cfg: OfflineConfig) -> list[dict[str, Any]]:
    """Per dtype: ours / transformers (prefill, batch-1 decode) and ours batch-max / batch-1."""
    out = []
    b1, bmax = min(cfg.batch_sizes), max(cfg.batch_sizes)
    for dtype in cfg.dtypes:
        ours = next((r for r in rows if r["system"] == "ours" and r["dtype"] == dtype), {})
        hf = next((r for r in rows if r["system"] == "transformers" and r["dtype"] == dtype), {})
        for alt in (r for r in rows if r["system"] == "ours-alt" and r["dtype"] == dtype):
            # the first backend's decode speed over another's, per batch size
            out.append({"dtype": dtype, "compare": f"{ours.get('attention')}/"
                                                   f"{alt.get('attention')}",
                        **{f"decode_b{b}": ratio(ours.get(f"decode_b{b}_tok_s"),
                                                 alt.get(f"decode_b{b}_tok_s"))
                           for b in cfg.batch_sizes}})
        lcpp = next((r for r in rows if r["system"] == "llama.cpp"), None)
        if lcpp is not None:
            out.append({"dtype": dtype, "compare": "ours/llama.cpp",
                        "prefill": ratio(ours.get("prefill_tok_s"), lcpp.get("prefill_tok_s")),
                        f"decode_b{b1}": ratio(ours.get(f"decode_b{b1}_tok_s"),
                                               lcpp.get(f"decode_b{b1}_tok_s"))})
        out.append({
            "dtype": dtype,
            "prefill_ours/hf": ratio(ours.get("prefill_tok_s"), hf.get("prefill_tok_s")),
            f"decode_b{b1}_ours/hf": ratio(ours.get(f"decode_b{b1}_tok_s"),
                                           hf.get(f"decode_b{b1}_tok_s")),
            f"ours_b{bmax}/ours_b{b1}": ratio(ours.get(f"decode_b{bmax}_tok_s"),
                                              ours.get(f"decode_b{b1}_tok_s")),
            f"hf_b{bmax}/hf_b{b1}": ratio(hf.get(f"decode_b{bmax}_tok_s"),
                                          hf.get(f"decode_b{b1}_tok_s")),
        })
    return out
