"""CPU kernels in C++ (``csrc/``): paged decode/verify attention, few-row GGUF matmuls and the
small fused per-layer ops of a decode step (RMSNorm, q/k/v split + rotary + KV store, SiLU*mul).

The extension is compiled with ``torch.utils.cpp_extension`` on first use, for the instruction
set of the machine it runs on (AVX-512 when the CPU has avx512f/bw/vl, else AVX2+FMA, else plain
C++), and cached under ``$DSPARK_CACHE_DIR`` (default ``~/.cache/dspark_sglang``) in a folder
named after that instruction set and the torch version, so a cache shared between machines never
loads code built for another CPU. When it cannot be built (no compiler, no headers) or
``DSPARK_CPU_KERNELS=0`` is set, :func:`load_cpu_ops` returns None and callers keep their torch
paths. Each wrapper here has a torch reference with the same signature (``*_ref``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("cpu_ops.cpp", "decoder_stack.h", "gguf_matmul.h", "gguf_q8.h", "layer_ops.h",
           "paged_attention.h", "simd.h")
GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
# ggml type id -> (weights per block, bytes per block)
GGML_BLOCKS = {2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 14: (256, 210)}
MAX_MATMUL_ROWS = 64


@functools.cache
def cpu_isa() -> str:
    """``avx512amx``, ``avx512vnni``, ``avx512``, ``avx2`` or ``scalar``: the widest instruction
    set the kernels use here (``avx512amx``: VNNI plus the AMX tile unit for Q8 matmuls)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "scalar"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        if "avx512_vnni" not in flags:
            return "avx512"
        return "avx512amx" if {"amx_tile", "amx_int8"} <= flags else "avx512vnni"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"


_ISA_FLAGS = {
    "avx512amx": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                  "-mavx512dq", "-mavx512vnni", "-mamx-tile", "-mamx-int8"],
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                   "-mavx512dq", "-mavx512vnni"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}


# no floating-point contraction: gcc would otherwise fuse a * b + c into an FMA in some inlined
# copies of a scalar expression and not in others, and a row's result would depend on the tile
# shape (the number of rows in the call)
_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")


def _cache_root() -> Path:
    env = os.environ.get("DSPARK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dspark_sglang"


def kernels_enabled() -> bool:
    return os.environ.get("DSPARK_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off")


STALE_LOCK_SECONDS = 600.0  # a build takes ~1.5 min on 2 busy cores


def clear_stale_build_lock(build_dir: Path, max_age_s: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s``.

    torch's extension builder holds that file while it compiles and waits, without limit, for it
    to vanish; a build killed mid-way leaves it behind and every later start would hang. A
    lock older than any real build is such a leftover. Returns True when one was removed."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    logger.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def _build(isa: str) -> ModuleType | None:
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join([*_CFLAGS, *_ISA_FLAGS[isa]]).encode())
    tag = f"{isa}_{torch.__version__.replace('+', '_').replace('.', '_')}"
    name = f"dspark_cpu_ops_{tag}_{digest.hexdigest()[:10]}"
    build_dir = _cache_root() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_build_lock(build_dir)
    try:
        return cpp_extension.load(
            name=name, sources=[str(CSRC / "cpu_ops.cpp")], build_directory=str(build_dir),
            extra_cflags=[*_CFLAGS, *_ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)], verbose=False)
    except Exception as e:  # any build failure means: use the torch paths
        logger.warning("CPU kernels could not be built (%s: %s); using torch paths",
                       type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None


def load_cpu_ops() -> ModuleType | None:
    """The compiled extension (built on first call, then cached), or None when unavailable."""
    if not kernels_enabled():
        return None
    isa = cpu_isa()
    ops = _build(isa)
    if ops is None and isa == "avx512amx":  # (a compiler without the AMX intrinsics)
        ops = _build("avx512vnni")
    return ops


# ------------------------------------------------------------------------------ GGUF matmul


def gguf_row_bytes(ggml_type: int, k: int) -> int:
    elems, nbytes = GGML_BLOCKS[ggml_type]
    if k % elems:
        raise ValueError(f"K={k} is not a multiple of the block size {elems}")
    return k // elems * nbytes


def gguf_dequantize_ref(w: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """w [N, row_bytes] uint8 -> [N, k] float32, with the ``gguf`` package's reference code."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = dequantize(w.numpy(), GGMLQuantizationType(ggml_type)).reshape(w.shape[0], k)
    return torch.from_numpy(np.array(out, dtype=np.float32))


def _gguf_call(kernel: str, x: torch.Tensor, w: torch.Tensor, ggml_type: int,
               out: torch.Tensor | None, col0: int) -> torch.Tensor:
    ops = load_cpu_ops()
    if ops is None:
        raise RuntimeError("dspark CPU kernels are unavailable")
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        col0 = 0
    getattr(ops, kernel)(x, w, ggml_type, out, col0)
    return out


def gguf_matmul(x: torch.Tensor, w: torch.Tensor, ggml_type: int, out: torch.Tensor | None = None,
                col0: int = 0) -> torch.Tensor:
    """``x @ dequant(w).T`` written to ``out[:, col0:col0 + N]`` (a new [M, N] when out is None).

    x [M, K] float32 (M <= 64), w [N, row_bytes] uint8 in GGUF ``ggml_type`` layout. Needs the
    extension (raise RuntimeError when it is missing; callers check :func:`load_cpu_ops`).
    """
    return _gguf_call("gguf_matmul", x, w, ggml_type, out, col0)


def gguf_matmul_ref(x: torch.Tensor, w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    return x @ gguf_dequantize_ref(w, ggml_type, x.shape[1]).t()


Q8_TYPES = (2, 3, 8)  # Q4_0, Q4_1, Q8_0: the formats gguf_matmul_q8 takes


def quantize_rows_q8_ref(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 -> its Q8 blocks of 32 dequantised (d = amax / 127, q = round-half-even
    (x * (1 / d))), computed as the kernel does, in float32."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return ((xb * inv).round() * d).reshape(m, k)


def gguf_repack_q8(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """GGUF rows w [N, row_bytes] (Q4_0 / Q4_1 / Q8_0) -> the repacked layout the Q8 kernel reads
    (same shape; ``dspark_kernels/csrc/gguf_q8.h`` describes it). Done once per weight at load."""
    return _ops().gguf_repack_q8(w.contiguous(), ggml_type)


def gguf_matmul_q8(x: torch.Tensor, w: torch.Tensor, ggml_type: int,
                   out: torch.Tensor | None = None, col0: int = 0,
                   packed: bool = False) -> torch.Tensor:
    """:func:`gguf_matmul` with x quantised per row to Q8 blocks (Q4_0 / Q4_1 / Q8_0 weights):
    ``quantize_rows_q8_ref(x) @ dequant(w).T`` to float rounding. ``w`` is in the file's layout
    (repacked here) unless ``packed`` (from :func:`gguf_repack_q8`)."""
    if not packed:
        w = gguf_repack_q8(w, ggml_type)
    return _gguf_call("gguf_matmul_q8", x, w, ggml_type, out, col0)


def gguf_matmul_q8_ref(x: torch.Tensor, w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """float64 reference of :func:`gguf_matmul_q8`."""
    xq = quantize_rows_q8_ref(x).double()
    return (xq @ gguf_dequantize_ref(w, ggml_type, x.shape[1]).double().t()).float()


# ------------------------------------------------------------------------- paged attention


def paged_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, ext_lens: torch.Tensor,
    q_start: torch.Tensor, mask_flat: torch.Tensor, mask_offsets: torch.Tensor, sm_scale: float,
) -> torch.Tensor:
    """Attention of each request's new tokens over its slots, read in place from the pool.

    q [T, H, D]; k_buf, v_buf [S, KVH, D]; req_to_token [R, C] int64; per request (int64 [bs]):
    req_pool_indices, seq_lens (prefix + new), ext_lens (new), q_start (first row in q);
    mask_flat uint8: row-major ``[e, e]`` visibility among the new tokens for requests whose
    mask_offsets entry is >= 0 (an offset into mask_flat), causal for -1. All float32 on CPU.
    Returns [T, H, D].
    """
    ops = load_cpu_ops()
    if ops is None:
        raise RuntimeError("dspark CPU kernels are unavailable")
    out = torch.empty_like(q)
    ops.paged_attention(q.contiguous(), k_buf, v_buf, req_to_token, req_pool_indices, seq_lens,
                        ext_lens, q_start, mask_flat, mask_offsets, float(sm_scale), out)
    return out


# ----------------------------------------------------------------------- fused layer ops


def _ops() -> ModuleType:
    ops = load_cpu_ops()
    if ops is None:
        raise RuntimeError("dspark CPU kernels are unavailable")
    return ops


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of x [..., d] float32 RMS-normalised, times w [d] (HF RMSNorm in float32)."""
    return _ops().rms_norm(x.contiguous(), w.contiguous(), float(eps))


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)


def qkv_rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                   k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor,
                   num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """qkv [n, (H + 2 KV) d] (q, k, v heads) -> q [n, H, d] after optional per-head RMSNorm
    (``q_norm`` / ``k_norm`` weights [d]) and rotary embedding (cos, sin [n, d]); k (normed,
    rotated) and v are written to ``k_buf[loc]`` / ``v_buf[loc]`` ([slots, KV, d])."""
    none = torch.empty(0)
    return _ops().qkv_rope_store(
        qkv.contiguous(), cos.reshape(qkv.shape[0], -1).contiguous(),
        sin.reshape(qkv.shape[0], -1).contiguous(),
        none if q_norm is None else q_norm.contiguous(),
        none if k_norm is None else k_norm.contiguous(), float(eps), k_buf, v_buf,
        loc.to(torch.int64).contiguous(), int(num_heads), int(num_kv_heads))


def qkv_rope_store_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                       k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor,
                       num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """torch reference of :func:`qkv_rope_store` (the model's unfused code path)."""
    from dspark_sglang.layers.rotary import apply_rotary

    n, d = qkv.shape[0], k_buf.shape[-1]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k = q.reshape(n, num_heads, d), k.reshape(n, num_kv_heads, d)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    c, s = cos.reshape(n, 1, d), sin.reshape(n, 1, d)
    q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
    k_buf[loc] = k
    v_buf[loc] = v.reshape(n, num_kv_heads, d)
    return q


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [n, 2 I] = [gate | up] -> silu(gate) * up [n, I]."""
    return _ops().silu_mul(gu.contiguous())


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
