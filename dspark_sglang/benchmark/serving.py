"""Serving benchmark (``python -m dspark_sglang.bench_serving``): our server per mode + peers.

For each mode a server is launched (``Runtime``), warmed up, driven at every load level and shut
down before the next; or one given ``--url`` is driven. Engine-wide verify statistics come from
``/server_info`` snapshots around each level. Peers run in-process one request at a time on the
same prompts; their rows are compared with our modes at the lowest load (ratios ours / peer).
Server peers (``llamacpp-server``, ``llamacpp-server-dspark``: llama.cpp's ``llama-server``) are
launched like our modes and driven at every load level by the same client.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from dspark_sglang.benchmark.engine_runner import engine_kwargs_for_mode
from dspark_sglang.benchmark.http_load import LoadLevel, get_json, run_load
from dspark_sglang.benchmark.llamacpp_server import SERVER_PEERS
from dspark_sglang.benchmark.metrics import stats_delta, summarize
from dspark_sglang.benchmark.peers import install_peer, peer_unavailable, run_peer
from dspark_sglang.benchmark.report import error_text, format_table, machine_info, ratio
from dspark_sglang.benchmark.workloads import PromptItem, chat_prompt, sampling_for


@dataclass
class ServingConfig:
    items: list[PromptItem]
    modes: list[str] = field(default_factory=lambda: ["NONE", "NGRAM"])
    levels: list[LoadLevel] = field(default_factory=lambda: [LoadLevel("conc", 1)])
    url: str | None = None
    model_path: str | None = None
    dtype: str = "auto"
    api: str = "native"
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    stream: bool = False
    progress: bool = True
    peers: list[str] = field(default_factory=list)
    peer_prompts: int | None = None
    install_peers: bool = False
    assistant_model_path: str | None = None
    draft_model_path: str | None = None
    num_draft_tokens: int | None = None
    num_threads: int | None = None
    max_total_tokens: int = 32768
    max_running_requests: int = 64
    chat_template: bool = True
    launch_timeout: float = 600.0
    llama_server: str | None = None  # llama-server binary for the llamacpp-server peers
    dspark_drafter: str | None = None  # drafter exported for llamacpp-server-dspark
    llamacpp_draft_max: int = 7
    log_dir: str | None = None  # where server peers write their logs
    server_extra: dict[str, Any] = field(default_factory=dict)  # more ServerArgs fields


ROW_COLUMNS = ["mode", "load", "ok", "out_tok_s", "per_user_tok_s", "p50_lat_s", "tau",
               "verify_tok/step", "batch_verify_tok/step", "note"]


def _tokenizer(cfg: ServingConfig) -> Any:
    from dspark_sglang.benchmark.peers import hf_model_dir
    from dspark_sglang.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(hf_model_dir(cfg.model_path))


def _requests(cfg: ServingConfig, tokenizer: Any) -> tuple[list[str], list[dict[str, Any]]]:
    texts = [chat_prompt(tokenizer, it.text) if cfg.chat_template and tokenizer is not None
             else it.text for it in cfg.items]
    sps = [sampling_for(it, cfg.max_new_tokens, cfg.temperature, cfg.seed + i)
           for i, it in enumerate(cfg.items)]
    return texts, sps


async def _drive(cfg: ServingConfig, mode: str, url: str, texts: list[str],
                 sps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    info = await get_json(url, "/get_model_info")
    name = str(info.get("served_model_name") or info.get("model_path") or "default")
    await run_load(url, cfg.api, cfg.items[:1], texts[:1],
                   [{**sps[0], "max_new_tokens": 4}], LoadLevel("conc", 1), name, False, False)
    rows = []
    for level in cfg.levels:
        before = (await get_json(url, "/server_info")).get("spec_stats") or {}
        results, wall = await run_load(url, cfg.api, cfg.items, texts, sps, level, name,
                                       cfg.stream, cfg.progress, cfg.seed)
        after = (await get_json(url, "/server_info")).get("spec_stats") or {}
        row = {"mode": mode, level.kind: level.value, "load": level.label(),
               **summarize(results, wall), **stats_delta(before, after)}
        if row["num_errors"]:
            row["error"] = f"{row['num_errors']} failed; {row['first_error']}"
        rows.append(row)
    return rows


def _bench_mode(cfg: ServingConfig, mode: str, texts: list[str], sps: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    from dspark_sglang.entrypoints.runtime import Runtime

    if cfg.url is not None:
        return asyncio.run(_drive(cfg, mode, cfg.url.rstrip("/"), texts, sps))
    try:
        kw = engine_kwargs_for_mode(mode, cfg.num_draft_tokens, cfg.draft_model_path)
        rt = Runtime(cfg.model_path, launch_timeout=cfg.launch_timeout, dtype=cfg.dtype,
                     max_total_tokens=cfg.max_total_tokens,
                     max_running_requests=cfg.max_running_requests,
                     num_threads=cfg.num_threads, **kw, **cfg.server_extra)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        return [{"mode": mode, level.kind: level.value, "load": level.label(),
                 "error": error_text(e)} for level in cfg.levels]
    try:
        return asyncio.run(_drive(cfg, mode, rt.url, texts, sps))
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        return [{"mode": mode, "load": "-", "error": error_text(e)}]
    finally:
        rt.shutdown()


async def _drive_llamacpp(cfg: ServingConfig, name: str, url: str, texts: list[str],
                          sps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    await run_load(url, "llamacpp", cfg.items[:1], texts[:1],
                   [{**sps[0], "max_new_tokens": 4}], LoadLevel("conc", 1), name, False, False)
    rows = []
    for level in cfg.levels:
        results, wall = await run_load(url, "llamacpp", cfg.items, texts, sps, level, name,
                                       False, cfg.progress, cfg.seed)
        row = {"mode": name, level.kind: level.value, "load": level.label(),
               **summarize(results, wall)}
        if row["num_errors"]:
            row["error"] = f"{row['num_errors']} failed; {row['first_error']}"
        rows.append(row)
    return rows


def _bench_server_peer(cfg: ServingConfig, name: str, texts: list[str],
                       sps: list[dict[str, Any]], log: Any) -> list[dict[str, Any]]:
    """llama.cpp's ``llama-server`` (plain, or DSpark with our exported drafter) at every level."""
    from pathlib import Path

    from dspark_sglang.benchmark.llamacpp_server import (
        LlamaServer,
        LlamaServerConfig,
        drafter_gguf,
        find_llama_server,
    )
    from dspark_sglang.benchmark.peers import gguf_file

    def failed(msg: str) -> list[dict[str, Any]]:
        return [{"mode": name, level.kind: level.value, "load": level.label(), "error": msg}
                for level in cfg.levels]

    why = peer_unavailable(name, cfg.model_path, llama_server=cfg.llama_server)
    if why:
        log(f"[bench_serving] peer {name}: {why}")
        return failed(why)
    binary, model = find_llama_server(cfg.llama_server), gguf_file(cfg.model_path)
    assert binary is not None and model is not None
    cache = Path.home() / ".cache" / "dspark_sglang" / "llamacpp"
    cache.mkdir(parents=True, exist_ok=True)
    conc = [int(lv.value) for lv in cfg.levels if lv.kind == "conc"]
    try:
        draft = drafter_gguf(cfg.dspark_drafter, model, cache) if name.endswith("dspark") else None
        scfg = LlamaServerConfig(binary, model, draft, threads=cfg.num_threads,
                                 parallel=max(conc) if conc else 8,
                                 ctx_per_slot=max(4096, 2 * cfg.max_new_tokens + 2048),
                                 draft_max=cfg.llamacpp_draft_max)
        log_path = Path(cfg.log_dir) / f"{name}.log" if cfg.log_dir else cache / f"{name}.log"
        log(f"[bench_serving] {name}: {' '.join(scfg.command(0))}")
        with LlamaServer(scfg, log_path, cfg.launch_timeout) as srv:
            return asyncio.run(_drive_llamacpp(cfg, name, srv.url, texts, sps))
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        return failed(error_text(e))


def _run_peers(cfg: ServingConfig, texts: list[str], tokenizer: Any, log: Any
               ) -> list[dict[str, Any]]:
    rows = []
    n = cfg.peer_prompts or len(texts)
    for name in cfg.peers:
        if name in SERVER_PEERS:
            continue  # driven like our modes, see _bench_server_peer
        why = peer_unavailable(name, cfg.model_path, cfg.assistant_model_path)
        if why and cfg.install_peers and install_peer(name, log):
            why = peer_unavailable(name, cfg.model_path, cfg.assistant_model_path)
        if why:
            log(f"[bench_serving] peer {name}: {why}")
            rows.append({"peer": name, "error": why})
            continue
        log(f"[bench_serving] peer {name} on {n} prompts ...")
        try:
            results, wall = run_peer(name, texts[:n], [it.domain for it in cfg.items[:n]],
                                     tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.dtype,
                                     cfg.model_path, cfg.assistant_model_path, cfg.num_threads,
                                     cfg.seed)
            row = {"peer": name, "conc": 1, **summarize(results, wall)}
            if row["num_errors"]:
                row["error"] = f"{row['num_errors']} failed; {row['first_error']}"
            rows.append(row)
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            rows.append({"peer": name, "error": error_text(e)})
    return rows


def _load_order(r: dict[str, Any]) -> tuple[int, float]:
    """Closed-loop levels first (lowest concurrency first), then request rates."""
    if r.get("conc") is not None:
        return (0, float(r["conc"]))
    return (1, float(r.get("rate") or 0.0))


def peer_ratios(rows: list[dict[str, Any]], peers: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """Per mode at its lowest load: per-user tokens/s of ours / each peer."""
    out = []
    lowest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("error") or r.get("per_user_tok_s") is None:
            continue
        cur = lowest.get(r["mode"])
        if cur is None or _load_order(r) < _load_order(cur):
            lowest[r["mode"]] = r
    for mode, r in lowest.items():
        row: dict[str, Any] = {"mode": mode, "load": r["load"]}
        for p in peers:
            row[f"vs {p['peer']}"] = ratio(r.get("per_user_tok_s"), p.get("per_user_tok_s"))
        out.append(row)
    return out


def check_goals(rows: list[dict[str, Any]], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals as ratios measured in this run (None where a side is missing)."""
    ok = [r for r in rows if not r.get("error") and r.get("conc") is not None]

    def at(mode: str, conc: float) -> dict[str, Any] | None:
        return next((r for r in ok if r["mode"] == mode and r["conc"] == conc), None)

    def peer(name: str) -> dict[str, Any] | None:
        return next((p for p in peers if p["peer"] == name and not p.get("error")), None)

    concs = sorted({r["conc"] for r in ok})
    lo, hi = (concs[0], concs[-1]) if concs else (None, None)

    def val(r: dict[str, Any] | None, key: str) -> float | None:
        return r.get(key) if r else None

    ds_lo = at("DSPARK", lo) if lo is not None else None
    goals = [
        ("DSPARK / MTP1 per-user tok/s", f"conc={lo}", 1.85,
         ratio(val(ds_lo, "per_user_tok_s"), val(at("MTP1", lo), "per_user_tok_s")
               if lo is not None else None)),
        ("DSPARK / NONE aggregate tok/s", f"conc={hi}", 1.0,
         ratio(val(at("DSPARK", hi), "output_tok_s") if hi is not None else None,
               val(at("NONE", hi), "output_tok_s") if hi is not None else None)),
        ("DSPARK / transformers assisted", f"conc={lo}", 3.0,
         ratio(val(ds_lo, "per_user_tok_s"), val(peer("hf-assisted"), "per_user_tok_s"))),
        ("DSPARK / llama.cpp plain", f"conc={lo}", 1.0,
         ratio(val(ds_lo, "per_user_tok_s"),
               val(at("llamacpp-server", lo) if lo is not None else None, "per_user_tok_s")
               or val(peer("llamacpp"), "per_user_tok_s"))),
        ("NONE / llama.cpp plain", f"conc={lo}", 1.0,
         ratio(val(at("NONE", lo) if lo is not None else None, "per_user_tok_s"),
               val(at("llamacpp-server", lo) if lo is not None else None, "per_user_tok_s")
               or val(peer("llamacpp"), "per_user_tok_s"))),
        ("DSPARK / llama.cpp DSpark", f"conc={lo}", 1.0,
         ratio(val(ds_lo, "per_user_tok_s"),
               val(at("llamacpp-server-dspark", lo) if lo is not None else None,
                   "per_user_tok_s"))),
    ]
    return [{"goal": g, "at": at_, "target": t, "measured": m,
             "met": None if m is None else m >= t} for g, at_, t, m in goals]


def run_serving_bench(cfg: ServingConfig, log: Any = print) -> dict[str, Any]:
    """Drive every mode and peer; print the tables; return the JSON-ready report."""
    try:
        tokenizer = _tokenizer(cfg)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        log(f"[bench_serving] no local tokenizer ({error_text(e)}); sending prompts as plain "
            "text and skipping in-process peers")
        tokenizer = None
    texts, sps = _requests(cfg, tokenizer)
    modes = ["url"] if cfg.url is not None else cfg.modes
    rows: list[dict[str, Any]] = []
    for mode in modes:
        log(f"[bench_serving] {mode}: {len(cfg.items)} requests x {len(cfg.levels)} levels")
        mode_rows = _bench_mode(cfg, mode, texts, sps)
        for r in mode_rows:
            if r.get("error"):
                log(f"[bench_serving]   {mode} {r.get('load')}: {r['error']}")
        rows += mode_rows
    if cfg.url is None:
        for name in (p for p in cfg.peers if p in SERVER_PEERS):
            log(f"[bench_serving] {name}: {len(cfg.items)} requests x {len(cfg.levels)} levels")
            peer_rows = _bench_server_peer(cfg, name, texts, sps, log)
            for r in peer_rows:
                if r.get("error"):
                    log(f"[bench_serving]   {name} {r.get('load')}: {r['error']}")
            rows += peer_rows
    peers = _run_peers(cfg, texts, tokenizer, log) if tokenizer is not None else []
    table = [{"mode": r["mode"], "load": r.get("load"),
              "ok": f"{r.get('num_requests', 0) - r.get('num_errors', 0)}/"
                    f"{r.get('num_requests', 0)}",
              "out_tok_s": r.get("output_tok_s"), "per_user_tok_s": r.get("per_user_tok_s"),
              "p50_lat_s": r.get("latency_p50_s"), "tau": r.get("tau"),
              "verify_tok/step": r.get("verify_tokens_per_req_step"),
              "batch_verify_tok/step": r.get("verify_tokens_per_batch_step"),
              "note": r.get("error") or ""} for r in rows]
    table += [{"mode": f"peer:{p['peer']}", "load": "conc=1" if "conc" in p else "-",
               "ok": (f"{p.get('num_requests', 0) - p.get('num_errors', 0)}/"
                      f"{p.get('num_requests', 0)}" if "num_requests" in p else "-"),
               "out_tok_s": p.get("output_tok_s"), "per_user_tok_s": p.get("per_user_tok_s"),
               "p50_lat_s": p.get("latency_p50_s"), "note": p.get("error") or ""}
              for p in peers]
    log(format_table(table, ROW_COLUMNS,
                     f"serving: {len(cfg.items)} requests/level, max_new_tokens="
                     f"{cfg.max_new_tokens}, T={cfg.temperature}, api={cfg.api}"))
    ok_peers = [p for p in peers if not p.get("error")]
    ratios = peer_ratios(rows, ok_peers)
    if ratios and ok_peers:
        log(format_table(ratios, list(ratios[0].keys()), "ours / peer (per-user tokens/s)"))
    goals = check_goals(rows, peers)
    log(format_table(goals, ["goal", "at", "target", "measured", "met"], "goals"))
    return {"benchmark": "bench_serving", "machine": machine_info(),
            "config": {k: v for k, v in vars(cfg).items() if k not in ("items", "levels")}
            | {"levels": [vars(lv) for lv in cfg.levels], "num_prompts": len(cfg.items),
               "domains": sorted({it.domain for it in cfg.items})},
            "results": rows, "peers": peers, "peer_ratios": ratios, "goals": goals}
