"""Bounded load / soak run: concurrent streams mixed with poison inputs and client disconnects.

    python -m dspark_sglang.benchmark.soak --duration 300 --concurrency 64     # embedded model
    python -m dspark_sglang.benchmark.soak --url http://127.0.0.1:30000 ...     # running server

Without ``--url`` the server runs in this process (``--model-path``, default the embedded model;
``--tiny`` builds a tiny random model), so RSS is the server's. Each worker loops until the
deadline: a good request (greedy, streaming or not), with probability ``--poison-rate`` a bad
input that must get a 4xx, with probability ``--disconnect-rate`` a stream it drops after the
first event. Reports throughput, p50/p99 latency of good requests, unexpected statuses
(``errors``: a good request that is not 200, a poison that is not 4xx, any 5xx), RSS after the
warm-up and at the end, and the KV integrity check after the load drains (no slot in use, no
live rid, free + cached == pool). Exit status 1 if there were errors or the check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

POISON: list[dict[str, Any]] = [
    {"text": "x", "sampling_params": {"top_k": 2**63}},
    {"text": "x", "sampling_params": {"max_new_tokens": 4, "skip_special_tokens": "no"}},
    {"text": "x", "sampling_params": {"seed": 2**64}},
    {"text": "x", "sampling_params": {"regex": "(a{1000}){1000}"}},
    {"text": ["a", "b", "c"], "sampling_params": [{}]},
    {"text": "x", "sampling_params": {"json_schema": "{not json"}},
    {"text": "x", "sampling_params": {"max_new_tokens": -1}},
    {"text": "x", "sampling_params": {"temperature": "hot"}},
    {"text": "", "sampling_params": {"max_new_tokens": 2}},
    {"text": "a\ud800b"},
]
WORDS = ("alpha beta gamma delta tokens stream latency cache prefix speculative draft verify "
         "json schema regex the a of and to in").split()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    good: int = 0
    poison: int = 0
    disconnects: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(what)
            else:
                self.errors[-1] = f"... {what}"


def _worker(url: str, deadline: float, seed: int, args: argparse.Namespace, t: Tally) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    while time.monotonic() < deadline:
        u = rng.random()
        try:
            if u < args.poison_rate:
                body = json.dumps(rng.choice(POISON)).encode()
                r = session.post(url + "/generate", data=body, timeout=120,
                                 headers={"Content-Type": "application/json"})
                if not 400 <= r.status_code < 500:
                    t.error(f"poison -> {r.status_code}: {r.text[:120]}")
                with t.lock:
                    t.poison += 1
                continue
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, args.max_words)))
            sp = {"max_new_tokens": rng.randint(8, args.max_new_tokens), "temperature": 0,
                  "ignore_eos": True}
            if u < args.poison_rate + args.disconnect_rate:
                r = session.post(url + "/generate", json={"text": prompt, "stream": True,
                                                          "sampling_params": sp},
                                 stream=True, timeout=120)
                next(r.iter_lines(), None)
                r.close()
                with t.lock:
                    t.disconnects += 1
                continue
            stream = rng.random() < 0.5
            t0 = time.monotonic()
            r = session.post(url + "/generate", json={"text": prompt, "stream": stream,
                                                      "sampling_params": sp},
                             stream=stream, timeout=300)
            if r.status_code != 200:
                t.error(f"good -> {r.status_code}: {r.text[:120]}")
                continue
            if stream:
                last = None
                for line in r.iter_lines():
                    if line.startswith(b"data: {"):
                        last = json.loads(line[6:])
                out = last
            else:
                out = r.json()
            dt = time.monotonic() - t0
            n = out["meta_info"]["completion_tokens"] if out else 0
            if n != sp["max_new_tokens"]:
                t.error(f"good request got {n} of {sp['max_new_tokens']} tokens")
            with t.lock:
                t.latencies.append(dt)
                t.tokens += n
                t.good += 1
        except requests.RequestException as e:
            t.error(f"{type(e).__name__}: {e}"[:160])


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _integrity(url: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = requests.get(url + "/debug/check_integrity", timeout=60).json()
        clean = info.get("ok") and info["in_use"] == 0 and info["live_rids"] == 0
        if clean or time.monotonic() > deadline:
            info["clean"] = bool(clean and info["free"] + info["cached"] == info["size"])
            return info
        time.sleep(0.2)


def run_soak(url: str, args: argparse.Namespace, local: bool) -> dict[str, Any]:
    t = Tally()
    warm = min(args.warmup, args.duration / 4)
    start = time.monotonic()
    deadline = start + args.duration
    threads = [threading.Thread(target=_worker, args=(url, deadline, 1000 + i, args, t),
                                daemon=True) for i in range(args.concurrency)]
    for th in threads:
        th.start()
    time.sleep(warm)
    rss_start = _rss_mb() if local else None
    base_good, base_tokens = t.good, t.tokens
    for th in threads:
        th.join()
    elapsed = time.monotonic() - start - warm
    integrity = _integrity(url)
    rss_end = _rss_mb() if local else None
    lat = t.latencies
    return {
        "duration_s": args.duration, "concurrency": args.concurrency,
        "good_requests": t.good, "poison_requests": t.poison, "disconnects": t.disconnects,
        "requests_per_s": (t.good - base_good) / elapsed if elapsed > 0 else 0.0,
        "output_tokens_per_s": (t.tokens - base_tokens) / elapsed if elapsed > 0 else 0.0,
        "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99),
        "errors": len(t.errors), "error_samples": t.errors[:10],
        "rss_start_mb": rss_start, "rss_end_mb": rss_end,
        "rss_growth_pct": (100 * (rss_end - rss_start) / rss_start
                           if rss_start and rss_end else None),
        "kv_integrity": integrity,
    }


def _print(rep: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in rep.items() if k not in ("error_samples", "kv_integrity")]
    rows.append(("kv_clean", rep["kv_integrity"].get("clean")))
    rows.append(("kv_free/cached/in_use/size", "/".join(
        str(rep["kv_integrity"].get(k)) for k in ("free", "cached", "in_use", "size"))))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v:.3f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    for e in rep["error_samples"]:
        print("  error:", e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_sglang.benchmark.soak")
    p.add_argument("--url", default=None, help="soak a running server instead of one in-process")
    p.add_argument("--model-path", default=None, help="in-process server model (default: "
                                                      "the embedded model)")
    p.add_argument("--tiny", action="store_true", help="in-process tiny random model")
    p.add_argument("--speculative-algorithm", default="NONE")
    p.add_argument("--max-total-tokens", type=int, default=65536)
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before RSS start")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--disconnect-rate", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-words", type=int, default=60)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    server = engine = None
    url = args.url
    if url is None:
        from dspark_sglang.entrypoints.engine import Engine
        from dspark_sglang.entrypoints.http_server import BackgroundServer
        from dspark_sglang.server_args import ServerArgs

        model = args.model_path
        if args.tiny:
            from dspark_sglang.benchmark.tiny_model import make_tiny_model

            model = tempfile.mkdtemp(prefix="soak_tiny_")
            make_tiny_model(model, seed=3)
        sa = ServerArgs(model_path=model, port=_free_port(), dtype="float32",
                        max_total_tokens=args.max_total_tokens,
                        max_running_requests=args.max_running_requests,
                        speculative_algorithm=args.speculative_algorithm,
                        log_level="warning")
        engine = Engine(server_args=sa)
        server = BackgroundServer(engine, sa)
        url = server.url
    try:
        rep = run_soak(url, args, local=engine is not None)
    finally:
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown()
    _print(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["errors"] == 0 and rep["kv_integrity"].get("clean") else 1


if __name__ == "__main__":
    sys.exit(main())
