"""Where a target forward of k tokens goes (one request, 128 tokens of context, the SPS
profile's forwards): the C++ decoder stack's matmuls / attention / other ops, the LM head, and
the forward as a whole, for k = 1, 2, 4, 8, 16 (median of 15 forwards, second of two passes).

    python docs/bench/s21_probes/verify_split.py
    AMXR=8 AMXALL=1 python docs/bench/s21_probes/verify_split.py   # the tile unit for Q4_1 too
"""

import os
import statistics
import time

from dspark_kernels.cpu_ops import load_cpu_ops
from dspark_sglang.benchmark.step_cost import _SchedulerProbe
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.speculative import sps_runtime

eng = Engine(None, speculative_algorithm="NONE", num_threads=2)
ops = load_cpu_ops()
amx_rows, amx_all = int(os.environ.get("AMXR", "8")), os.environ.get("AMXALL", "0") == "1"
print("AMX from rows", ops.q8_amx_min_rows(amx_rows, all_formats=amx_all), "all formats", amx_all)
parts = eng.parts
runner, cache, model = parts.runner, parts.cache, parts.runner.model


def run() -> dict[int, dict[str, object]]:
    times: dict[str, list[float]] = {}

    def timed(obj, name, key):  # type: ignore[no-untyped-def]
        inner = getattr(obj, name)

        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                times.setdefault(key, []).append(time.perf_counter() - t0)

        setattr(obj, name, wrapper)
        return inner

    head_inner = timed(model.lm_head, "forward", "head")
    fwd_inner = timed(runner, "forward", "fwd")
    out: dict[int, dict[str, object]] = {}
    try:
        for k in (1, 2, 4, 8, 16):
            for _ in range(2):
                times.clear()
                st = model._stack
                if st is not None:
                    st.set_profile(True)
                    st.take_times()
                sps_runtime.measure_sps(runner, cache, (k,), repeats=15)
                parts_s = st.take_times() if st is not None else [0.0, 0.0, 0.0]
                n = len(times["fwd"])
                out[k] = {"fwd": 1e3 * statistics.median(times["fwd"]),
                          "head": 1e3 * statistics.median(times["head"]),
                          "stack": [round(1e3 * t / n, 3) for t in parts_s]}
    finally:
        model.lm_head.forward = head_inner
        runner.forward = fwd_inner
    return out


res = _SchedulerProbe(parts, 1).run_on_scheduler(eng, run)
base = res[1]["fwd"]
for k, v in res.items():
    print(f"k={k:2d} forward {v['fwd']:.2f} ms ({v['fwd'] / base:.2f}x)  head {v['head']:.2f}  "
          f"stack matmul / attention / other {v['stack']}")
eng.shutdown()
