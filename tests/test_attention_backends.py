"""Attention backends: registry selection, clear errors, and Triton == torch-native on CPU.

The Triton backend runs on CPU through the Triton interpreter: ``TRITON_INTERPRET=1`` is set
before anything imports triton. If another test module imported triton first (without the
interpreter), the Triton tests here are skipped in-process and rerun in a fresh process.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit decoration

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode
from dspark_sglang.layers.attention.base import AttentionBackend, create_attention_backend
from dspark_sglang.layers.attention.torch_native import TorchNativeAttnBackend
from dspark_sglang.mem_cache.kv_pool import KVPool

REPO = Path(__file__).resolve().parents[1]

HAVE_TRITON = importlib.util.find_spec("triton") is not None
try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(tl.standard.max, InterpretedFunction)
except ImportError:
    INTERPRETED = False
needs_interpreter = pytest.mark.skipif(
    not HAVE_TRITON or not INTERPRETED,
    reason="triton is not importable" if not HAVE_TRITON else
    "triton was imported before TRITON_INTERPRET=1; rerun in test_triton_in_fresh_process",
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _run_python(code: str, interpret: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=False, env=env, cwd=str(REPO), timeout=120)


# ------------------------------------------------------------------------------ registry / errors


def test_registry_selects_torch_native_and_rejects_unknown() -> None:
    backend = create_attention_backend("torch_native")
    assert isinstance(backend, TorchNativeAttnBackend)
    assert isinstance(backend, AttentionBackend)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        create_attention_backend("flash_attn_9000")


@needs_interpreter
def test_registry_selects_triton_when_interpreting() -> None:
    from dspark_sglang.layers.attention.triton_backend import TritonAttnBackend

    assert isinstance(create_attention_backend("triton"), TritonAttnBackend)
    assert isinstance(create_attention_backend("triton", device="cpu"), TritonAttnBackend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flashinfer_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="flashinfer.*CUDA"):
        create_attention_backend("flashinfer")
    with pytest.raises(RuntimeError, match="flashinfer.*CUDA"):
        create_attention_backend("flashinfer", device="cpu")


def test_triton_on_cpu_without_interpreter_is_a_clear_error() -> None:
    result = _run_python(
        """
        import sys
        from dspark_sglang.layers.attention.base import create_attention_backend
        try:
            create_attention_backend("triton", device="cpu")
        except RuntimeError as e:
            print("refused:", e)
        print("triton imported:", "triton" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "TRITON_INTERPRET" in result.stdout, result.stdout
    assert "torch_native" in result.stdout
    assert "triton imported: False" in result.stdout


def test_engine_rejects_triton_on_cpu_without_interpreter(tmp_path: Path) -> None:
    from dspark_sglang.benchmark.tiny_model import make_tiny_model

    make_tiny_model(tmp_path, layers=1, hidden=32, heads=2, kv_heads=1)
    result = _run_python(
        f"""
        import dspark_sglang
        try:
            dspark_sglang.Engine(model_path={str(tmp_path)!r}, attention_backend="triton",
                                 max_total_tokens=256, dtype="float32")
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "CUDA" in result.stdout, result.stdout


def test_import_without_triton_and_flashinfer() -> None:
    result = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # any import of them now raises ImportError
        sys.modules["flashinfer"] = None
        import dspark_sglang
        from dspark_sglang.entrypoints.engine import Engine
        from dspark_sglang.model_executor import model_runner, cuda_graph
        from dspark_sglang.layers.attention.base import create_attention_backend
        b = create_attention_backend("torch_native")
        for name in ("triton", "flashinfer"):
            try:
                create_attention_backend(name)
            except (RuntimeError, ImportError) as e:
                print(name, "refused:", type(e).__name__, str(e)[:60])
        print("ok", type(b).__name__, Engine.__name__)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok TorchNativeAttnBackend Engine", result.stdout
    assert any(line.startswith("triton refused:") for line in lines)
    assert any(line.startswith("flashinfer refused:") for line in lines)


def test_import_does_not_load_gpu_libraries() -> None:
    result = _run_python(
        """
        import sys
        import dspark_sglang
        from dspark_sglang.entrypoints import engine, model_setup
        from dspark_sglang.model_executor import cuda_graph
        from dspark_sglang.layers.attention import base, torch_native
        print(sorted(m for m in ("triton", "flashinfer") if m in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------ Triton == torch-native


def _chain_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def _tree_mask(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def _make_batch(
    mode: ForwardMode, prefix_lens: list[int], ext_lens: list[int],
    masks: list[torch.Tensor | None] | None, kv_heads: int, head_dim: int, seed: int,
) -> tuple[ForwardBatch, KVPool]:
    """Shuffled slots and shuffled req_to_token rows; the prefix K/V are random."""
    gen = torch.Generator().manual_seed(seed)
    bs = len(prefix_lens)
    seqs = [p + e for p, e in zip(prefix_lens, ext_lens, strict=True)]
    num_slots = sum(seqs) + 5
    pool = KVPool(1, num_slots, kv_heads, head_dim, torch.float32)
    pool.k_bufs[0].copy_(torch.randn(pool.k_bufs[0].shape, generator=gen))
    pool.v_bufs[0].copy_(torch.randn(pool.v_bufs[0].shape, generator=gen))
    slots = torch.randperm(num_slots, generator=gen)[:sum(seqs)] + 1  # slot 0 = padding
    rows = torch.randperm(bs + 2, generator=gen)[:bs]
    req_to_token = torch.zeros(bs + 2, max(seqs) + 3, dtype=torch.int64)
    out_loc, offset = [], 0
    for i, (p, s) in enumerate(zip(prefix_lens, seqs, strict=True)):
        req_to_token[rows[i], :s] = slots[offset : offset + s]
        out_loc.append(slots[offset + p : offset + s])
        offset += s
    n = sum(ext_lens)
    fb = ForwardBatch(
        mode=mode,
        input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.cat([torch.arange(p, p + e) for p, e in zip(prefix_lens, ext_lens)]),
        out_cache_loc=torch.cat(out_loc),
        req_pool_indices=rows.clone(),
        seq_lens=torch.tensor(seqs),
        extend_lens=torch.tensor(ext_lens),
        req_to_token=req_to_token,
        custom_masks=masks,
        seq_lens_list=seqs,
        extend_lens_list=list(ext_lens),
    )
    return fb, pool


BACKEND_CASES = {
    # name: mode, prefix lens, ext lens, masks, heads, kv_heads, head_dim
    "extend_prefix_causal": (ForwardMode.EXTEND, [5, 0, 17], [4, 7, 1], None, 4, 2, 16),
    "decode": (ForwardMode.DECODE, [9, 1, 30, 4], [1, 1, 1, 1], None, 4, 1, 32),
    "verify_chain": (ForwardMode.TARGET_VERIFY, [6, 11], [5, 3],
                     [_chain_mask(5), _chain_mask(3)], 4, 2, 16),
    "verify_tree_and_causal": (ForwardMode.TARGET_VERIFY, [8, 3, 0], [6, 2, 4],
                               [_tree_mask([-1, 0, 0, 1, 1, 2]), None,
                                _tree_mask([-1, 0, 1, 0])], 6, 2, 16),
}


@needs_interpreter
@pytest.mark.parametrize("case", sorted(BACKEND_CASES))
def test_triton_backend_matches_torch_native(case: str) -> None:
    from dspark_sglang.layers.attention.triton_backend import TritonAttnBackend

    mode, prefix_lens, ext_lens, masks, heads, kv_heads, head_dim = BACKEND_CASES[case]
    fb_ref, pool_ref = _make_batch(mode, prefix_lens, ext_lens, masks, kv_heads, head_dim, 1)
    fb_tri, pool_tri = _make_batch(mode, prefix_lens, ext_lens, masks, kv_heads, head_dim, 1)
    gen = torch.Generator().manual_seed(2)
    n = sum(ext_lens)
    q = torch.randn(n, heads, head_dim, generator=gen)
    k = torch.randn(n, kv_heads, head_dim, generator=gen)
    v = torch.randn(n, kv_heads, head_dim, generator=gen)
    scale = head_dim**-0.5

    ref = TorchNativeAttnBackend()
    ref.init_forward_metadata(fb_ref)
    want = ref.forward(q, k, v, 0, fb_ref, pool_ref, scale)
    tri = TritonAttnBackend(device="cpu")
    tri.init_forward_metadata(fb_tri)
    got = tri.forward(q, k, v, 0, fb_tri, pool_tri, scale)

    assert got.shape == (n, heads, head_dim) and got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # the new tokens' K/V were stored at out_cache_loc, nothing else changed
    torch.testing.assert_close(pool_tri.k_bufs[0], pool_ref.k_bufs[0], rtol=0, atol=0)
    torch.testing.assert_close(pool_tri.v_bufs[0][fb_tri.out_cache_loc], v, rtol=0, atol=0)
    # the mask matters: a different tree would give a different answer
    if masks is not None and any(m is not None and not torch.equal(m, _chain_mask(m.shape[0]))
                                 for m in masks):
        fb_causal, pool_causal = _make_batch(mode, prefix_lens, ext_lens, None, kv_heads,
                                             head_dim, 1)
        tri.init_forward_metadata(fb_causal)
        causal = tri.forward(q, k, v, 0, fb_causal, pool_causal, scale)
        assert (causal - got).abs().max().item() > 1e-3


@needs_interpreter
def test_triton_backend_with_bf16_pool_and_host_metadata() -> None:
    """bf16 pool (the GPU serving dtype): q is cast to the pool dtype, output returns in q's."""
    from dspark_sglang.layers.attention.triton_backend import TritonAttnBackend

    fb, pool = _make_batch(ForwardMode.EXTEND, [3, 12], [5, 2], None, 2, 16, 3)
    pool_bf = KVPool(1, pool.k_bufs[0].shape[0] - 1, 2, 16, torch.bfloat16)
    pool_bf.k_bufs[0].copy_(pool.k_bufs[0])
    pool_bf.v_bufs[0].copy_(pool.v_bufs[0])
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(7, 4, 16, generator=gen).to(torch.bfloat16)
    k = torch.randn(7, 2, 16, generator=gen).to(torch.bfloat16)
    v = torch.randn(7, 2, 16, generator=gen).to(torch.bfloat16)
    ref = TorchNativeAttnBackend()
    ref.init_forward_metadata(fb)
    want = ref.forward(q, k, v, 0, fb, pool_bf, 0.25)
    tri = TritonAttnBackend()
    tri.init_forward_metadata(fb)
    got = tri.forward(q, k, v, 0, fb, pool_bf, 0.25)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max().item() <= 2e-2


@needs_interpreter
def test_engine_with_triton_backend_matches_torch_native(tmp_path: Path) -> None:
    from dspark_sglang import Engine
    from dspark_sglang.benchmark.tiny_model import make_tiny_model

    make_tiny_model(tmp_path, layers=2, hidden=32, heads=2, kv_heads=1, vocab_size=384)
    prompts = ["The quick brown fox", "def add(a, b):"]
    params = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    outputs: dict[str, list[list[int]]] = {}
    for backend in ("torch_native", "triton"):
        engine = Engine(model_path=str(tmp_path), attention_backend=backend, dtype="float32",
                        max_total_tokens=256, max_running_requests=2)
        try:
            outs: list[dict[str, Any]] = engine.generate(prompts, params)
            outputs[backend] = [o["output_ids"] for o in outs]
        finally:
            engine.shutdown()
    assert all(len(ids) == 4 for ids in outputs["torch_native"])
    assert outputs["triton"] == outputs["torch_native"]


# ------------------------------------------------------------------------------- CUDA graphs


def _tiny_runner(backend: str) -> Any:
    from dspark_sglang.benchmark.tiny_model import random_state_dict, tiny_config
    from dspark_sglang.model_executor.model_runner import ModelRunner
    from dspark_sglang.models.llama import LlamaForCausalLM

    cfg = tiny_config(layers=2, hidden=32, heads=2, kv_heads=1, vocab_size=64)
    model = LlamaForCausalLM(cfg, max_positions=128)
    model.load_hf_state_dict(random_state_dict(cfg, seed=5), torch.float32)
    return ModelRunner(model.eval(), 64, torch.float32, backend, "cpu")


def _decode_and_verify_batches(r2t: torch.Tensor) -> list[ForwardBatch]:
    """A DECODE batch of 3 requests and a TARGET_VERIFY batch of 2 x 3 tokens (tree masks) over
    prefixes whose K/V the caller has written (rows 1, 4, 2 of r2t; slots 1..)."""
    from dspark_sglang.model_executor.model_runner import BatchRequestSpec, build_forward_batch

    decode = build_forward_batch(ForwardMode.DECODE, [
        BatchRequestSpec(1, [7], 5, torch.tensor([40])),
        BatchRequestSpec(4, [9], 3, torch.tensor([41])),
        BatchRequestSpec(2, [11], 8, torch.tensor([42])),
    ], r2t)
    tree = _tree_mask([-1, 0, 0])
    verify = build_forward_batch(ForwardMode.TARGET_VERIFY, [
        BatchRequestSpec(1, [3, 4, 5], 6, torch.tensor([43, 44, 45]), tree, [6, 7, 7]),
        BatchRequestSpec(4, [6, 8, 1], 4, torch.tensor([46, 47, 48]), _chain_mask(3)),
    ], r2t)
    return [decode, verify]


def _fill_prefixes(runner: Any, r2t: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(6)
    for layer in range(runner.kv_pool.num_layers):
        runner.kv_pool.k_bufs[layer].copy_(torch.randn(runner.kv_pool.k_bufs[layer].shape,
                                                       generator=gen))
        runner.kv_pool.v_bufs[layer].copy_(torch.randn(runner.kv_pool.v_bufs[layer].shape,
                                                       generator=gen))
    for row, first in ((1, 1), (4, 12), (2, 20)):
        r2t[row, :10] = torch.arange(first, first + 10)


def test_cuda_graph_runner_is_off_on_cpu() -> None:
    from dspark_sglang.model_executor.cuda_graph import CudaGraphRunner

    runner = _tiny_runner("torch_native")
    r2t = torch.zeros(6, 32, dtype=torch.int64)
    fb = _decode_and_verify_batches(r2t)[0]
    graphs = CudaGraphRunner(runner)
    assert not graphs.enabled and not graphs.can_run(fb)
    with pytest.raises(ValueError, match="can_run"):
        graphs.replay(fb)


@needs_interpreter
def test_cuda_graph_static_path_matches_eager() -> None:
    """The graph runner's static buffers (padding, table copy, masks) without capture, on CPU:
    same logits as a plain forward, and the pool gets the same K/V."""
    from dspark_sglang.model_executor.cuda_graph import CudaGraphRunner

    eager, static = _tiny_runner("triton"), _tiny_runner("triton")
    r2t = torch.zeros(6, 32, dtype=torch.int64)
    _fill_prefixes(eager, r2t)
    _fill_prefixes(static, r2t)
    graphs = CudaGraphRunner(static, capture_bs=(2, 4), verify_lens=(3,), max_context=32,
                             use_graphs=False)
    assert graphs.enabled and not CudaGraphRunner(static, disable=True).enabled
    for fb in _decode_and_verify_batches(r2t):
        # rows of r2t must name the new tokens' slots after the prefix
        for i, row in enumerate(fb.req_pool_indices.tolist()):
            p, e = fb.prefix_lens_list[i], fb.extend_lens_list[i]
            r2t[row, p : p + e] = fb.out_cache_loc[sum(fb.extend_lens_list[:i]):][:e]
        assert graphs.can_run(fb)
        want = eager.forward(fb).logits
        got = graphs.replay(fb).logits
        assert got is not None and want is not None and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(static.kv_pool.k_bufs[1][1:], eager.kv_pool.k_bufs[1][1:])
    assert graphs.num_replays == 2 and len(graphs._graphs) == 2
    unequal = _decode_and_verify_batches(r2t)[1]
    unequal.extend_lens_list = [3, 2]
    assert not graphs.can_run(unequal)


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETED, reason="the Triton tests ran in this process")
def test_triton_in_fresh_process() -> None:
    """Only when triton was imported without the interpreter before this module: rerun the
    Triton tests in a process where TRITON_INTERPRET=1 is set first."""
    from tests.conftest import rerun_with_triton_interpreter

    rerun_with_triton_interpreter(__file__, allow_skips=True)


def test_auto_backend_resolves_per_machine(monkeypatch) -> None:
    import dspark_kernels.cpu_ops as cpu_ops
    from dspark_sglang.layers.attention.registry import resolve_attention_backend

    assert resolve_attention_backend("torch_native", "cpu", torch.float32) == "torch_native"
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16) == "torch_native"
    assert resolve_attention_backend("auto", "cuda", torch.float32) == "torch_native"
    want = "cpu" if cpu_ops.load_cpu_ops() is not None else "torch_native"
    assert resolve_attention_backend("auto", "cpu", torch.float32) == want
    monkeypatch.setenv("DSPARK_CPU_KERNELS", "0")  # no kernels: the torch reference path
    assert resolve_attention_backend("auto", "cpu", torch.float32) == "torch_native"


def test_engine_reports_the_resolved_backend(make_engine, llama_dir) -> None:
    from dspark_sglang.layers.attention.registry import resolve_attention_backend

    e = make_engine(llama_dir)
    info = e.get_server_info()
    assert info["attention_backend"] == resolve_attention_backend("auto", "cpu", torch.float32)
