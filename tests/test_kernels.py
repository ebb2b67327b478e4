"""Triton kernels vs their torch references, on CPU through the Triton interpreter.

``TRITON_INTERPRET=1`` is set before anything imports triton's JIT, so the kernels run on CPU
tensors (slowly: shapes are tiny). The references are also checked against brute-force loops, so
a shared mistake cannot hide.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit decoration

import importlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Import the checkout's ``dspark_kernels`` whether or not the project is installed.
_LOADER = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    import dspark_kernels
    """
)


def _load_package() -> ModuleType:
    from dspark_sglang.layers.attention.triton_backend import load_dspark_kernels

    return load_dspark_kernels()


dspark_kernels = _load_package()
try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAVE_TRITON = True
    # triton's own @jit helpers (tl.max, ...) are built at its import: if another test module
    # imported triton before TRITON_INTERPRET was set, kernels cannot run on CPU in this process
    INTERPRETED = isinstance(tl.standard.max, InterpretedFunction)
except ImportError:
    HAVE_TRITON = INTERPRETED = False
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON or not INTERPRETED,
    reason="triton is not importable" if not HAVE_TRITON else
    "triton was imported before TRITON_INTERPRET=1 was set; these tests rerun in a fresh "
    "process (test_triton_kernels_in_fresh_process)",
)

va = importlib.import_module("dspark_kernels.verify_attention")
kvs = importlib.import_module("dspark_kernels.kv_store")
bm = importlib.import_module("dspark_kernels.bitmask")
kt = importlib.import_module("dspark_kernels.testing")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- verify attention


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

VERIFY_CASES = [
    # dtype, head_dim, gqa ratio, mask, prefix lens, ext lens
    (torch.float32, 64, 1, None, [70, 0, 5], [3, 6, 1]),
    (torch.float16, 80, 3, "chain", [9, 33], [5, 8]),
    (torch.float32, 128, 3, "tree", [12, 0], [7, 9]),
    (torch.float16, 128, 1, "tree", [0, 65], [6, 4]),
    (torch.bfloat16, 64, 3, "tree", [20], [8]),
    (torch.float32, 80, 1, None, [3, 10], [40, 0]),  # several query blocks, an empty request
]


@needs_triton
@pytest.mark.parametrize("dtype,head_dim,group,mask_kind,prefix_lens,ext_lens", VERIFY_CASES)
def test_verify_attention_matches_ref(
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    mask_kind: str | None,
    prefix_lens: list[int],
    ext_lens: list[int],
) -> None:
    kv_heads = 2
    batch = kt.make_verify_batch(prefix_lens, ext_lens, kv_heads * group, kv_heads, head_dim,
                                 dtype, mask_kind)
    out = torch.full_like(batch.q, float("nan"))  # unwritten owned rows would stay NaN
    got = va.verify_attention(**batch.kwargs(), out=out)
    want = va.verify_attention_ref(**batch.kwargs())
    owned = batch.owned_rows()
    assert got.data_ptr() == out.data_ptr()
    assert not got[owned].isnan().any()
    assert got[~owned].isnan().all(), "rows of no request must not be written"
    err = (got[owned].float() - want[owned].float()).abs().max().item()
    assert err <= TOL[dtype], err


@needs_triton
def test_verify_attention_bool_and_uint8_masks_agree_and_chain_equals_causal() -> None:
    batch = kt.make_verify_batch([4, 30], [5, 7], 4, 2, 64, torch.float32, "chain", seed=3)
    args = batch.kwargs()
    with_chain = va.verify_attention(**args, max_extend_len=7)
    with_u8 = va.verify_attention(**{**args, "custom_mask": batch.custom_mask.to(torch.uint8)})
    causal = va.verify_attention(**{**args, "custom_mask": None, "mask_indptr": None})
    owned = batch.owned_rows()
    torch.testing.assert_close(with_chain[owned], with_u8[owned], rtol=0, atol=0)
    torch.testing.assert_close(with_chain[owned], causal[owned], rtol=0, atol=1e-6)


@needs_triton
def test_verify_attention_row_without_visible_keys_is_zero() -> None:
    batch = kt.make_verify_batch([0], [3], 2, 2, 64, torch.float32, "chain", seed=4)
    mask = batch.custom_mask.clone()
    mask[3:6] = False  # query 1 sees nothing (empty prefix)
    args = {**batch.kwargs(), "custom_mask": mask}
    got = va.verify_attention(**args)
    want = va.verify_attention_ref(**args)
    start = int(batch.extend_start[0])
    assert got[start + 1].abs().max().item() == 0.0
    assert want[start + 1].abs().max().item() == 0.0
    torch.testing.assert_close(got[start : start + 3], want[start : start + 3])


def test_verify_attention_ref_matches_brute_force() -> None:
    batch = kt.make_verify_batch([6, 2], [4, 5], 6, 2, 16, torch.float64, "tree", seed=5)
    want = va.verify_attention_ref(**batch.kwargs())
    rows = batch.req_pool_indices.tolist()
    for i, (row, block) in enumerate(zip(rows, batch.mask_blocks, strict=True)):
        seq, ext = int(batch.seq_lens[i]), int(batch.extend_lens[i])
        start, prefix = int(batch.extend_start[i]), seq - ext
        slots = batch.req_to_token[row, :seq]
        for t in range(ext):
            keys = [j for j in range(seq) if j < prefix or block[t, j - prefix]]
            for h in range(6):
                kk = batch.k_buf[slots[keys], h // 3]  # [visible, head_dim]
                vv = batch.v_buf[slots[keys], h // 3]
                w = torch.softmax(kk @ batch.q[start + t, h] * batch.sm_scale, 0)
                torch.testing.assert_close(want[start + t, h], w @ vv)


# ----------------------------------------------------------------------------------- kv store


@needs_triton
@pytest.mark.parametrize("src_dtype,buf_dtype", [(torch.float32, torch.float32),
                                                 (torch.float32, torch.float16)])
def test_store_kv_matches_ref(src_dtype: torch.dtype, buf_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 3 * 3, 80, generator=gen).to(src_dtype)  # fused, strided k / v views
    k, v = qkv[:, 3:6], qkv[:, 6:9]
    loc = torch.tensor([7, 0, 3, 11, 5])
    bufs = [torch.full((12, 3, 80), float("nan"), dtype=buf_dtype) for _ in range(4)]
    kvs.store_kv(bufs[0], bufs[1], loc, k, v)
    kvs.store_kv_ref(bufs[2], bufs[3], loc, k, v)
    for got, want, src in ((bufs[0], bufs[2], k), (bufs[1], bufs[3], v)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(got[loc], src.to(buf_dtype), rtol=0, atol=0)
        untouched = torch.ones(12, dtype=torch.bool)
        untouched[loc] = False
        assert got[untouched].isnan().all()


# ------------------------------------------------------------------------------------ bitmask


def _bit_loop_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for r in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            word = t // 32
            allowed = word < bitmask.shape[1] and (int(bitmask[r, word]) >> (t % 32)) & 1
            if not allowed:
                out[r, t] = float("-inf")
    return out


@needs_triton
@pytest.mark.parametrize("dtype,vocab,num_words", [(torch.float32, 100, 4),
                                                   (torch.float16, 70, 2),
                                                   (torch.float32, 1500, 47)])
def test_bitmask_matches_ref_and_bit_loop(dtype: torch.dtype, vocab: int, num_words: int) -> None:
    gen = torch.Generator().manual_seed(2)
    bitmask = torch.randint(-(2**31), 2**31, (3, num_words), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0, 0] = -1  # every bit, sign bit included
    bitmask[1] = 0
    logits = torch.randn(3, vocab, generator=gen).to(dtype)
    got, ref = logits.clone(), logits.clone()
    bm.apply_token_bitmask_inplace(got, bitmask)
    bm.apply_token_bitmask_inplace_ref(ref, bitmask)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(ref, _bit_loop_reference(logits, bitmask), rtol=0, atol=0)
    assert torch.isinf(got[1]).all()
    assert torch.isfinite(got[0, :32]).all()


# ----------------------------------------------------------------------------------- imports


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, env=env, cwd=str(REPO), timeout=120)


def test_import_without_triton() -> None:
    code = "import sys\nsys.modules['triton'] = None\n" + _LOADER + textwrap.dedent(
        """
        import torch
        from dspark_kernels import has_triton
        from dspark_kernels.verify_attention import verify_attention, verify_attention_ref
        assert not has_triton()
        try:
            verify_attention(torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16),
                             torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                             torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                             torch.zeros(1, dtype=torch.long), None, None, 1.0)
        except RuntimeError as e:  # CPU tensors, no interpreter: refused before importing triton
            assert "TRITON_INTERPRET" in str(e)
        else:
            raise AssertionError("expected a refusal")
        print("ok")
        """
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_does_not_load_triton() -> None:
    code = _LOADER + textwrap.dedent(
        """
        import sys
        import dspark_kernels.verify_attention, dspark_kernels.kv_store
        import dspark_kernels.bitmask
        print("triton" in sys.modules, dspark_kernels.__name__, dspark_kernels.has_triton())
        """
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    loaded, name, has = result.stdout.split()
    assert loaded == "False" and name == "dspark_kernels"
    assert has == str(HAVE_TRITON)


def test_gpu_check_without_gpu_says_so_and_exits_zero() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(REPO / "programs" / "gpu_check.py")],
                            capture_output=True, text=True, check=False, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no GPU"


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETED, reason="the Triton tests ran in this process")
def test_triton_kernels_in_fresh_process() -> None:
    """Only when triton was imported (without the interpreter) before this module: rerun the
    Triton tests in a process where TRITON_INTERPRET=1 is set first."""
    from tests.conftest import rerun_with_triton_interpreter

    rerun_with_triton_interpreter(__file__, allow_skips=False)
