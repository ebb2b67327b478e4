"""GPU check of the Triton kernels (draft; the lead will add end-to-end engine checks).

Runs on one CUDA device, installs nothing, and prints one table:

1. every ``dspark_kernels`` kernel against its torch reference on fresh random inputs, in fp16,
   bf16 and fp32 (outputs pre-filled with NaN where the kernel takes an output buffer, so rows it
   forgets to write show up), head dims 64 / 80 / 128, GQA 1 and 4, causal / chain / tree masks;
2. FlashInfer ``BatchPrefillWithPagedKVCacheWrapper`` with a custom mask (page size 1, page
   indices from ``req_to_token``) against the same reference, when flashinfer imports;
3. verify-attention timing (µs per call, achieved TB/s of KV read, and that as a share of the
   device's measured copy bandwidth), Triton and FlashInfer side by side.

Without CUDA it prints "no GPU" and exits 0. ``--cpu-smoke`` runs part 1 on CPU through the
Triton interpreter with tiny shapes (a check of this script, not of the GPU). Exit status 1 when a
check FAILs or ERRORs (FlashInfer being absent is a SKIP).

    python programs/gpu_check.py [--skip-timing] [--flashinfer-all] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
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
    note: str = ""


def load_kernels() -> ModuleType:
    """``dspark_kernels`` as installed, else the repository's ``kernels`` folder under that name."""
    try:
        return importlib.import_module("dspark_kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "dspark_kernels", REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["dspark_kernels"] = module
        spec.loader.exec_module(module)
        return module


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


def check_accept(device: str, seed: int) -> list[CheckRow]:
    from dspark_kernels import accept

    gen = torch.Generator().manual_seed(seed)
    rows = []
    bs, L = 256, 7
    draft = torch.randint(0, 3, (bs, L), generator=gen)
    target = torch.randint(0, 3, (bs, L + 1), generator=gen)
    target[: bs // 4, :L] = draft[: bs // 4]
    lens = torch.randint(0, L + 1, (bs,), generator=gen)
    args = [t.to(device) for t in (draft, lens, target)]
    got, want = accept.greedy_accept_chain(*args), accept.greedy_accept_chain_ref(*args)
    ok = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    rows.append(CheckRow("accept_chain", "int64", f"bs={bs} L={L}", "PASS" if ok else "FAIL"))
    bs, n = 64, 16
    parents = torch.zeros(bs, n, dtype=torch.int64)
    for i in range(1, n):
        parents[:, i] = torch.randint(0, i, (bs,), generator=gen)
    parents[:, 0] = -1
    tree = [torch.randint(0, 3, (bs, n), generator=gen), parents,
            torch.randint(1, n + 1, (bs,), generator=gen),
            torch.randint(0, 3, (bs, n), generator=gen)]
    tree = [t.to(device) for t in tree]
    got, want = accept.greedy_accept_tree(*tree), accept.greedy_accept_tree_ref(*tree)
    ok = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    rows.append(CheckRow("accept_tree", "int64", f"bs={bs} nodes={n}", "PASS" if ok else "FAIL"))
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


# ---------------------------------------------------------------------------------- lead hooks


def engine_checks(device: str) -> list[CheckRow]:
    """HOOK for the lead: end-to-end engine checks on the GPU (to be written with the engine).

    Intended content: the Triton and FlashInfer attention backends against the torch-native
    backend on one tiny random model (logits of EXTEND / DECODE / TARGET_VERIFY batches), and
    greedy speculative == plain output for each speculative algorithm. Returns rows for the
    table; currently none (the engine does not exist yet in this draft).
    """
    del device
    return []


def engine_timing(device: str) -> list[CheckRow]:
    """HOOK for the lead: end-to-end timings (SPS table, tokens/s) to print in the same table."""
    del device
    return []


# ---------------------------------------------------------------------------------------- main


def print_table(rows: list[CheckRow]) -> None:
    def fmt(x: float | None, spec: str) -> str:
        return "" if x is None else format(x, spec)

    header = ["check", "dtype", "status", "max_err", "tol", "us", "TB/s", "config", "note"]
    table = [[r.check, r.dtype, r.status, fmt(r.max_err, ".2e"), fmt(r.tol, ".0e"),
              fmt(r.time_us, ".1f"), fmt(r.tbps, ".2f"), r.config, r.note] for r in rows]
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
        rows.extend(check_accept(device, 13))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        rows.append(CheckRow("accept", "int64", "", "ERROR", note=f"{type(e).__name__}: {e}"))
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
        rows += engine_checks(device)
    if device == "cuda" and not args.skip_timing:
        copy_tbps = copy_bandwidth_tbps(device)
        rows.append(CheckRow("copy bandwidth", "uint8", "1 GiB d2d", "INFO", tbps=copy_tbps))
        for dtype in (torch.bfloat16, torch.float16):
            rows += time_verify_attention(device, dtype, 32, 4096, 8, 32, 8, 128, "tree",
                                          copy_tbps, workspace)
        rows += time_verify_attention(device, torch.bfloat16, 64, 1024, 16, 32, 8, 128, None,
                                      copy_tbps, workspace)
        rows += engine_timing(device)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    failed = [r for r in rows if r.status in ("FAIL", "ERROR")]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
