"""The Q8 kernel on one model-sized pass (30 layers of the embedded model's qkv / o / gate_up /
down shapes, random blocks, 2 threads) at 1-32 rows: the VNNI path against the AMX tile path
(every format), median of 7 passes, the better of two sittings.

    python docs/bench/s21_probes/q8_harness.py Q4_1|Q8_0|Q4_0 [LAYERS]
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from dspark_kernels.cpu_ops import GGML_TYPES, gguf_repack_q8, load_cpu_ops  # noqa: E402
from tests.test_cpu_kernels import random_gguf_rows  # noqa: E402

ops = load_cpu_ops()
torch.set_num_threads(2)
fmt = sys.argv[1] if len(sys.argv) > 1 else "Q4_1"
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 30
t = GGML_TYPES[fmt]
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
weights = [(gguf_repack_q8(random_gguf_rows(t, n, k, seed=4 * li + j), t), n, k)
           for li in range(layers) for j, (n, k) in enumerate(shapes)]
rows = [1, 2, 4, 7, 8, 16, 32]
res: dict[tuple[str, int], list[float]] = {}
before = ops.q8_amx_min_rows(-1)
for mode in ("vnni", "amx", "vnni", "amx"):
    ops.q8_amx_min_rows(0 if mode == "vnni" else 1, all_formats=True)
    for m in rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        outs = {n: torch.empty(m, n) for n in (960, 576, 3072)}

        def one_pass(xs: dict = xs, outs: dict = outs) -> None:
            for w, n, k in weights:
                ops.gguf_matmul_q8(xs[k], w, t, outs[n], 0)

        one_pass()
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            one_pass()
            ts.append(time.perf_counter() - t0)
        res.setdefault((mode, m), []).append(1e3 * statistics.median(ts))
ops.q8_amx_min_rows(before)
print(f"{fmt}: ms per model pass")
print("rows  " + "  ".join(f"{m:>6d}" for m in rows))
for mode in ("vnni", "amx"):
    print(f"{mode:5s} " + "  ".join(f"{min(res[(mode, m)]):6.2f}" for m in rows))
