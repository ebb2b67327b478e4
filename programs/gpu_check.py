"""GPU check: kernels, attention backends, engine equality and end-to-end speed, in one table.

Runs on one CUDA device in under 8 minutes (H200), installs nothing, and prints one table:

1. every ``dspark_kernels`` kernel against its torch reference on fresh random inputs, in fp16,
   bf16 and fp32 (outputs pre-filled with NaN where the kernel takes an output buffer, so rows it
   forgets to write show up), head dims 64 / 80 / 128, GQA 1 and 4, causal / chain / tree masks;
2. FlashInfer ``BatchPrefillWithPagedKVCacheWrapper`` with a custom mask (page size 1, page
   indices from ``req_to_token``) against the same reference, when flashinfer imports; the
   verification library (``speculative/verify.py``) on device tensors against its CPU run;
3. the ``triton`` and ``flashinfer`` attention backends (store + attention of one layer, EXTEND /
   DECODE / TARGET_VERIFY with tree masks) against ``torch_native``;
4. greedy output equality on the embedded default model: triton == torch_native (fp32),
   flashinfer vs torch_native (bf16; a mismatch is a WARN), NGRAM and DSPARK == NONE (fp32);
5. verify-attention timing (µs per call, achieved TB/s of KV read, and that as a share of the
   device's measured copy bandwidth), Triton and FlashInfer side by side;
6. end-to-end tokens/s for NONE / MTP1 / DSPARK at concurrency 1 / 16 / 64 in bf16.

Parts 4 and 6 stop starting new engine runs after ``--engine-budget-s`` (SKIP rows). Without CUDA
it prints "no GPU" and exits 0. ``--cpu-smoke`` runs part 1 on CPU through the Triton interpreter
with tiny shapes (a check of this script, not of the GPU). Exit status 1 when a check FAILs or
ERRORs (FlashInfer being absent is a SKIP; WARN does not fail).

    python programs/gpu_check.py [--skip-timing] [--skip-engine] [--flashinfer-all] [--json f]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# max |got - ref| allowed; the reference runs in fp32, outputs are rounded to the input dtype
ATTN_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


@dataclass
class CheckRow:
    check: str
    dtype: str
    config: str
    status: str = "PASS"  # PASS | FAIL | ERROR | SKIP | INFO
    max_err: float | None = None
    tol: float | None = None
    time_us: float | None = None
    tbps: float | None = None
    tok_s: float | None = None
    note: str = ""


def load_kernels() -> ModuleType:
    """``dspark_kernels`` as installed, else the checkout's folder of that name."""
    from dspark_sglang.layers.attention.triton_backend import load_dspark_kernels

    return load_dspark_kernels()


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def guarded(check: str, dtype: str, config: str, fn: Callable[[], CheckRow]) -> CheckRow:
    """Run one check; an exception becomes an ERROR row instead of ending the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the table must report every check
        traceback.print_exc(file=sys.stderr)
        return CheckRow(check, dtype, config, "ERROR", note=f"{type(e).__name__}: {e}"[:120])


def compare(row: CheckRow, got: torch.Tensor, want: torch.Tensor, tol: float) -> CheckRow:
    """Fill ``max_err``/``status``: NaN in ``got`` (an unwritten row) or an error over ``tol``
    fails."""
    row.tol = tol
    if got.isnan().any():
        row.status, row.note = "FAIL", f"{int(got.isnan().sum())} NaN (unwritten?)"
        return row
    row.max_err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    row.status = "PASS" if row.max_err <= tol else "FAIL"
    return row


# ------------------------------------------------------------------------------ kernel checks


def check_verify_attention(
    device: str, dtype: torch.dtype, head_dim: int, group: int, mask_kind: str | None,
    prefix_lens: list[int], ext_lens: list[int], seed: int,
) -> CheckRow:
    from dspark_kernels.testing import make_verify_batch
    from dspark_kernels.verify_attention import verify_attention, verify_attention_ref

    kv_heads = 2
    config = f"d={head_dim} gqa={group} mask={mask_kind} prefix={prefix_lens} ext={ext_lens}"
    batch = make_verify_batch(prefix_lens, ext_lens, kv_heads * group, kv_heads, head_dim, dtype,
                              mask_kind, seed=seed, device=device)
    out = torch.full_like(batch.q, float("nan"))
    got = verify_attention(**batch.kwargs(), out=out)
    want = verify_attention_ref(**batch.kwargs())
    owned = batch.owned_rows()
    row = compare(CheckRow("verify_attention", dtype_name(dtype), config), got[owned],
                  want[owned], ATTN_TOL[dtype])
    if row.status == "PASS" and not got[~owned].isnan().all():
        row.status, row.note = "FAIL", "wrote rows outside the requests"
    return row


def check_kv_store(device: str, dtype: torch.dtype, seed: int) -> CheckRow:
    from dspark_kernels.kv_store import store_kv, store_kv_ref

    gen = torch.Generator().manual_seed(seed)
    n, kv_heads, head_dim, num_slots = 300, 8, 128, 1000
    qkv = torch.randn(n, 3 * kv_heads, head_dim, generator=gen).to(dtype).to(device)
    k, v = qkv[:, kv_heads : 2 * kv_heads], qkv[:, 2 * kv_heads :]  # strided views
    loc = torch.randperm(num_slots, generator=gen)[:n].to(device)
    bufs = [torch.full((num_slots, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
            for _ in range(4)]
    store_kv(bufs[0], bufs[1], loc, k, v)
    store_kv_ref(bufs[2], bufs[3], loc, k, v)
    row = CheckRow("store_kv", dtype_name(dtype), f"n={n} kv_heads={kv_heads} d={head_dim}")
    row = compare(row, torch.stack([bufs[0][loc], bufs[1][loc]]),
                  torch.stack([bufs[2][loc], bufs[3][loc]]), 0.0)
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[loc] = False
    if row.status == "PASS" and not bufs[0][untouched].isnan().all():
        row.status, row.note = "FAIL", "wrote slots outside loc"
    return row


def check_bitmask(device: str, dtype: torch.dtype, seed: int) -> CheckRow:
    from dspark_kernels.bitmask import apply_token_bitmask_inplace, apply_token_bitmask_inplace_ref

    gen = torch.Generator().manual_seed(seed)
    n, vocab = 17, 151_936
    words = (vocab + 31) // 32 - 3  # a mask narrower than the logits: the tail is disallowed
    bitmask = torch.randint(-(2**31), 2**31, (n, words), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32).to(device)
    logits = torch.randn(n, vocab, generator=gen).to(dtype).to(device)
    got, want = logits.clone(), logits.clone()
    apply_token_bitmask_inplace(got, bitmask)
    apply_token_bitmask_inplace_ref(want, bitmask)
    row = CheckRow("bitmask", dtype_name(dtype), f"n={n} vocab={vocab} words={words}", tol=0.0)
    same = torch.equal(got, want)
    row.max_err = 0.0 if same else float((got != want).sum())
    row.status = "PASS" if same else "FAIL"
    row.note = "" if same else "differing logits counted in max_err"
    return row


def check_verify_library(device: str, seed: int) -> list[CheckRow]:
    """``speculative/verify.py`` (what ``SpecDecoder`` runs) on device tensors == its CPU run."""
    from dspark_sglang.speculative import verify as vfy

    gen = torch.Generator().manual_seed(seed)
    rows = []
    bs, L, vocab = 256, 7, 50
    draft = torch.randint(0, 3, (bs, L), generator=gen)
    target = torch.randint(0, 3, (bs, L + 1), generator=gen)
    target[: bs // 4, :L] = draft[: bs // 4]
    lens = torch.randint(0, L + 1, (bs,), generator=gen)
    want = vfy.padded_to_lists(vfy.greedy_verify_padded(target, draft, lens))
    got = vfy.padded_to_lists(vfy.greedy_verify_padded(
        target.to(device), draft.to(device), lens.to(device)))
    rows.append(CheckRow("verify_greedy", "int64", f"bs={bs} L={L}",
                         "PASS" if got == want else "FAIL"))
    probs = torch.softmax(torch.randn(L + 1, vocab, generator=gen), -1)
    toks = probs[:L].argmax(-1).tolist()
    same = vfy.coupled_verify(probs.to(device), toks, 7, 3) == vfy.coupled_verify(probs, toks, 7, 3)
    parents = [-1, -1, 0, 1, 2, 2, 4]
    walks = []
    for p in (probs, probs.to(device)):
        g = torch.Generator().manual_seed(seed)
        walks.append(vfy.tree_rejection_verify(p, toks, parents, g))
    same = same and walks[0] == walks[1]
    rows.append(CheckRow("verify_sampled", "float32", f"L={L} vocab={vocab}",
                         "PASS" if same else "FAIL"))
    return rows


# ----------------------------------------------------------------------------------- flashinfer


def flashinfer_verify(batch: object, workspace: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Plan FlashInfer's paged prefill (page size 1, custom mask) for a ``VerifyBatch``; returns a
    callable producing ``[num_tokens, num_heads, head_dim]`` in ``batch.q``'s row layout."""
    import flashinfer

    device = batch.q.device
    starts, exts = batch.extend_start.tolist(), batch.extend_lens.tolist()
    seqs, rows = batch.seq_lens.tolist(), batch.req_pool_indices.tolist()
    q_rows = torch.cat([torch.arange(s, s + e) for s, e in zip(starts, exts, strict=True)])
    q_rows = q_rows.to(device)
    qo_indptr = torch.tensor([0] + list(torch.tensor(exts).cumsum(0).tolist()), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + list(torch.tensor(seqs).cumsum(0).tolist()), dtype=torch.int32)
    kv_indices = torch.cat([batch.req_to_token[r, :s] for r, s in zip(rows, seqs, strict=True)])
    full_mask = []  # per request [ext, seq]: prefix columns visible, then the block
    for block, s, e in zip(batch.mask_blocks, seqs, exts, strict=True):
        prefix = torch.ones(e, s - e, dtype=torch.bool, device=device)
        full_mask.append(torch.cat([prefix, block], 1).flatten())
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    num_heads, head_dim = batch.q.shape[1], batch.q.shape[2]
    wrapper.plan(
        qo_indptr.to(device), kv_indptr.to(device), kv_indices.to(torch.int32),
        torch.ones(len(exts), dtype=torch.int32, device=device),
        num_heads, batch.k_buf.shape[1], head_dim, 1,
        custom_mask=torch.cat(full_mask), causal=False, sm_scale=batch.sm_scale,
        q_data_type=batch.q.dtype, kv_data_type=batch.k_buf.dtype,
    )
    q_packed = batch.q[q_rows].contiguous()
    kv_cache = (batch.k_buf.unsqueeze(1), batch.v_buf.unsqueeze(1))  # [pages, 1, kv_heads, d]

    def run() -> torch.Tensor:
        out = torch.full_like(batch.q, float("nan"))
        out[q_rows] = wrapper.run(q_packed, kv_cache)
        return out

    return run


def check_flashinfer(
    device: str, dtype: torch.dtype, head_dim: int, group: int, mask_kind: str, seed: int,
    workspace: torch.Tensor,
) -> CheckRow:
    from dspark_kernels.testing import make_verify_batch
    from dspark_kernels.verify_attention import verify_attention_ref

    batch = make_verify_batch([100, 0, 37], [8, 5, 1], 2 * group, 2, head_dim, dtype, mask_kind,
                              seed=seed, device=device)
    got = flashinfer_verify(batch, workspace)()
    want = verify_attention_ref(**batch.kwargs())
    owned = batch.owned_rows()
    config = f"d={head_dim} gqa={group} mask={mask_kind} page_size=1"
    return compare(CheckRow("flashinfer_prefill", dtype_name(dtype), config), got[owned],
                   want[owned], ATTN_TOL[dtype])


# ------------------------------------------------------------------------------------- timing


def cuda_time_us(fn: Callable[[], object], iters: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def copy_bandwidth_tbps(device: str) -> float:
    """Device-to-device copy of 1 GiB (read + write bytes counted), in TB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() / (us * 1e-6) / 1e12


def time_verify_attention(
    device: str, dtype: torch.dtype, bs: int, prefix: int, ext: int, num_heads: int,
    kv_heads: int, head_dim: int, mask_kind: str | None, copy_tbps: float,
    workspace: torch.Tensor | None,
) -> list[CheckRow]:
    from dspark_kernels.testing import make_verify_batch
    from dspark_kernels.verify_attention import verify_attention, verify_attention_ref

    batch = make_verify_batch([prefix] * bs, [ext] * bs, num_heads, kv_heads, head_dim, dtype,
                              mask_kind, seed=7, device=device)
    elem = batch.q.element_size()
    kv_bytes = int(batch.seq_lens.sum()) * kv_heads * head_dim * 2 * elem
    io_bytes = kv_bytes + 2 * batch.q.numel() * elem
    config = f"bs={bs} prefix={prefix} ext={ext} heads={num_heads}/{kv_heads} d={head_dim} " \
             f"mask={mask_kind}"
    want = verify_attention_ref(**batch.kwargs())
    owned = batch.owned_rows()
    rows = []
    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("time verify_attention", lambda: verify_attention(**batch.kwargs(), max_extend_len=ext))]
    if workspace is not None and dtype != torch.float32:  # mask_blocks are causal when None
        candidates.append(("time flashinfer_prefill", flashinfer_verify(batch, workspace)))
    for name, fn in candidates:
        def one(name: str = name, fn: Callable[[], torch.Tensor] = fn) -> CheckRow:
            row = compare(CheckRow(name, dtype_name(dtype), config), fn()[owned], want[owned],
                          ATTN_TOL[dtype])
            row.time_us = cuda_time_us(fn)
            row.tbps = io_bytes / (row.time_us * 1e-6) / 1e12
            row.note = f"{100 * row.tbps / copy_tbps:.0f}% of copy bw"
            return row
        rows.append(guarded(name, dtype_name(dtype), config, one))
    return rows


# ---------------------------------------------------------------------------- backend checks


def _backend_batch(device: str, dtype: torch.dtype, mode_name: str, seed: int) -> tuple:
    """``make_fb(device)`` (shuffled slots), K/V pools on ``device`` and on the host (same
    content), host q/k/v for one layer, and the softmax scale."""
    from dspark_kernels.testing import random_tree_mask
    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode
    from dspark_sglang.mem_cache.kv_pool import KVPool

    gen = torch.Generator().manual_seed(seed)
    prefix, ext, mode = {
        "extend": ([300, 0, 37], [64, 17, 5], ForwardMode.EXTEND),
        "decode": ([1000, 1, 77, 512], [1, 1, 1, 1], ForwardMode.DECODE),
        "verify": ([200, 0, 90], [8, 6, 8], ForwardMode.TARGET_VERIFY),
    }[mode_name]
    heads, kv_heads, head_dim = 16, 4, 128
    seqs = [p + e for p, e in zip(prefix, ext, strict=True)]
    num_slots = sum(seqs) + 8
    pools = [KVPool(1, num_slots, kv_heads, head_dim, dtype, dev) for dev in (device, "cpu")]
    for buf in ("k_bufs", "v_bufs"):
        init = torch.randn(num_slots + 1, kv_heads, head_dim, generator=gen).to(dtype)
        for pool in pools:
            getattr(pool, buf)[0].copy_(init)
    slots = torch.randperm(num_slots, generator=gen)[: sum(seqs)] + 1
    r2t = torch.zeros(len(seqs) + 2, max(seqs), dtype=torch.int64)
    rows = torch.randperm(len(seqs) + 2, generator=gen)[: len(seqs)]
    locs, off = [], 0
    for i, (p, s) in enumerate(zip(prefix, seqs, strict=True)):
        r2t[rows[i], :s] = slots[off : off + s]
        locs.append(slots[off + p : off + s])
        off += s
    masks = [random_tree_mask(e, gen) for e in ext] if mode_name == "verify" else None
    n = sum(ext)

    def make_fb(device: str) -> ForwardBatch:
        return ForwardBatch(
            mode=mode, input_ids=torch.zeros(n, dtype=torch.int64, device=device),
            positions=torch.zeros(n, dtype=torch.int64, device=device),
            out_cache_loc=torch.cat(locs).to(device), req_pool_indices=rows.to(device),
            seq_lens=torch.tensor(seqs, device=device), extend_lens=torch.tensor(ext,
                                                                                 device=device),
            req_to_token=r2t.to(device), custom_masks=masks, seq_lens_list=seqs,
            extend_lens_list=ext)

    qkv = [torch.randn(n, h, head_dim, generator=gen).to(dtype)
           for h in (heads, kv_heads, kv_heads)]
    return make_fb, pools, qkv, head_dim**-0.5


def check_backend(device: str, name: str, dtype: torch.dtype, mode_name: str) -> CheckRow:
    """One layer of an attention backend (store + attention) on the device against
    torch_native on the host."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from dspark_sglang.layers.attention.base import create_attention_backend

    make_fb, pools, (q, k, v), scale = _backend_batch(device, dtype, mode_name, 31)
    outs = []
    for backend_name, pool, dev in ((name, pools[0], device), ("torch_native", pools[1], "cpu")):
        backend = create_attention_backend(backend_name, device=dev)
        fb = make_fb(dev)
        backend.init_forward_metadata(fb)
        out = backend.forward(q.to(dev), k.to(dev), v.to(dev), 0, fb, pool, scale)
        outs.append(out.cpu())
    row = compare(CheckRow(f"backend {name}", dtype_name(dtype), f"{mode_name} heads=16/4 d=128"),
                  outs[0], outs[1], ATTN_TOL[dtype])
    if row.status == "PASS" and not torch.equal(pools[0].k_bufs[0].cpu(), pools[1].k_bufs[0]):
        row.status, row.note = "FAIL", "K/V pools differ after the store"
    return row


def backend_rows(device: str) -> list[CheckRow]:
    rows = []
    for name, dtypes in (("triton", (torch.float32, torch.bfloat16)),
                         ("flashinfer", (torch.bfloat16, torch.float16))):
        for dtype in dtypes:
            for mode_name in ("extend", "decode", "verify"):
                config = f"{mode_name}"
                try:
                    rows.append(check_backend(device, name, dtype, mode_name))
                except ImportError as e:
                    rows.append(CheckRow(f"backend {name}", dtype_name(dtype), config, "SKIP",
                                         note=f"{e}"[:120]))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    rows.append(CheckRow(f"backend {name}", dtype_name(dtype), config, "ERROR",
                                         note=f"{type(e).__name__}: {e}"[:120]))
    return rows


# ----------------------------------------------------------------------------- engine checks

CHECK_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three prime numbers and explain why each is prime:",
    '{"name": "Alice", "age": 30, "city":',
]


def _greedy(max_new_tokens: int) -> dict[str, object]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}


def _run_engine(
    device: str, dtype: str, backend: str, algo: str, prompts: list[str], max_new_tokens: int,
) -> tuple[list[list[int]], float, float | None]:
    """Build an Engine on the embedded default model, generate greedily (all prompts at once),
    shut it down. Returns (output ids per prompt, seconds of the timed batch, mean accepted
    length or None). A short warm-up request runs before the timed batch."""
    if str(REPO) not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, str(REPO))
    import dspark_sglang

    engine = dspark_sglang.Engine(
        dtype=dtype, attention_backend=backend, device=device, speculative_algorithm=algo,
        max_total_tokens=max(16384, 2 * len(prompts) * (max_new_tokens + 128)),
        max_running_requests=max(64, len(prompts)))
    try:
        engine.generate(prompts[:1], _greedy(4))
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = engine.generate(prompts, _greedy(max_new_tokens))
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    ids = [list(o["output_ids"]) for o in outs]
    verify_cts = [o["meta_info"].get("spec_verify_ct") or 0 for o in outs]
    accept = (sum(len(i) for i in ids) / sum(verify_cts)) if sum(verify_cts) else None
    return ids, seconds, accept


def _same_tokens(got: list[list[int]], want: list[list[int]]) -> tuple[bool, str]:
    total = sum(len(w) for w in want)
    same = sum(sum(a == b for a, b in zip(g, w)) for g, w in zip(got, want, strict=True))
    first = [next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
             for g, w in zip(got, want, strict=True)]
    diverged = [f"p{i}@{j}" for i, j in enumerate(first) if j is not None]
    ok = got == want
    return ok, f"{same}/{total} tokens equal" + (f"; first diff {', '.join(diverged)}"
                                                 if diverged else "")


class Deadline:
    """The engine part's time budget: rows after it become SKIP (the script must end in time)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def over(self) -> bool:
        return time.monotonic() > self.end


def engine_checks(device: str, deadline: Deadline, max_new_tokens: int = 32) -> list[CheckRow]:
    """Greedy output equality on the embedded default model:

    - attention backends: triton == torch_native in float32; flashinfer (fp16/bf16 kernels only)
      against torch_native in bfloat16 (a mismatch there is a WARN: bf16 near-ties may flip with
      a different reduction order);
    - speculative algorithms: NGRAM and DSPARK == NONE, float32, on the triton backend.
    """
    rows: list[CheckRow] = []
    runs: dict[tuple[str, str, str], list[list[int]]] = {}

    def run(dtype: str, backend: str, algo: str) -> list[list[int]] | None:
        key = (dtype, backend, algo)
        if key not in runs:
            ids, _, _ = _run_engine(device, dtype, backend, algo, CHECK_PROMPTS, max_new_tokens)
            runs[key] = ids
        return runs[key]

    cases = [
        ("backend triton", "float32", ("triton", "NONE"), ("torch_native", "NONE"), "FAIL"),
        ("backend flashinfer", "bfloat16", ("flashinfer", "NONE"), ("torch_native", "NONE"),
         "WARN"),
        ("spec NGRAM", "float32", ("triton", "NGRAM"), ("triton", "NONE"), "FAIL"),
        ("spec DSPARK", "float32", ("triton", "DSPARK"), ("triton", "NONE"), "FAIL"),
    ]
    for name, dtype, (backend, algo), (ref_backend, ref_algo), on_mismatch in cases:
        short = "fp32" if dtype == "float32" else "bf16"
        config = f"{backend}/{algo} vs {ref_backend}/{ref_algo}, {len(CHECK_PROMPTS)} prompts x " \
                 f"{max_new_tokens} tokens"
        if deadline.over():
            rows.append(CheckRow(f"greedy {name}", short, config, "SKIP", note="time budget"))
            continue
        try:
            want = run(dtype, ref_backend, ref_algo)
            got = run(dtype, backend, algo)
        except ImportError as e:  # an optional extra (flashinfer) is absent
            rows.append(CheckRow(f"greedy {name}", short, config, "SKIP", note=f"{e}"[:120]))
            continue
        except Exception as e:  # noqa: BLE001 - report the failure as a row and go on
            traceback.print_exc(file=sys.stderr)
            rows.append(CheckRow(f"greedy {name}", short, config, "ERROR",
                                 note=f"{type(e).__name__}: {e}"[:120]))
            continue
        ok, note = _same_tokens(got, want)
        rows.append(CheckRow(f"greedy {name}", short, config, "PASS" if ok else on_mismatch,
                             note=note))
    return rows


def engine_timing(
    device: str, deadline: Deadline, backend: str = "triton", max_new_tokens: int = 128,
) -> list[CheckRow]:
    """End-to-end generated tokens/s (bf16, greedy, ignore_eos) for NONE / MTP1 / DSPARK at
    concurrency 1 / 16 / 64 on the embedded default model: all requests submitted at once,
    timed from submission to the last completion (prefill included)."""
    rows: list[CheckRow] = []
    for algo in ("NONE", "MTP1", "DSPARK"):
        for concurrency in (1, 16, 64):
            config = f"{algo} conc={concurrency} {backend} new={max_new_tokens}"
            if deadline.over():
                rows.append(CheckRow("e2e tokens/s", "bf16", config, "SKIP", note="time budget"))
                continue
            prompts = [f"{CHECK_PROMPTS[i % len(CHECK_PROMPTS)]} (request {i})"
                       for i in range(concurrency)]
            try:
                ids, seconds, accept = _run_engine(device, "bfloat16", backend, algo, prompts,
                                                   max_new_tokens)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                rows.append(CheckRow("e2e tokens/s", "bf16", config, "ERROR",
                                     note=f"{type(e).__name__}: {e}"[:120]))
                continue
            tokens = sum(len(i) for i in ids)
            row = CheckRow("e2e tokens/s", "bf16", config, "INFO", tok_s=tokens / seconds)
            row.note = f"{tokens} tokens in {seconds:.2f}s; per request " \
                       f"{tokens / seconds / concurrency:.1f} tok/s" + (
                           f"; accept len {accept:.2f}" if accept is not None else "")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- main


def print_table(rows: list[CheckRow]) -> None:
    def fmt(x: float | None, spec: str) -> str:
        return "" if x is None else format(x, spec)

    header = ["check", "dtype", "status", "max_err", "tol", "us", "TB/s", "tok/s", "config",
              "note"]
    table = [[r.check, r.dtype, r.status, fmt(r.max_err, ".2e"), fmt(r.tol, ".0e"),
              fmt(r.time_us, ".1f"), fmt(r.tbps, ".2f"), fmt(r.tok_s, ".0f"), r.config, r.note]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h)
              for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))


def correctness_rows(device: str, smoke: bool) -> list[CheckRow]:
    rows: list[CheckRow] = []
    dtypes = [torch.float32, torch.float16] if smoke else list(DTYPES.values())
    head_dims = [64, 80] if smoke else [64, 80, 128]
    cases = [(1, None), (4, "chain"), (4, "tree"), (1, "tree")]
    shape = ([5, 0], [3, 4]) if smoke else ([1000, 0, 37, 300], [8, 5, 1, 70])
    seed = 0
    for dtype in dtypes:
        for head_dim in head_dims:
            for group, mask_kind in cases[:2] if smoke else cases:
                seed += 1
                rows.append(guarded(
                    "verify_attention", dtype_name(dtype), f"d={head_dim}",
                    lambda d=dtype, h=head_dim, g=group, m=mask_kind, s=seed: (
                        check_verify_attention(device, d, h, g, m, shape[0], shape[1], s))))
        rows.append(guarded("store_kv", dtype_name(dtype), "",
                            lambda d=dtype: check_kv_store(device, d, 11)))
        if not smoke:
            rows.append(guarded("bitmask", dtype_name(dtype), "",
                                lambda d=dtype: check_bitmask(device, d, 12)))
    try:
        rows.extend(check_verify_library(device, 13))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        rows.append(CheckRow("verify", "int64", "", "ERROR", note=f"{type(e).__name__}: {e}"))
    return rows


def flashinfer_rows(
    device: str, every_head_dim: bool
) -> tuple[list[CheckRow], torch.Tensor | None]:
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - absent or broken install: report, do not fail
        return [CheckRow("flashinfer_prefill", "-", "", "SKIP", note=f"import: {e}"[:120])], None
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 80, 128) if every_head_dim else (128,):
            for group, mask_kind in ((4, "chain"), (4, "tree")):
                rows.append(guarded(
                    "flashinfer_prefill", dtype_name(dtype), f"d={head_dim} mask={mask_kind}",
                    lambda d=dtype, h=head_dim, g=group, m=mask_kind: (
                        check_flashinfer(device, d, h, g, m, 21, workspace))))
    return rows, workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--flashinfer-all", action="store_true",
                        help="FlashInfer checks for head dims 64/80/128 (each JIT-compiles)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: run the kernel checks on CPU via the Triton interpreter")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--skip-engine", action="store_true", help="kernel checks only")
    parser.add_argument("--engine-backend", default="triton",
                        choices=("torch_native", "triton", "flashinfer"),
                        help="attention backend of the end-to-end timings")
    parser.add_argument("--engine-budget-s", type=float, default=330.0,
                        help="engine checks + timings stop starting new runs after this long")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # the @triton.jit modules are imported lazily
        device = "cpu"
    elif not torch.cuda.is_available():
        print("no GPU")
        return 0
    else:
        device = "cuda"
    kernels = load_kernels()
    if not kernels.has_triton():
        print("triton is not importable: only the torch references could run")
        return 1
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = correctness_rows(device, smoke=args.cpu_smoke)
    workspace = None
    if device == "cuda":
        fi_rows, workspace = flashinfer_rows(device, args.flashinfer_all)
        rows += fi_rows
        rows += backend_rows(device)
    deadline = Deadline(args.engine_budget_s)
    if device == "cuda" and not args.skip_engine:
        rows += engine_checks(device, deadline)
    if device == "cuda" and not args.skip_timing:
        copy_tbps = copy_bandwidth_tbps(device)
        rows.append(CheckRow("copy bandwidth", "uint8", "1 GiB d2d", "INFO", tbps=copy_tbps))
        for dtype in (torch.bfloat16, torch.float16):
            rows += time_verify_attention(device, dtype, 32, 4096, 8, 32, 8, 128, "tree",
                                          copy_tbps, workspace)
        rows += time_verify_attention(device, torch.bfloat16, 64, 1024, 16, 32, 8, 128, None,
                                      copy_tbps, workspace)
        if not args.skip_engine:
            rows += engine_timing(device, deadline, args.engine_backend)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    failed = [r for r in rows if r.status in ("FAIL", "ERROR")]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
