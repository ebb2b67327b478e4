"""Endpoints that ``sglang-router`` (SGLang's Rust router / model gateway) calls on a worker.

Besides ``/health``, ``/generate``, the OpenAI routes and ``/flush_cache`` (served elsewhere), the
router reads, when it registers a worker and while it routes:

- ``GET /server_info``: ``model_path``, ``served_model_name``, ``dp_size``, ``max_total_tokens``,
  ``max_running_requests`` (served by ``native_api``; ``dp_size`` / ``tp_size`` added there from
  here through :func:`parallel_info`);
- ``GET /model_info``: ``model_path``, ``tokenizer_path``, ``is_generation``, ``model_type``,
  ``architectures``;
- ``GET /get_load`` (load-aware policies, ``/get_loads``): a list with one entry per data-parallel
  rank, ``{dp_rank, num_reqs, num_waiting_reqs, num_tokens}``; newer routers try
  ``GET /v1/loads`` first, ``{"loads": [{dp_rank, num_reqs, num_waiting_reqs,
  num_total_tokens}]}``.

Load numbers are read without a round trip through the scheduler thread (plain ``len`` of its
queues and the allocator's free count), so they answer promptly while a long step runs; they are
a hint for routing, not an exact snapshot.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from dspark_sglang.entrypoints.server_state import ServerState


def parallel_info(state: ServerState) -> dict[str, Any]:
    """``dp_size`` (one engine per server: 1) and ``tp_size`` (ranks this engine spans)."""
    return {"dp_size": 1, "tp_size": int(getattr(state.args, "tp_size", 1) or 1)}


def current_load(state: ServerState) -> dict[str, int]:
    """Requests running / waiting and KV slots in use (tokens) of this server's one engine."""
    parts = state.engine.parts
    sched, cache = parts.scheduler, parts.cache
    running = len(sched.running) + len(sched.prefilling)
    waiting = len(sched.waiting) + state.engine._inbox.qsize()
    try:
        tokens = int(cache.allocator.size - cache.allocator.available_size()
                     - cache.tree.total_size())
    except Exception:  # a racy read during a step: report what is known
        tokens = 0
    return {"num_reqs": running + waiting, "num_running_reqs": running,
            "num_waiting_reqs": waiting, "num_tokens": max(tokens, 0)}


def build_router_api(state: ServerState) -> APIRouter:
    router = APIRouter()
    engine = state.engine

    @router.get("/model_info")
    async def model_info() -> dict[str, Any]:
        cfg = engine.parts.config.to_hf_dict()
        return {"model_path": engine.model_path, "tokenizer_path": engine.model_path,
                "served_model_name": state.served_model_name, "is_generation": True,
                "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
                "context_length": engine.context_len}

    @router.get("/get_load")
    async def get_load() -> list[dict[str, int]]:
        return [{"dp_rank": 0, **current_load(state)}]

    @router.get("/v1/loads")
    async def v1_loads() -> dict[str, Any]:
        load = current_load(state)
        return {"loads": [{"dp_rank": 0, "num_total_tokens": load["num_tokens"], **load}]}

    return router
