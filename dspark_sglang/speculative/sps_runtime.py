"""Profile SPS(B) — target forward steps per second at B verify tokens — on the live engine.

The table is measured once at engine start (or loaded from ``--speculative-dspark-sps-table-path``)
and cached on disk keyed by model, dtype, device and thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from dspark_sglang.core.forward_batch import ForwardMode
from dspark_sglang.mem_cache.cache_manager import CacheManager
from dspark_sglang.model_executor.model_runner import (
    BatchRequestSpec,
    ModelRunner,
    build_forward_batch,
)
from dspark_sglang.speculative.sps_profile import SPSTable, profile_sps

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_CTX_PER_REQ = 128
_TOKENS_PER_REQ = 8  # a verify batch is many short chains: bs = ceil(B / 8)
# bumped when how the engine runs its forwards changes their cost (2: the model is loaded and
# run on the scheduler thread, one OpenMP team: earlier tables were measured 2x slower) or how
# they are timed (3: rounds over the token counts, so a burst of load skews no single count)
PROFILE_VERSION = 4  # 4: timed calls primed (profile_sps); CPU model in the key


def _cpu_model() -> str:
    """The CPU's model name (a table profiled on one CPU type is not reused on another: the
    machine under a session can change)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _sps_cache_path(model_path: str, runner: ModelRunner) -> Path:
    from dspark_sglang.layers import linear
    from dspark_sglang.models.loader import default_cache_root

    # the forward's cost depends on the matmul path too: a change there invalidates the profile
    # ... and so do GGUF block kernels (--quantization gguf): their per-shape choice and kind
    quant = sorted({(type(m).__name__, getattr(m, "max_quant_rows", None),
                     getattr(m, "act_q8", None)) for m in runner.model.modules()
                    if hasattr(m, "quant_forward")}, key=str)
    # ... and the C++ kernels' build (its name carries the ISA and a digest of the sources):
    # a faster kernel makes the old table overprice verification
    from dspark_kernels.cpu_ops import load_cpu_ops

    ops = load_cpu_ops() if runner.device == "cpu" else None
    key = json.dumps([model_path, str(runner.dtype), runner.device, torch.get_num_threads(),
                      _cpu_model(),
                      runner.attn.__class__.__name__, "small-rows-linear", linear.SMALL_ROWS,
                      quant, "profile-version", PROFILE_VERSION,
                      getattr(ops, "__name__", None)], default=str)
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_root() / "sps" / f"{h}.json"


def measure_sps(runner: ModelRunner, cache: CacheManager,
                token_counts: tuple[int, ...] = DEFAULT_TOKEN_COUNTS,
                repeats: int = 3) -> SPSTable:
    """Time target forwards of B new tokens (over a short context per request).

    Borrows slots and rows from the cache manager and gives all of them back."""
    avail = cache.allocator.available_size()
    counts = tuple(b for b in token_counts if b <= avail // 4) or (1,)
    n_req = min(math.ceil(max(counts) / _TOKENS_PER_REQ), cache.req_to_token_pool.available_size())
    ctx = max(0, min(_CTX_PER_REQ, avail // n_req - _TOKENS_PER_REQ))
    per = ctx + _TOKENS_PER_REQ
    counts = tuple(b for b in counts if b <= n_req * _TOKENS_PER_REQ)
    rows = [cache.req_to_token_pool.alloc() for _ in range(n_req)]
    slots = cache.allocator.alloc(n_req * per)
    assert slots is not None and all(r is not None for r in rows)
    try:
        for i, row in enumerate(rows):
            cache.req_to_token_pool.write(row, 0, slots[i * per : (i + 1) * per])

        def step(b: int) -> None:
            specs = []
            left, i = b, 0
            while left > 0:
                n = min(left, _TOKENS_PER_REQ)
                row = rows[i]
                loc = cache.req_to_token[row, ctx : ctx + n]
                specs.append(BatchRequestSpec(row, [0] * n, ctx, loc))
                left -= n
                i += 1
            fb = build_forward_batch(ForwardMode.TARGET_VERIFY, specs, cache.req_to_token)
            runner.forward(fb)
            if runner.device == "cuda":
                torch.cuda.synchronize()

        return profile_sps(step, counts, repeats=repeats, warmup=1)
    finally:
        cache.allocator.free(slots)
        for r in rows:
            cache.req_to_token_pool.free(r)


# a cached table is kept while a spot check at these token counts (a few forwards, ~0.1 s at
# start) is within this factor of it either way: a table profiled while another process loaded
# the machine (seen: 6.7 steps/s flat from 1 to 96 tokens, against ~230 at 1 token idle) tells
# the scheduler that long verifies are free, and would be kept forever
SPOT_CHECK_COUNTS = (1, 8)
SPOT_CHECK_FACTOR = 2.0


def cached_table_holds(table: SPSTable, runner: ModelRunner, cache: CacheManager) -> bool:
    """Whether ``table`` agrees with a spot measurement at ``SPOT_CHECK_COUNTS`` (within
    ``SPOT_CHECK_FACTOR``, or the counts the spot check could run)."""
    spot = measure_sps(runner, cache, SPOT_CHECK_COUNTS, repeats=2)
    for b, measured in zip(spot.token_counts, spot.sps_values):
        ratio = measured / max(table.sps(b), 1e-9)
        if not 1 / SPOT_CHECK_FACTOR <= ratio <= SPOT_CHECK_FACTOR:
            return False
    return True


def load_or_profile_sps(path: str | None, model_path: str, runner: ModelRunner,
                        cache: CacheManager) -> SPSTable:
    if path:
        return SPSTable.load(path)
    cached = _sps_cache_path(model_path, runner)
    if cached.is_file():
        try:
            table = SPSTable.load(cached)
        except Exception:  # corrupt cache: re-profile
            logger.warning("ignoring unreadable SPS cache %s", cached)
        else:
            if cached_table_holds(table, runner, cache):
                return table
            logger.warning("the cached SPS table %s is off from this machine now: re-profiling",
                           cached)
    table = measure_sps(runner, cache)
    cached.parent.mkdir(parents=True, exist_ok=True)
    table.save(cached)
    logger.info("profiled SPS table -> %s", cached)
    return table
