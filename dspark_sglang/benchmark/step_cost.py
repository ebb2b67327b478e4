"""Where a decode step's time goes, what a verify of k tokens costs, and the weight bandwidth a
step achieves (``python -m dspark_sglang.bench_step``).

For each ``--quantization`` the engine (plain decoding, ``NONE``) generates ``steps`` tokens for
``batch_size`` requests of ``prompt_len`` tokens. Everything is measured on the engine's own
scheduler thread, by wrapping the engine's objects (nothing global is patched):

- **step**: wall time of one scheduler step while every request decodes (median);
- **forward**: the target forward inside it (``runner.forward``); the rest of the step is the
  scheduler, sampling, logits processing and KV bookkeeping;
- every ``nn.Linear`` of the target (the LM head included; GGUF block kernel or float32) and
  the attention backend's ``forward`` / ``paged_forward`` (the kernel the fused layer path
  calls) are timed too, and a C++ ``DecoderStack`` (all layers in one call) times its own
  matmuls and attention calls: **matmul**, **attention**; the forward's rest is **other ops**
  (norms, rotary, elementwise, KV writes, Python) and the step's rest outside the forward is
  the scheduler, sampling, logits processing and Python;
  **overhead** = step - matmul - attention, as a share of the step (goal: <= 25 % at batch 1);
- **weight bandwidth**: bytes of weights one step reads (per layer: the GGUF blocks where the
  block kernel runs at this row count, else float32) over the matmul time and over the step,
  against this machine's copy (read + write) and read bandwidth measured here;
- **verify cost**: target forwards of 1, 2, 4, 8 tokens of one request (the SPS profile's own
  ``measure_sps``), as a ratio to the 1-token forward (goal: 8 tokens <= 1.3x).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dspark_sglang.benchmark.report import error_text, format_table, machine_info
from dspark_sglang.benchmark.step_timer import time_calls


@dataclass
class StepCostConfig:
    model_path: str | None = None
    quantizations: list[str] = field(default_factory=lambda: ["none", "gguf"])
    attention_backend: str = "auto"
    batch_size: int = 1
    prompt_len: int = 128
    steps: int = 48
    verify_tokens: tuple[int, ...] = (1, 2, 4, 8)
    num_threads: int | None = None


def machine_bandwidth(mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """GB/s of a ``mib``-MiB tensor copy (bytes read + written) and of a read-only sum."""
    src = torch.empty(mib << 20, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    f32 = src.view(torch.float32)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = src.numel()
    return {"copy_gb_s": 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9,
            "read_gb_s": nbytes / best(lambda: f32.sum()) / 1e9}


def weight_bytes_per_step(model: torch.nn.Module, rows: int) -> int:
    """Bytes of linear weights one forward of ``rows`` token rows reads (embedding lookups
    excluded): GGUF blocks where a layer's block kernel runs at ``rows``, else its float
    weight. A weight shared by two modules (tied LM head) counts once per use."""
    total = 0
    for mod in model.modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        parts = getattr(mod, "parts", None)
        if parts is not None and 0 < rows <= int(getattr(mod, "max_quant_rows", 0)):
            total += int(mod.quant_bytes())  # type: ignore[operator]
        else:
            total += mod.weight.numel() * mod.weight.element_size()
    return total


class _SchedulerProbe:
    """Wraps ``scheduler.step``, ``runner.forward``, the attention backend's ``forward`` and every
    ``nn.Linear.forward`` of one engine (instance attributes, timed on its scheduler thread):
    per-step wall times and their parts, and a hook to run a function on the scheduler thread."""

    def __init__(self, parts: Any, batch: int) -> None:
        self.batch = batch
        self.record = False
        self.rows: list[dict[str, float]] = []  # per decode step: step/forward/matmul/attention
        self._acc = {"forward": 0.0, "matmul": 0.0, "attention": 0.0}
        self.pending: Callable[[], Any] | None = None
        self.pending_result: Any = None
        self.pending_done = threading.Event()
        sched, runner = parts.scheduler, parts.runner
        inner_step = sched.step

        def timed(obj: Any, name: str, key: str) -> None:
            time_calls(obj, name, lambda seconds: self._acc.__setitem__(
                key, self._acc[key] + seconds))

        def step(*a: Any, **kw: Any) -> Any:
            if self.pending is not None:
                fn, self.pending = self.pending, None
                try:
                    self.pending_result = fn()
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    self.pending_result = e
                self.pending_done.set()
            decoding = (self.record and len(sched.running) == self.batch and not sched.waiting
                        and not sched.prefilling)
            for k in self._acc:
                self._acc[k] = 0.0
            for st in self._stacks.values():
                st.take_times()
            t0 = time.perf_counter()
            out = inner_step(*a, **kw)
            dt = time.perf_counter() - t0
            for st in self._stacks.values():  # the C++ decoder stack times its own parts
                matmul_s, attention_s, _ = st.take_times()
                self._acc["matmul"] += matmul_s
                self._acc["attention"] += attention_s
            if decoding:
                self.rows.append({"step": dt, **self._acc})
            return out

        sched.step = step
        timed(runner, "forward", "forward")
        # attention: the backend's forward, and its paged_forward that the fused layer path
        # calls directly (a call nested in a timed one is not counted twice)
        in_attention = [False]

        def timed_attention(name: str) -> None:
            inner = getattr(runner.attn, name)

            def wrapper(*a: Any, **kw: Any) -> Any:
                if in_attention[0]:
                    return inner(*a, **kw)
                in_attention[0] = True
                t0 = time.perf_counter()
                try:
                    return inner(*a, **kw)
                finally:
                    in_attention[0] = False
                    self._acc["attention"] += time.perf_counter() - t0

            setattr(runner.attn, name, wrapper)

        for name in ("forward", "paged_forward"):
            if hasattr(runner.attn, name):
                timed_attention(name)
        for mod in runner.model.modules():
            if isinstance(mod, torch.nn.Linear):
                timed(mod, "forward", "matmul")
        # a model whose layers run as one C++ DecoderStack (models/llama.py): profile it
        self._stacks: dict[int, Any] = {}
        model = runner.model
        if hasattr(model, "_decoder_stack"):
            inner_stack = model._decoder_stack

            def stack(*a: Any, **kw: Any) -> Any:
                st = inner_stack(*a, **kw)
                if st is not None and id(st) not in self._stacks:
                    st.set_profile(True)
                    self._stacks[id(st)] = st
                return st

            model._decoder_stack = stack

    def run_on_scheduler(self, engine: Any, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler thread (before the step a 1-token request triggers)."""
        self.pending_done.clear()
        self.pending = fn
        engine.generate(input_ids=[[1, 2, 3]], sampling_params={"max_new_tokens": 1})
        self.pending_done.wait(timeout=600)
        if isinstance(self.pending_result, Exception):
            raise self.pending_result
        return self.pending_result

    def median_ms(self) -> dict[str, float]:
        if not self.rows:
            raise RuntimeError(
                f"no step had all {self.batch} requests decoding (the first ones finished "
                "while the last ones were still prefilling): raise --steps")
        return {k: statistics.median(r[k] for r in self.rows) * 1e3 for k in self.rows[0]}


def measure_config(cfg: StepCostConfig, quantization: str) -> dict[str, Any]:
    from dspark_sglang.benchmark.offline import make_prompt_ids
    from dspark_sglang.entrypoints.engine import Engine
    from dspark_sglang.speculative.sps_runtime import measure_sps

    b = cfg.batch_size
    engine = Engine(cfg.model_path, dtype="float32", quantization=quantization,
                    attention_backend=cfg.attention_backend, num_threads=cfg.num_threads,
                    disable_radix_cache=True, max_running_requests=max(b, 1),
                    max_total_tokens=max(8192, b * (cfg.prompt_len + cfg.steps + 64) + 512))
    try:
        parts = engine.parts
        probe = _SchedulerProbe(parts, b)
        prompts = make_prompt_ids(engine.tokenizer, b, cfg.prompt_len, parts.vocab_size)
        sp = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        engine.generate(input_ids=prompts, sampling_params=sp)  # warm-up
        probe.record = True
        engine.generate(input_ids=prompts, sampling_params={**sp, "max_new_tokens": cfg.steps})
        probe.record = False
        med = probe.median_ms()
        step, fwd = med["step"], med["forward"]
        matmul, attention = med["matmul"], med["attention"]
        sps = probe.run_on_scheduler(engine, lambda: measure_sps(
            parts.runner, parts.cache, tuple(cfg.verify_tokens), repeats=5))
        wbytes = weight_bytes_per_step(parts.runner.model, b)
        row: dict[str, Any] = {
            "quantization": quantization, "attention": parts.runner.attention_backend,
            "batch": b, "step_ms": step, "forward_ms": fwd, "outside_forward_ms": step - fwd,
            "matmul_ms": matmul, "attention_ms": attention,
            "other_ops_ms": fwd - matmul - attention,
            "overhead_share": (step - matmul - attention) / step if step else None,
            "weight_mb_per_step": wbytes / 1e6,
            "weight_gb_s_matmul": wbytes / (matmul / 1e3) / 1e9 if matmul else None,
            "weight_gb_s_step": wbytes / (step / 1e3) / 1e9 if step else None,
        }
        base = None
        for k in cfg.verify_tokens:
            ms = 1e3 / sps.sps(k)
            base = base or ms
            row[f"verify{k}_ms"] = ms
            row[f"verify{k}/verify1"] = ms / base
        return row
    finally:
        engine.shutdown()
        gc.collect()


def _in_own_thread(fn: Any) -> Any:
    """``fn()`` on a short-lived thread: its OpenMP worker team ends with it. A team left on
    this (main) thread would make the engine's scheduler-thread team sleep between kernels
    (entrypoints/engine.py) and every step measured after it ~2x slow."""
    import threading

    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), name="bench-step-bandwidth")
    t.start()
    t.join()
    return out[0]


def run_step_cost(cfg: StepCostConfig, log: Any = print) -> dict[str, Any]:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    bw = _in_own_thread(machine_bandwidth)
    rows = []
    for q in cfg.quantizations:
        log(f"[bench_step] quantization={q} batch={cfg.batch_size} ...")
        try:
            rows.append(measure_config(cfg, q))
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            rows.append({"quantization": q, "error": error_text(e)})
    for r in rows:
        if r.get("weight_gb_s_matmul"):
            r["matmul_bw/copy_bw"] = r["weight_gb_s_matmul"] / bw["copy_gb_s"]
    log(format_table(rows, ["quantization", "attention", "batch", "step_ms", "forward_ms",
                            "matmul_ms", "attention_ms", "other_ops_ms", "outside_forward_ms",
                            "overhead_share", "error"],
                     f"one decode step, batch {cfg.batch_size}, {cfg.prompt_len}-token prompts "
                     "(ms; overhead = step - matmul - attention)"))
    log(format_table(rows, ["quantization", "weight_mb_per_step", "weight_gb_s_matmul",
                            "weight_gb_s_step", "matmul_bw/copy_bw"],
                     f"weight bandwidth (machine: copy {bw['copy_gb_s']:.1f} GB/s read+write, "
                     f"read {bw['read_gb_s']:.1f} GB/s)"))
    vcols = ["quantization"] + [f"verify{k}_ms" for k in cfg.verify_tokens] + [
        f"verify{k}/verify1" for k in cfg.verify_tokens[1:]]
    log(format_table(rows, vcols, "target forward of k verify tokens (one request)"))
    return {"benchmark": "bench_step", "machine": machine_info() | {"bandwidth": bw},
            "config": vars(cfg), "results": rows}
