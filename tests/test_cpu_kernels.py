"""C++ CPU kernels (``dspark_kernels.cpu_ops``) against their torch references.

- GGUF few-row matmul on Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K blocks vs a float32 matmul on the
  weights dequantised by the ``gguf`` package, for every row count 1..32;
- paged decode/verify attention vs the torch-native SDPA backend on random pools (shuffled slots,
  GQA, chains, trees, causal);
- engines on the ``cpu`` attention backend and on GGUF-quantised linears give the same greedy
  tokens as the reference paths.

The extension is compiled once per machine (about a minute, cached under the cache dir); the
tests skip when it cannot be built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dspark_kernels import hugepages
from dspark_kernels.cpu_ops import (
    GGML_BLOCKS,
    GGML_TYPES,
    Q8_TYPES,
    gguf_dequantize_ref,
    gguf_matmul,
    gguf_matmul_q8,
    gguf_matmul_q8_ref,
    gguf_matmul_ref,
    gguf_repack_q8,
    load_cpu_ops,
    quantize_rows_q8_ref,
)

ops = load_cpu_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")

# byte offsets of the float16 scale fields inside one block, per format
_F16_FIELDS = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}


def random_gguf_rows(ggml_type: int, n: int, k: int, seed: int) -> torch.Tensor:
    """[n, row_bytes] uint8 of random blocks with finite, moderate float16 scales."""
    elems, nbytes = GGML_BLOCKS[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    if ggml_type == GGML_TYPES["Q8_0"]:  # llama.cpp's Q8_0 values are in [-127, 127]
        blocks[blocks == 128] = 129
    for i, off in enumerate(_F16_FIELDS[ggml_type]):
        lo, hi = (0.002, 0.03) if i == 0 else (-0.05, 0.05)
        scales = rng.uniform(lo, hi, size=(n, k // elems)).astype(np.float16)
        blocks[:, :, off:off + 2] = scales.view(np.uint8).reshape(n, k // elems, 2)
    return torch.from_numpy(blocks.reshape(n, -1).copy())


@needs_ops
@pytest.mark.parametrize("fmt", sorted(GGML_TYPES))
def test_dequantize_matches_gguf_package(fmt: str) -> None:
    t = GGML_TYPES[fmt]
    w = random_gguf_rows(t, 24, 512, seed=t)
    got = ops.gguf_dequantize(w, t, 512)
    want = gguf_dequantize_ref(w, t, 512)
    assert want.abs().max() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@needs_ops
@pytest.mark.parametrize("fmt", sorted(GGML_TYPES))
def test_gguf_matmul_matches_dequantized_float32_every_row_count(fmt: str) -> None:
    t = GGML_TYPES[fmt]
    n, k = 200, 768  # n not a multiple of the thread grain; k spans 3 K-quant superblocks
    w = random_gguf_rows(t, n, k, seed=10 + t)
    w_f = gguf_dequantize_ref(w, t, k).double()
    gen = torch.Generator().manual_seed(t)
    x_all = torch.randn(32, k, generator=gen)
    one_row = gguf_matmul(x_all[:1], w, t)
    for m in range(1, 33):
        x = x_all[:m]
        got = gguf_matmul(x, w, t)
        want = (x.double() @ w_f.t())
        # float32 rounding of a k-term dot product, relative to the sum of |terms|
        bound = 1e-5 * (x.double().abs() @ w_f.abs().t()) + 1e-6
        assert got.shape == (m, n)
        assert bool(((got.double() - want).abs() <= bound).all()), (fmt, m)
        # a row's result does not depend on how many rows are in the call
        assert torch.equal(got[:1], one_row)


@needs_ops
def test_gguf_matmul_writes_only_its_columns_and_rejects_bad_shapes() -> None:
    t = GGML_TYPES["Q4_1"]
    w = random_gguf_rows(t, 16, 64, seed=3)
    x = torch.randn(3, 64)
    out = torch.full((3, 40), 7.0)
    gguf_matmul(x, w, t, out=out, col0=10)
    torch.testing.assert_close(out[:, 10:26], gguf_matmul_ref(x, w, t), rtol=1e-5, atol=1e-5)
    assert bool((out[:, :10] == 7).all()) and bool((out[:, 26:] == 7).all())
    with pytest.raises(RuntimeError, match="row bytes"):
        gguf_matmul(torch.randn(2, 96), w, t)
    with pytest.raises(RuntimeError, match="at most"):
        gguf_matmul(torch.randn(65, 64), w, t)


@needs_ops
@pytest.mark.parametrize("k", [768, 544])  # 24 and 17 blocks (an odd last block)
@pytest.mark.parametrize("t", Q8_TYPES)
def test_gguf_matmul_q8_matches_quantized_reference_every_row_count(t: int, k: int) -> None:
    n = 202  # not a multiple of the 16-row groups of the repacked layout (a padded last group)
    w = random_gguf_rows(t, n, k, seed=20 + t)
    w_f = gguf_dequantize_ref(w, t, k).double()
    gen = torch.Generator().manual_seed(t)
    x_all = torch.randn(32, k, generator=gen)
    x_all[3, 64:96] = 0.0  # an all-zero activation block (scale 0)
    one_row = gguf_matmul_q8(x_all[:1], w, t)
    for m in range(1, 33):
        x = x_all[:m]
        got = gguf_matmul_q8(x, w, t)
        want = gguf_matmul_q8_ref(x, w, t).double()
        bound = 1e-5 * (quantize_rows_q8_ref(x).double().abs() @ w_f.abs().t()) + 1e-6
        assert got.shape == (m, n)
        assert bool(((got.double() - want).abs() <= bound).all()), (t, m)
        assert torch.equal(got[:1], one_row)  # independent of the rows in the call
    # the activation quantisation error is small next to the float32 product
    exact = x_all.double() @ w_f.t()
    rel = (gguf_matmul_q8(x_all, w, t).double() - exact).norm() / exact.norm()
    assert float(rel) < 0.02


@needs_ops
@pytest.mark.parametrize("t", Q8_TYPES)
def test_gguf_matmul_q8_extreme_blocks_are_exact(t: int) -> None:
    """Every quantised activation at +-127 against the largest weights of the format: the
    kernels' integer sums (the AVX2 nibble path sums a block in int16) reach their largest
    values and must not wrap or saturate; the result is the exact integer dot scaled."""
    k, n = 256, 32
    elems, nbytes = GGML_BLOCKS[t]
    blocks = np.zeros((n, k // elems, nbytes), dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    blocks[:, :, 0:2] = scale  # d
    if t == GGML_TYPES["Q8_0"]:
        blocks[:, :, 2:] = np.uint8(127)  # q = +127
        blocks[1::2, :, 2:] = np.uint8(129)  # q = -127 on odd rows
    else:
        head = 4 if t == GGML_TYPES["Q4_1"] else 2
        if head == 4:
            blocks[:, :, 2:4] = np.array([0.0], dtype=np.float16).view(np.uint8)  # m
        blocks[:, :, head:] = np.uint8(0xFF)  # every nibble 15
        blocks[1::2, :, head:] = np.uint8(0x00)  # every nibble 0
    w = torch.from_numpy(blocks.reshape(n, -1).copy())
    x = torch.full((5, k), 3.0)
    x[1] = -3.0
    x[2, ::2] = -3.0  # alternating signs
    x[3, :32] = 0.0  # a zero block
    got = gguf_matmul_q8(x, w, t).double()
    want = quantize_rows_q8_ref(x).double() @ gguf_dequantize_ref(w, t, k).double().t()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


needs_amx = pytest.mark.skipif(ops is None or not ops.q8_amx_available(),
                               reason="no AMX tile unit here (or the kernel refused it)")


@needs_amx
@pytest.mark.parametrize("t", Q8_TYPES)
def test_gguf_matmul_q8_amx_is_bitwise_the_vnni_kernel(t: int) -> None:
    """The AMX path (tile integer sums, the VNNI kernel's float work) gives every output bitwise
    as the VNNI kernel does, for every row count 1..40 (16-row chunks and a partial one) and a
    group count that leaves 1 of the 3 groups per tile pass (13 groups, the last padded)."""
    n, k = 202, 544
    w = random_gguf_rows(t, n, k, seed=40 + t)
    x_all = torch.randn(40, k, generator=torch.Generator().manual_seed(4 + t))
    x_all[5, 32:64] = 0.0
    before = ops.q8_amx_min_rows(-1)
    try:
        for m in range(1, 41):
            x = x_all[:m]
            assert ops.q8_amx_min_rows(0) == 0
            vnni = gguf_matmul_q8(x, w, t)
            assert ops.q8_amx_min_rows(1, all_formats=True) == 1
            amx = gguf_matmul_q8(x, w, t)
            assert torch.equal(amx, vnni), (t, m)
        want = gguf_matmul_q8_ref(x_all, w, t)
        torch.testing.assert_close(amx, want, rtol=1e-5, atol=1e-4)
    finally:
        ops.q8_amx_min_rows(before)


@needs_ops
def test_gguf_matmul_q8_packed_layout_and_its_padding() -> None:
    """The repacked weights are a view of the first N rows of storage padded to 16-row groups;
    the kernel refuses a tensor whose storage is not padded (file-layout rows, N % 16 != 0)."""
    t, n, k = GGML_TYPES["Q4_1"], 37, 96
    w = random_gguf_rows(t, n, k, seed=3)
    packed = gguf_repack_q8(w, t)
    assert packed.shape == w.shape and packed.is_contiguous()
    assert packed.untyped_storage().nbytes() == 48 * w.shape[1]  # 3 groups of 16 rows
    x = torch.randn(5, k)
    torch.testing.assert_close(gguf_matmul_q8(x, packed, t, packed=True),
                               gguf_matmul_q8(x, w, t), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not padded"):
        gguf_matmul_q8(x, w, t, packed=True)


@needs_ops
def test_gguf_matmul_q8_rejects_other_formats() -> None:
    w = random_gguf_rows(GGML_TYPES["Q6_K"], 4, 256, seed=1)
    with pytest.raises(RuntimeError, match="Q4_0, Q4_1 or Q8_0"):
        gguf_matmul_q8(torch.randn(1, 256), w, GGML_TYPES["Q6_K"])


# ------------------------------------------------------------------------------ paged attention


def _tree_mask(parents: list[int]) -> torch.Tensor:
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i in range(len(parents)):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def _random_batch(mode: object, prefix_lens: list[int], ext_lens: list[int],
                  masks: list[torch.Tensor | None] | None, kv_heads: int, head_dim: int,
                  seed: int) -> tuple[object, object]:
    """ForwardBatch + one-layer pool with shuffled slots and req_to_token rows (random K/V)."""
    from dspark_sglang.core.forward_batch import ForwardBatch
    from dspark_sglang.mem_cache.kv_pool import KVPool

    gen = torch.Generator().manual_seed(seed)
    bs = len(prefix_lens)
    seqs = [p + e for p, e in zip(prefix_lens, ext_lens)]
    num_slots = sum(seqs) + 7
    pool = KVPool(1, num_slots, kv_heads, head_dim, torch.float32)
    pool.k_bufs[0].copy_(torch.randn(pool.k_bufs[0].shape, generator=gen))
    pool.v_bufs[0].copy_(torch.randn(pool.v_bufs[0].shape, generator=gen))
    slots = torch.randperm(num_slots, generator=gen)[:sum(seqs)] + 1
    rows = torch.randperm(bs + 3, generator=gen)[:bs]
    req_to_token = torch.zeros(bs + 3, max(seqs) + 5, dtype=torch.int64)
    out_loc, off = [], 0
    for i, (p, s) in enumerate(zip(prefix_lens, seqs)):
        req_to_token[rows[i], :s] = slots[off:off + s]
        out_loc.append(slots[off + p:off + s])
        off += s
    n = sum(ext_lens)
    fb = ForwardBatch(
        mode=mode, input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.cat([torch.arange(p, p + e) for p, e in zip(prefix_lens, ext_lens)]),
        out_cache_loc=torch.cat(out_loc), req_pool_indices=rows.clone(),
        seq_lens=torch.tensor(seqs), extend_lens=torch.tensor(ext_lens),
        req_to_token=req_to_token, custom_masks=masks, seq_lens_list=seqs,
        extend_lens_list=list(ext_lens))
    return fb, pool


def _attention_pair(mode: object, prefix_lens: list[int], ext_lens: list[int],
                    masks: list[torch.Tensor | None] | None, heads: int, kv_heads: int,
                    head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    from dspark_sglang.layers.attention.base import create_attention_backend
    from dspark_sglang.layers.attention.cpu_paged import PagedMetadata

    gen = torch.Generator().manual_seed(seed + 1000)
    n = sum(ext_lens)
    q = torch.randn(n, heads, head_dim, generator=gen)
    k = torch.randn(n, kv_heads, head_dim, generator=gen)
    v = torch.randn(n, kv_heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    outs = []
    pools = []
    for name in ("torch_native", "cpu"):
        fb, pool = _random_batch(mode, prefix_lens, ext_lens, masks, kv_heads, head_dim, seed)
        backend = create_attention_backend(name)
        backend.init_forward_metadata(fb)
        if name == "cpu":
            assert isinstance(fb.attn_metadata, PagedMetadata)
        outs.append(backend.forward(q, k, v, 0, fb, pool, scale))
        pools.append(pool)
    assert torch.equal(pools[0].k_bufs[0], pools[1].k_bufs[0])
    assert torch.equal(pools[0].v_bufs[0], pools[1].v_bufs[0])
    return outs[1], outs[0], fb


@needs_ops
@pytest.mark.parametrize("seed", range(12))
def test_paged_decode_matches_torch_native(seed: int) -> None:
    from dspark_sglang.core.forward_batch import ForwardMode

    rng = np.random.default_rng(seed)
    bs = int(rng.integers(1, 9))
    kv_heads = int(rng.choice([1, 2, 3]))
    heads = kv_heads * int(rng.choice([1, 2, 3, 4]))
    head_dim = int(rng.choice([16, 32, 64, 72, 128]))
    prefix = [int(x) for x in rng.integers(0, 200, size=bs)]
    got, want, _ = _attention_pair(ForwardMode.DECODE, prefix, [1] * bs, None, heads, kv_heads,
                                   head_dim, seed)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@needs_ops
@pytest.mark.parametrize("seed", range(12))
def test_paged_verify_chains_and_trees_match_torch_native(seed: int) -> None:
    from dspark_sglang.core.forward_batch import ForwardMode

    rng = np.random.default_rng(100 + seed)
    bs = int(rng.integers(1, 6))
    kv_heads = int(rng.choice([1, 2, 3]))
    heads = kv_heads * int(rng.choice([1, 3, 4]))
    head_dim = int(rng.choice([16, 64, 128]))
    prefix = [int(x) for x in rng.integers(0, 150, size=bs)]
    ext = [int(x) for x in rng.integers(1, 33, size=bs)]
    masks: list[torch.Tensor | None] = []
    for e in ext:
        kind = rng.integers(0, 3)
        if kind == 0:
            masks.append(None)  # causal
        elif kind == 1:
            masks.append(torch.ones(e, e, dtype=torch.bool).tril())
        else:
            masks.append(_tree_mask([-1] + [int(rng.integers(0, i)) for i in range(1, e)]))
    got, want, _ = _attention_pair(ForwardMode.TARGET_VERIFY, prefix, ext, masks, heads,
                                   kv_heads, head_dim, seed)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@needs_ops
def test_paged_verify_tree_mask_matters() -> None:
    from dspark_sglang.core.forward_batch import ForwardMode

    tree = [_tree_mask([-1, 0, 0, 1, 1, 2])]
    got_tree, want_tree, _ = _attention_pair(ForwardMode.TARGET_VERIFY, [9], [6], tree, 4, 2,
                                             32, 5)
    got_causal, _, _ = _attention_pair(ForwardMode.TARGET_VERIFY, [9], [6], None, 4, 2, 32, 5)
    torch.testing.assert_close(got_tree, want_tree, rtol=0, atol=2e-5)
    assert (got_tree - got_causal).abs().max().item() > 1e-3


def _decode_alone(backend: object, pool: object, keys: torch.Tensor, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Attention output of one token decoded alone over the key slots ``keys`` (its own last),
    laid out contiguously in a fresh request row: the reference a verified or prefilled token
    must equal bitwise."""
    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode

    n = keys.numel()
    table = torch.zeros(1, n + 3, dtype=torch.int64)
    table[0, :n] = keys
    one = ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=torch.zeros(1, dtype=torch.int64),
        positions=torch.tensor([n - 1]), out_cache_loc=keys[-1:].clone(),
        req_pool_indices=torch.tensor([0]), seq_lens=torch.tensor([n]),
        extend_lens=torch.tensor([1]), req_to_token=table, custom_masks=None,
        seq_lens_list=[n], extend_lens_list=[1])
    backend.init_forward_metadata(one)  # type: ignore[attr-defined]
    return backend.forward(q, k, v, 0, one, pool, head_dim ** -0.5)[0]  # type: ignore


@needs_ops
@pytest.mark.parametrize("seed", range(8))
def test_paged_verify_rows_are_bitwise_decode_alone(seed: int) -> None:
    """Each verified token's attention output is bitwise what decoding it alone over its
    visible keys laid out contiguously gives (the prefix, then its ancestors), for causal chains
    and trees, at prefix lengths around the key-tile size: speculative greedy output can only
    equal plain greedy output if this holds (quantised activations amplify any last bit)."""
    from dspark_sglang.core.forward_batch import ForwardMode
    from dspark_sglang.layers.attention.base import create_attention_backend

    rng = np.random.default_rng(300 + seed)
    kv_heads, g, head_dim = 3, 3, 64
    e = int(rng.choice([2, 5, 8, 16, 40, 64]))
    prefix = int(rng.choice([5, 60, 63, 64, 65, 120, 127, 130]))
    if seed % 2:
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, e)]
        masks: list[torch.Tensor | None] | None = [_tree_mask(parents)]
    else:
        parents = list(range(-1, e - 1))
        masks = None
    fb, pool = _random_batch(ForwardMode.TARGET_VERIFY, [prefix], [e], masks, kv_heads,
                             head_dim, seed)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(e, kv_heads * g, head_dim, generator=gen)
    k = torch.randn(e, kv_heads, head_dim, generator=gen)
    v = torch.randn(e, kv_heads, head_dim, generator=gen)
    backend = create_attention_backend("cpu")
    backend.init_forward_metadata(fb)
    got = backend.forward(q, k, v, 0, fb, pool, head_dim ** -0.5)
    row_slots = fb.req_to_token[fb.req_pool_indices[0]]
    for i in range(e):
        chain, j = [], i
        while j >= 0:
            chain.append(j)
            j = parents[j]
        chain.reverse()  # ancestors, then the token itself
        keys = torch.cat([row_slots[:prefix], row_slots[prefix + torch.tensor(chain)]])
        alone = _decode_alone(backend, pool, keys, q[i:i + 1], k[i:i + 1], v[i:i + 1],
                              head_dim)
        assert torch.equal(alone, got[i]), (i, prefix, e, (alone - got[i]).abs().max())


@needs_ops
@pytest.mark.parametrize("prefix,ext", [(0, 70), (5, 40), (64, 17), (130, 64)])
def test_paged_extend_rows_are_bitwise_decode_alone(prefix: int, ext: int) -> None:
    """With ``extend_on_kernel`` a prefill chunk's tokens are each bitwise the token decoded
    alone on the same keys (and close to SDPA), so a token's result does not depend on how
    prompts are batched or chunked."""
    from dspark_sglang.core.forward_batch import ForwardMode
    from dspark_sglang.layers.attention.base import create_attention_backend
    from dspark_sglang.layers.attention.cpu_paged import PagedMetadata

    kv_heads, g, head_dim = 3, 3, 64
    gen = torch.Generator().manual_seed(prefix + ext)
    q = torch.randn(ext + 3, kv_heads * g, head_dim, generator=gen)
    k = torch.randn(ext + 3, kv_heads, head_dim, generator=gen)
    v = torch.randn(ext + 3, kv_heads, head_dim, generator=gen)
    fb, pool = _random_batch(ForwardMode.EXTEND, [prefix, 2], [ext, 3], None, kv_heads,
                             head_dim, 7)
    backend = create_attention_backend("cpu")
    backend.extend_on_kernel = True
    backend.init_forward_metadata(fb)
    assert isinstance(fb.attn_metadata, PagedMetadata)
    got = backend.forward(q, k, v, 0, fb, pool, head_dim ** -0.5)
    fb2, pool2 = _random_batch(ForwardMode.EXTEND, [prefix, 2], [ext, 3], None, kv_heads,
                               head_dim, 7)
    ref = create_attention_backend("torch_native")
    ref.init_forward_metadata(fb2)
    want = ref.forward(q, k, v, 0, fb2, pool2, head_dim ** -0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    row_slots = fb.req_to_token[fb.req_pool_indices[0]]
    for i in range(ext):
        alone = _decode_alone(backend, pool, row_slots[:prefix + i + 1], q[i:i + 1],
                              k[i:i + 1], v[i:i + 1], head_dim)
        assert torch.equal(alone, got[i]), (i, prefix, ext)


def test_cpu_backend_falls_back_to_sdpa_for_extend_and_without_kernels(monkeypatch) -> None:
    from dspark_sglang.core.forward_batch import ForwardMode
    from dspark_sglang.layers.attention.cpu_paged import CpuPagedAttnBackend
    from dspark_sglang.layers.attention.torch_native import TorchNativeMetadata

    fb, _ = _random_batch(ForwardMode.EXTEND, [3, 0], [5, 4], None, 2, 16, 0)
    backend = CpuPagedAttnBackend()
    backend.init_forward_metadata(fb)
    assert isinstance(fb.attn_metadata, TorchNativeMetadata)
    fb, _ = _random_batch(ForwardMode.TARGET_VERIFY, [3], [65], None, 2, 16, 0)
    backend.init_forward_metadata(fb)  # longer than a verify chain: SDPA
    assert isinstance(fb.attn_metadata, TorchNativeMetadata)
    backend.ops = None  # as when the extension cannot be built
    fb, _ = _random_batch(ForwardMode.DECODE, [3], [1], None, 2, 16, 0)
    backend.init_forward_metadata(fb)
    assert isinstance(fb.attn_metadata, TorchNativeMetadata)


@needs_ops
@pytest.mark.parametrize("algo", ["NONE", "TREE", "DSPARK"])
def test_engine_greedy_on_cpu_backend_equals_torch_native(make_engine, llama_dir, drafter_dir,
                                                          algo: str) -> None:
    from tests.conftest import PROMPTS, greedy

    ref = make_engine(llama_dir, attention_backend="torch_native")
    want = [o["output_ids"] for o in ref.generate(PROMPTS, greedy(16))]
    kw: dict[str, object] = {}
    if algo != "NONE":
        kw = {"speculative_algorithm": algo, "speculative_draft_model_path": drafter_dir,
              "speculative_dspark_disable_draft_budget": True}
    eng = make_engine(llama_dir, attention_backend="cpu", **kw)
    got = [o["output_ids"] for o in eng.generate(PROMPTS, greedy(16))]
    assert got == want
    if algo != "NONE":
        assert eng.get_server_info()["spec_stats"]["steps"] > 0


def test_csrc_ships_with_the_package() -> None:
    from pathlib import Path

    from dspark_kernels import cpu_ops

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'dspark_kernels = ["csrc/*.cpp", "csrc/*.h"]' in text
    assert all((cpu_ops.CSRC / name).is_file() for name in cpu_ops.SOURCES)
    assert cpu_ops.cpu_isa() in ("avx512amx", "avx512vnni", "avx512", "avx2", "scalar")


# ------------------------------------------------------------------------ GGUF-block linears


@needs_ops
def test_gguf_linear_paths_and_shared_weight() -> None:
    from dspark_sglang.layers.linear import Linear
    from dspark_sglang.layers.quantized_linear import GGUFLinear, GGUFWeight

    t = GGML_TYPES["Q4_1"]
    wa, wb = random_gguf_rows(t, 48, 96, 1), random_gguf_rows(GGML_TYPES["Q8_0"], 16, 96, 2)
    w_f = torch.cat([gguf_dequantize_ref(wa, t, 96), gguf_dequantize_ref(wb, 8, 96)])
    base = Linear(96, 64, bias=True)
    with torch.no_grad():
        base.weight.copy_(w_f)
    lin = GGUFLinear(base, [GGUFWeight(t, wa, 96), GGUFWeight(8, wb, 96)], ops)
    assert lin.weight is base.weight and lin.bias is base.bias  # float copy kept, shared
    x = torch.randn(2, 5, 96)
    calls = []
    real = lin.quant_forward
    lin.quant_forward = lambda x2d: calls.append(x2d.shape[0]) or real(x2d)  # type: ignore
    with torch.no_grad():  # Q4_1 and Q8_0 parts: Q8-quantised activations
        xq = quantize_rows_q8_ref(x.reshape(-1, 96)).reshape(x.shape)
        want = torch.nn.functional.linear(xq, w_f, base.bias)
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
        assert calls == [10]
        lin(torch.randn(40, 96))  # more rows than the block kernel takes: float32 path
        assert calls == [10]
    x.requires_grad_(True)
    lin(x).sum().backward()  # autograd goes through the float path
    assert calls == [10] and x.grad is not None
    lin.max_quant_rows = 0
    with torch.no_grad():
        lin(x)
    assert calls == [10]


@needs_ops
@pytest.mark.parametrize("arch,quant,tied,act_q8", [
    ("llama", "Q4_1", True, False), ("qwen2", "Q8_0", False, False),
    ("qwen3", "Q4_0", True, False), ("llama", "Q4_1", True, True)])
def test_engine_on_gguf_blocks_matches_float_weights(make_engine, tmp_path, monkeypatch,
                                                     arch: str, quant: str, tied: bool,
                                                     act_q8: bool) -> None:
    """Float activations on the blocks: the float-weight engine's tokens. Q8 activations
    (llama.cpp's arithmetic, the default): their own tokens, identical under DSPARK."""
    from pathlib import Path

    from dspark_sglang.benchmark.tiny_model import make_tiny_model
    from dspark_sglang.layers.quantized_linear import GGUFLinear
    from tests.conftest import PROMPTS, greedy, random_drafter_for
    from tests.test_loader import write_tiny_gguf

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DSPARK_GGUF_MAX_ROWS", "32")  # no timing: always the block kernel
    monkeypatch.setenv("DSPARK_GGUF_ACT_Q8", "1" if act_q8 else "0")
    hf = tmp_path / "hf"
    make_tiny_model(hf, arch=arch, layers=2, hidden=64, heads=4, kv_heads=2, seed=5,
                    tie_word_embeddings=tied)
    gguf_path = tmp_path / "m.gguf"
    write_tiny_gguf(hf, gguf_path, quant=quant)
    plain = make_engine(str(gguf_path), quantization="none")
    want = [o["output_ids"] for o in plain.generate(PROMPTS, greedy(12))]
    eng = make_engine(str(gguf_path), quantization="gguf", attention_backend="cpu")
    model = eng.parts.runner.model
    layer = model.layers[0]
    assert all(isinstance(m, GGUFLinear) for m in (layer.qkv_proj, layer.o_proj,
                                                    layer.gate_up_proj, layer.down_proj))
    assert isinstance(model.lm_head, GGUFLinear)
    if tied:  # the float head is the (tied) embedding, still readable as lm_head.weight
        assert model.lm_head.weight is model.embed_tokens.weight
    assert all(m.act_q8 == act_q8 for m in model.modules() if isinstance(m, GGUFLinear))
    got = [o["output_ids"] for o in eng.generate(PROMPTS, greedy(12))]
    if act_q8:
        assert [len(g) for g in got] == [len(w) for w in want]
        want = got  # Q8 activations may flip near-ties; speculation must reproduce them exactly
    assert got == want
    # speculative verification on the same blocks gives the same tokens
    drafter = random_drafter_for(str(hf), Path(tmp_path / "drafter"))
    spec = make_engine(str(gguf_path), quantization="gguf", attention_backend="cpu",
                       speculative_algorithm="DSPARK", speculative_draft_model_path=drafter,
                       speculative_dspark_disable_draft_budget=True)
    assert [o["output_ids"] for o in spec.generate(PROMPTS, greedy(12))] == want


def test_stale_build_lock_is_removed_fresh_one_kept(tmp_path) -> None:
    """A build killed mid-way leaves torch's ``lock`` file; torch waits for it forever."""
    import os
    import time

    from dspark_kernels.cpu_ops import clear_stale_build_lock

    assert not clear_stale_build_lock(tmp_path)  # no lock: nothing to do
    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_build_lock(tmp_path) and lock.exists()  # a build in progress
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_build_lock(tmp_path) and not lock.exists()


def test_sps_cache_key_tells_quantized_models_apart() -> None:
    """An SPS table profiled on float32 weights must not be reused for GGUF block kernels."""
    from types import SimpleNamespace

    from dspark_sglang.speculative.sps_runtime import _sps_cache_path

    class Q(torch.nn.Linear):
        def __init__(self, rows: int, act_q8: bool) -> None:
            super().__init__(4, 4)
            self.max_quant_rows, self.act_q8 = rows, act_q8

        def quant_forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def runner(model: torch.nn.Module) -> SimpleNamespace:
        return SimpleNamespace(dtype=torch.float32, device="cpu", attn=object(), model=model)

    plain = _sps_cache_path("m", runner(torch.nn.Linear(4, 4)))
    q8 = _sps_cache_path("m", runner(Q(32, True)))
    f32act = _sps_cache_path("m", runner(Q(32, False)))
    off = _sps_cache_path("m", runner(Q(0, True)))
    assert len({plain, q8, f32act, off}) == 4
    assert q8 == _sps_cache_path("m", runner(Q(32, True)))


def test_amx_build_failure_falls_back_to_the_vnni_build(monkeypatch) -> None:
    """A compiler without the AMX intrinsics must not cost the whole extension: the VNNI build
    of the same sources is used instead."""
    from types import SimpleNamespace

    import dspark_kernels.cpu_ops as cpu_ops

    built = []

    def fake_build(isa: str):  # type: ignore[no-untyped-def]
        built.append(isa)
        return None if isa == "avx512amx" else SimpleNamespace(isa=lambda: isa)

    monkeypatch.setattr(cpu_ops, "cpu_isa", lambda: "avx512amx")
    monkeypatch.setattr(cpu_ops, "_build", fake_build)
    monkeypatch.setattr(cpu_ops, "kernels_enabled", lambda: True)
    assert cpu_ops.load_cpu_ops().isa() == "avx512vnni"
    assert built == ["avx512amx", "avx512vnni"]


def test_sps_cache_key_changes_with_the_kernel_build(monkeypatch) -> None:
    """A table profiled with one build of the C++ kernels must not be reused by another (a
    faster kernel makes the old table overprice verification)."""
    from types import SimpleNamespace

    import dspark_kernels.cpu_ops as cpu_ops
    from dspark_sglang.speculative.sps_runtime import _sps_cache_path

    runner = SimpleNamespace(dtype=torch.float32, device="cpu", attn=object(),
                             model=torch.nn.Linear(4, 4))
    keys = set()
    for name in ("dspark_cpu_ops_avx2_a", "dspark_cpu_ops_avx2_b", None):
        monkeypatch.setattr(cpu_ops, "load_cpu_ops",
                            lambda n=name: SimpleNamespace(__name__=n) if n else None)
        keys.add(_sps_cache_path("m", runner))
    assert len(keys) == 3


@needs_ops
def test_q8_layers_take_every_row_count_in_chunks(monkeypatch) -> None:
    """Layers whose parts all have the Q8 kernel run it at any row count (so decode, verify and
    big batches agree); K-quant layers keep the timed choice up to MAX_QUANT_ROWS."""
    from dspark_sglang.layers.linear import Linear
    from dspark_sglang.layers.quantized_linear import (
        ALL_ROWS,
        KERNEL_ROWS,
        MAX_QUANT_ROWS,
        GGUFLinear,
        GGUFWeight,
        choose_quant_rows,
    )

    monkeypatch.delenv("DSPARK_GGUF_MAX_ROWS", raising=False)
    t4, t6 = GGML_TYPES["Q4_1"], GGML_TYPES["Q6_K"]
    w4 = random_gguf_rows(t4, 40, 256, 5)
    w6 = random_gguf_rows(t6, 24, 256, 6)
    q8 = GGUFLinear(Linear(256, 40, bias=False), [GGUFWeight(t4, w4, 256)], ops)
    kq = GGUFLinear(Linear(256, 24, bias=False), [GGUFWeight(t6, w6, 256)], ops)
    choose_quant_rows([q8, kq])
    assert q8.max_quant_rows == ALL_ROWS and kq.max_quant_rows in (0, MAX_QUANT_ROWS)
    x = torch.randn(2 * KERNEL_ROWS + 7, 256)
    with torch.no_grad():
        y = q8(x)
        rows = torch.cat([q8(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(y, rows)  # chunked = row by row, bit for bit
    torch.testing.assert_close(y, gguf_matmul_q8_ref(x, w4, t4), rtol=1e-4, atol=1e-4)


@needs_ops
@pytest.mark.parametrize("float_prefill", [False, True])
def test_prefill_on_blocks_or_float(make_engine, tmp_path, monkeypatch,
                                    float_prefill: bool) -> None:
    """On GGUF blocks the runner runs prefill (EXTEND) on the blocks and the paged attention
    kernel too (row-independent forwards), unless ``DSPARK_FLOAT_PREFILL=1``: then EXTEND takes
    float32 weights and SDPA, DECODE / TARGET_VERIFY stay on the blocks."""
    from dspark_sglang.benchmark.tiny_model import make_tiny_model
    from dspark_sglang.layers.attention.cpu_paged import PagedMetadata
    from dspark_sglang.layers.quantized_linear import GGUFLinear, float_weights
    from tests.conftest import greedy
    from tests.test_loader import write_tiny_gguf

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DSPARK_FLOAT_PREFILL", "1" if float_prefill else "0")
    hf = tmp_path / "hf"
    make_tiny_model(hf, arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, seed=5)
    gguf_path = tmp_path / "m.gguf"
    write_tiny_gguf(hf, gguf_path, quant="Q4_1")
    eng = make_engine(str(gguf_path), quantization="auto")  # auto -> gguf for a GGUF file
    runner = eng.parts.runner
    assert runner.quantization == "gguf" and runner.float_prefill == float_prefill
    assert runner.attn.extend_on_kernel == (not float_prefill)
    head = runner.model.lm_head
    assert isinstance(head, GGUFLinear)
    calls: list[int] = []
    real = head.quant_forward
    head.quant_forward = lambda x2d: calls.append(x2d.shape[0]) or real(x2d)  # type: ignore
    kinds: list[bool] = []
    real_forward = runner.model.forward

    def spy(fb, attn, pool):  # type: ignore[no-untyped-def]
        out = real_forward(fb, attn, pool)
        kinds.append(isinstance(fb.attn_metadata, PagedMetadata))
        return out

    runner.model.forward = spy
    eng.generate(["hello there"], greedy(5))
    # 4 decode steps on the blocks, plus the prefill's last-token logits unless float
    assert len(calls) == (4 if float_prefill else 5)
    assert kinds[0] == (not float_prefill) and all(kinds[1:])
    with torch.no_grad(), float_weights():
        head(torch.randn(1, 64))
    assert len(calls) == (4 if float_prefill else 5)


@needs_ops
def test_q8_linear_and_subset_rows() -> None:
    """A float linear on Q8_0 blocks it quantised itself is close to float32 (Q8 rounding);
    a row subset of a block layer computes bitwise those rows of the full layer's output."""
    from dspark_sglang.layers.linear import Linear
    from dspark_sglang.layers.quantized_linear import GGUFLinear, q8_linear, subset_rows

    ops = load_cpu_ops()
    torch.manual_seed(0)
    base = Linear(96, 40, bias=False)
    torch.nn.init.normal_(base.weight, std=0.2)
    layer = q8_linear(base, ops, max_rows=8)
    assert isinstance(layer, GGUFLinear) and layer.parts[0].ggml_type == 8
    x = torch.randn(5, 96)
    with torch.no_grad():
        want = x @ base.weight.t()
        got = layer(x)
        calls: list[int] = []
        real = layer.quant_forward
        layer.quant_forward = lambda x2d: calls.append(x2d.shape[0]) or real(x2d)  # type: ignore
        layer(x)
        layer(torch.randn(9, 96))  # more than max_rows: the float path
    assert calls == [5]
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.02, rel
    rows = torch.tensor([3, 0, 17, 39, 8])
    sub = subset_rows(layer, rows)
    assert sub is not None
    with torch.no_grad():
        assert torch.equal(sub(x), layer(x)[:, rows])


@needs_ops
def test_same_format_parts_merge_into_one_block_matrix() -> None:
    """q/k/v (or gate/up) parts in one format become one block matrix (one kernel call) with
    the outputs of the separate parts, in order."""
    from dspark_sglang.layers.linear import Linear
    from dspark_sglang.layers.quantized_linear import GGUFLinear, GGUFWeight

    t = GGML_TYPES["Q4_1"]
    ws = [random_gguf_rows(t, n, 64, seed) for n, seed in ((8, 1), (4, 2), (4, 3))]
    base = Linear(64, 16, bias=False)
    lin = GGUFLinear(base, [GGUFWeight(t, w, 64) for w in ws], ops)
    assert len(lin.parts) == 1 and lin.parts[0].data.shape[0] == 16
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = lin.quant_forward(x)
    want = torch.cat([gguf_matmul_q8(x, w, t) for w in ws], dim=1)
    assert torch.equal(got, want)


# -------------------------------------------------------------------------- fused layer ops


@needs_ops
@pytest.mark.parametrize("n", [1, 3, 70])
def test_rms_norm_and_silu_mul_match_torch(n: int) -> None:
    from dspark_kernels.cpu_ops import rms_norm, rms_norm_ref, silu_mul, silu_mul_ref

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 576, generator=g) * 3
    w = torch.rand(576, generator=g) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5),
                               rtol=2e-6, atol=2e-6)
    gu = torch.randn(n, 2 * 200, generator=g) * 4  # intermediate not a multiple of 16
    torch.testing.assert_close(silu_mul(gu), silu_mul_ref(gu), rtol=2e-6, atol=2e-6)
    # a row's result does not depend on the other rows of the call
    assert torch.equal(rms_norm(x[-1:], w, 1e-5)[0], rms_norm(x, w, 1e-5)[-1])
    assert torch.equal(silu_mul(gu[-1:])[0], silu_mul(gu)[-1])


@needs_ops
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope_store_matches_unfused_layer_code(qk_norm: bool) -> None:
    from dspark_kernels.cpu_ops import qkv_rope_store, qkv_rope_store_ref
    from dspark_sglang.layers.rotary import RotaryEmbedding

    heads, kv_heads, d, n, slots = 6, 2, 64, 5, 40
    g = torch.Generator().manual_seed(int(qk_norm))
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin = RotaryEmbedding(d, 256, 10000.0).cos_sin(torch.tensor([0, 7, 8, 100, 255]),
                                                         torch.float32)
    qn = torch.rand(d, generator=g) + 0.5 if qk_norm else None
    kn = torch.rand(d, generator=g) + 0.5 if qk_norm else None
    loc = torch.randperm(slots, generator=g)[:n]
    bufs = [torch.zeros(slots, kv_heads, d) for _ in range(4)]
    q = qkv_rope_store(qkv, cos, sin, qn, kn, 1e-6, bufs[0], bufs[1], loc, heads, kv_heads)
    q_ref = qkv_rope_store_ref(qkv, cos, sin, qn, kn, 1e-6, bufs[2], bufs[3], loc, heads,
                               kv_heads)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bufs[0], bufs[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(bufs[1], bufs[3])  # v is copied
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc] = False
    assert bufs[0][untouched].abs().sum() == 0 and bufs[0][loc].abs().sum() > 0
    with pytest.raises(RuntimeError, match="out of range"):
        qkv_rope_store(qkv, cos, sin, qn, kn, 1e-6, bufs[0], bufs[1], loc + slots, heads,
                       kv_heads)


@needs_ops
def test_fused_layer_path_runs_and_matches_unfused(make_engine, llama_dir, monkeypatch) -> None:
    """The engine's decode/verify forwards on the ``cpu`` backend take the fused path (counted
    here), and give the greedy tokens of the same engine with the fused path off."""
    from dspark_sglang.layers.attention import cpu_paged
    from dspark_sglang.models import llama
    from tests.conftest import PROMPTS, greedy

    calls = {"fused": 0}
    real = llama.DecoderLayer.forward_fused

    def counting(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls["fused"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(llama.DecoderLayer, "forward_fused", counting)
    eng = make_engine(llama_dir, attention_backend="cpu")
    got = [o["output_ids"] for o in eng.generate(PROMPTS, greedy(12))]
    assert calls["fused"] > 0
    monkeypatch.setattr(cpu_paged, "FUSED_LAYERS", False)
    calls["fused"] = 0
    ref = make_engine(llama_dir, attention_backend="cpu")
    want = [o["output_ids"] for o in ref.generate(PROMPTS, greedy(12))]
    assert calls["fused"] == 0
    assert got == want


@needs_ops
def test_paged_attention_head_grouping_is_bitwise_per_request() -> None:
    """With many requests a work item takes all kv heads of a request (contiguous K/V reads);
    with one request, one kv head per item. Each request's output is bitwise the same either
    way (the same per-head arithmetic)."""
    from dspark_kernels.cpu_ops import paged_attention

    gen = torch.Generator().manual_seed(7)
    kv_heads, g, d, slots = 3, 3, 64, 2000
    k_buf, v_buf = torch.randn(slots, kv_heads, d, generator=gen), torch.randn(
        slots, kv_heads, d, generator=gen)
    lens = [70, 5, 130, 64, 65, 200]
    table = torch.randperm(slots, generator=gen)[:6 * 256].view(6, 256).contiguous()
    q = torch.randn(len(lens), kv_heads * g, d, generator=gen)

    def run(idx: list[int]) -> torch.Tensor:
        n = len(idx)
        return paged_attention(
            q[idx].contiguous(), k_buf, v_buf, table, torch.tensor(idx), torch.tensor(
                [lens[i] for i in idx]), torch.ones(n, dtype=torch.long),
            torch.arange(n), torch.empty(0, dtype=torch.uint8), torch.full((n,), -1), d ** -0.5)

    together = run(list(range(len(lens))))
    for i in range(len(lens)):
        assert torch.equal(run([i])[0], together[i]), i


# ------------------------------------------------------------------------------ huge pages


needs_hugepages = pytest.mark.skipif(not hugepages.hugepages_available(),
                                     reason="no transparent huge pages here (or "
                                            "DSPARK_HUGEPAGES=0)")


@needs_ops
@needs_hugepages
def test_repacked_weights_on_hugepages_compute_the_same() -> None:
    """``to_hugepages`` copies a repacked weight (a view of 16-row padded storage) onto 2 MiB
    pages: same bytes, shape, stride and padding, the kernel gives bitwise the same result, and
    the mapping is backed by huge pages; small tensors stay where they are."""
    t, n, k = GGML_TYPES["Q4_1"], 3001, 576
    packed = gguf_repack_q8(random_gguf_rows(t, n, k, seed=11), t)
    moved = hugepages.to_hugepages(packed)
    assert moved.data_ptr() != packed.data_ptr() and moved.data_ptr() % 64 == 0
    assert moved.shape == packed.shape and moved.stride() == packed.stride()
    assert moved.untyped_storage().nbytes() >= packed.untyped_storage().nbytes()
    assert torch.equal(moved, packed)
    x = torch.randn(3, k)
    assert torch.equal(gguf_matmul_q8(x, moved, t, packed=True),
                       gguf_matmul_q8(x, packed, t, packed=True))
    assert (hugepages.huge_kb(moved) or 0) >= 2048
    small = torch.zeros(100, dtype=torch.uint8)
    assert hugepages.to_hugepages(small) is small


@needs_ops
def test_hugepages_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("DSPARK_HUGEPAGES", "0")
    w = torch.zeros(1 << 20, dtype=torch.uint8)
    assert not hugepages.hugepages_available() and hugepages.to_hugepages(w) is w
