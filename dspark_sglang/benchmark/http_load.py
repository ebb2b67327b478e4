"""HTTP load generator (aiohttp): closed-loop concurrency or open-loop Poisson request rate.

APIs: ``native`` posts SGLang's ``/generate`` (``meta_info`` gives ``completion_tokens`` and
``spec_verify_ct`` per request, so tau is measured per request and per domain); ``openai`` posts
``/v1/completions`` (``/v1/chat/completions`` with ``response_format`` for JSON-schema tasks) and
reads ``usage``; ``llamacpp`` posts llama-server's ``/completion`` (see
:mod:`dspark_sglang.benchmark.llamacpp_server`). With ``stream`` the native API is read as SSE and
time to first token recorded.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from dspark_sglang.benchmark.metrics import RequestResult
from dspark_sglang.benchmark.workloads import PromptItem

_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class LoadLevel:
    """``kind`` is ``"conc"`` (clients in a closed loop) or ``"rate"`` (Poisson requests/s)."""

    kind: str
    value: float

    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


async def _post_json(session: Any, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=payload) as resp:
        body = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]}")
        return json.loads(body)


async def _native_stream(session: Any, url: str, payload: dict[str, Any], t0: float
                         ) -> tuple[dict[str, Any], float | None]:
    last: dict[str, Any] = {}
    ttft: float | None = None
    async with session.post(url, json={**payload, "stream": True}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            last = json.loads(data)
            if ttft is None and last.get("text"):
                ttft = time.perf_counter() - t0
    return last, ttft


async def send_request(session: Any, base_url: str, api: str, item: PromptItem, text: str,
                       sp: dict[str, Any], model_name: str, stream: bool
                       ) -> tuple[dict[str, Any], float | None]:
    """One request; returns an SGLang-shaped output dict and the time to first token."""
    t0 = time.perf_counter()
    if api == "native":
        payload = {"text": text, "sampling_params": sp}
        if stream:
            return await _native_stream(session, base_url + "/generate", payload, t0)
        return await _post_json(session, base_url + "/generate", payload), None
    if api == "llamacpp":
        from dspark_sglang.benchmark.llamacpp_server import completion_output, completion_payload

        body = completion_payload(text, sp)
        if item.schema is not None:
            body["json_schema"] = item.schema
        return completion_output(await _post_json(session, base_url + "/completion", body)), None
    common: dict[str, Any] = {"model": model_name, "max_tokens": sp["max_new_tokens"],
                              "temperature": sp.get("temperature", 0.0)}
    if "seed" in sp:
        common["seed"] = sp["seed"]
    if item.schema is not None:
        body = await _post_json(session, base_url + "/v1/chat/completions", {
            **common, "messages": [{"role": "user", "content": item.text}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "task", "schema": item.schema}}})
        out_text = body["choices"][0]["message"]["content"] or ""
    else:
        body = await _post_json(session, base_url + "/v1/completions",
                                {**common, "prompt": text})
        out_text = body["choices"][0]["text"]
    usage = body.get("usage") or {}
    return {"text": out_text,
            "meta_info": {"completion_tokens": int(usage.get("completion_tokens", 0))}}, None


async def run_load(base_url: str, api: str, items: list[PromptItem], texts: list[str],
                   sps: list[dict[str, Any]], level: LoadLevel, model_name: str = "default",
                   stream: bool = False, progress: bool = True, seed: int = 0
                   ) -> tuple[list[RequestResult], float]:
    """Send every prompt once under ``level``; failed requests are kept with their error.

    Returns results in prompt order and the wall time from the first send to the last reply.
    """
    import aiohttp

    if level.kind not in ("conc", "rate") or level.value <= 0:
        raise ValueError(f"bad load level {level}")
    results: list[RequestResult | None] = [None] * len(items)
    bar = _progress(len(items), level.label(), progress)
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                out, ttft = await send_request(session, base_url, api, items[i], texts[i],
                                               sps[i], model_name, stream)
                r = RequestResult.from_output(i, items[i].domain, time.perf_counter() - t0, out)
                r.ttft_s = ttft
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                r = RequestResult(i, items[i].domain, time.perf_counter() - t0,
                                  error=f"error: {type(e).__name__}: {e}"[:200])
            results[i] = r
            if bar is not None:
                bar.update(1)

        start = time.perf_counter()
        if level.kind == "conc":
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(items)):
                queue.put_nowait(i)

            async def client() -> None:
                while not queue.empty():
                    await one(queue.get_nowait())

            await asyncio.gather(*(client() for _ in range(min(int(level.value), len(items)))))
        else:
            rng = random.Random(seed)
            tasks = []
            for i in range(len(items)):
                if i:
                    await asyncio.sleep(rng.expovariate(level.value))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None], wall


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


async def get_json(base_url: str, path: str) -> dict[str, Any]:
    import aiohttp

    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
                session.get(base_url + path) as resp):
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        return await resp.json()
