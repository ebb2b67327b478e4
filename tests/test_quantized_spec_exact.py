"""Speculative greedy output equals plain greedy output on the embedded GGUF's own blocks.

With Q8 activations (``--quantization gguf``, the default for a GGUF on CPU) a last-bit
difference anywhere before a matmul can move a quantised activation by one step and change the
logits visibly; so this holds only if a verified token is computed bitwise as if it had been
decoded alone (the paged attention kernel's key order, row-independent block kernels). Checked
in a batch of chat prompts whose contexts cross the attention kernel's key tiles, where the
earlier kernel (masked keys inside a tile) diverged on every prompt.
"""

from __future__ import annotations

import pytest

from dspark_sglang.benchmark.workloads import chat_prompt
from dspark_sglang.layers.quantized_linear import GGUFLinear
from tests.conftest import greedy, has_default_model

pytestmark = pytest.mark.skipif(not has_default_model(), reason="embedded model not installed")

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What are three good ways to improve sleep quality? Answer briefly.",
    "Explain what a hash table is to a new programmer.",
    "A train travels 60 miles per hour for 2.5 hours. How far does it go?",
    "Write a haiku about the sea.",
    "List the planets of the solar system in order from the sun.",
    "Write a SQL query that counts the rows of a table named orders per customer_id.",
]


@pytest.mark.parametrize("algo", ["MTP1", "DSPARK"])
def test_speculative_greedy_equals_plain_on_q8_blocks(make_engine, algo: str) -> None:
    plain = make_engine(None, quantization="gguf", attention_backend="cpu")
    assert plain.parts.runner.quantization == "gguf"
    prompts = [chat_prompt(plain.tokenizer, q) for q in QUESTIONS]
    want = [o["output_ids"] for o in plain.generate(prompts, greedy(40))]
    plain.shutdown()
    kw = {"speculative_dspark_disable_draft_budget": True} if algo == "DSPARK" else {}
    spec = make_engine(None, quantization="gguf", attention_backend="cpu",
                       speculative_algorithm=algo, **kw)
    got = [o["output_ids"] for o in spec.generate(prompts, greedy(40))]
    drafter = spec.parts.decoder.worker.drafter
    # next to a block target the drafter's layers and its token-map head run on Q8 blocks too
    assert isinstance(drafter.layers[0].mlp.gate_proj, GGUFLinear)
    assert drafter.draft_vocab is not None and drafter.draft_vocab.head_blocks is not None
    assert spec.parts.runner.quantization == "gguf"
    same = [g == w for g, w in zip(got, want)]
    assert all(same), f"{algo}: {sum(same)}/{len(same)} prompts equal to plain decoding"


@pytest.mark.parametrize("qt", ["q4_0", "none"])
def test_draft_model_quantization_changes_drafts_only(make_engine, qt: str) -> None:
    """``--speculative-draft-model-quantization`` sets the drafter's weight format next to a GGUF
    target: q4_0 puts every drafter linear (layers, context projection, the C++ block stack's
    merged projections, the per-step context update) on Q4_0 blocks, none keeps them float32;
    greedy output stays plain decoding's either way."""
    from dspark_kernels.cpu_ops import GGML_TYPES

    plain = make_engine(None, quantization="gguf", attention_backend="cpu")
    prompts = [chat_prompt(plain.tokenizer, q) for q in QUESTIONS[:4]]
    want = [o["output_ids"] for o in plain.generate(prompts, greedy(32))]
    plain.shutdown()
    spec = make_engine(None, quantization="gguf", attention_backend="cpu",
                       speculative_algorithm="DSPARK", speculative_draft_model_quantization=qt,
                       speculative_dspark_disable_draft_budget=True)
    got = [o["output_ids"] for o in spec.generate(prompts, greedy(32))]
    worker = spec.parts.decoder.worker
    drafter = worker.drafter
    if qt == "none":
        assert not isinstance(drafter.layers[0].mlp.gate_proj, GGUFLinear)
        assert getattr(drafter, "kv_blocks", None) is None and worker.block_stack() is None
    else:
        t = GGML_TYPES[qt.upper()]
        lins = [drafter.fc, drafter.layers[0].mlp.gate_proj, *drafter.kv_blocks[1],
                *worker._block_stack_linears]
        assert worker.block_stack() is not None and len(worker._block_stack_linears) == 8
        assert all(isinstance(li, GGUFLinear) and li.parts[0].ggml_type == t for li in lins)
    assert got == want


def test_engine_streams_weights_from_hugepages(make_engine) -> None:
    """On GGUF blocks the repacked weights every decode step streams sit on 2 MiB pages where
    the kernel offers them (dspark_kernels/hugepages.py)."""
    from dspark_kernels import hugepages

    if not hugepages.hugepages_available():
        pytest.skip("no transparent huge pages here")
    eng = make_engine(None, quantization="gguf", attention_backend="cpu")
    eng.generate(["Hello"], greedy(4))
    model = eng.parts.runner.model
    weights = [model.layers[0]._modules["gate_up_proj"].plan()[0][1],
               model.lm_head.plan()[0][1]]
    assert all((hugepages.huge_kb(w) or 0) >= 2048 for w in weights)


def test_draft_model_quantization_rejects_unknown_formats() -> None:
    from dspark_sglang.server_args import ServerArgs

    with pytest.raises(ValueError, match="speculative_draft_model_quantization must be one of"):
        ServerArgs(speculative_draft_model_quantization="q5_0").validate()


def test_batching_and_chunking_do_not_change_tokens_on_blocks(make_engine) -> None:
    """Row-independent forwards on GGUF blocks (block kernels and paged attention for prefill
    too): the same prompts prefilled all at once or in 16-token chunks, three requests at a time,
    give the same greedy tokens (so speculative and plain decoding agree at any load)."""
    prompts = None
    outs = []
    for kw in ({}, {"chunked_prefill_size": 16, "max_running_requests": 3}):
        eng = make_engine(None, quantization="gguf", attention_backend="cpu", **kw)
        assert eng.parts.runner.attn.extend_on_kernel
        prompts = prompts or [chat_prompt(eng.tokenizer, q) for q in QUESTIONS[:6]]
        outs.append([o["output_ids"] for o in eng.generate(prompts, greedy(24))])
        eng.shutdown()
    assert outs[0] == outs[1]


def test_decoder_stack_is_bitwise_the_per_layer_path(monkeypatch) -> None:
    """The C++ DecoderStack (one call per forward) computes exactly what the per-layer fused
    Python path computes: the same logits and captured hidden states, bit for bit, for a
    prefill, a decode and a verify forward; the stack is what the engine's forwards use."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardMode
    from dspark_sglang.entrypoints.model_setup import build_engine_parts
    from dspark_sglang.model_executor.model_runner import BatchRequestSpec, build_forward_batch
    from dspark_sglang.models import llama
    from dspark_sglang.server_args import ServerArgs

    parts = build_engine_parts(ServerArgs(model_path=None, dtype="float32", max_total_tokens=512,
                                          attention_backend="cpu", quantization="gguf"),
                               emit=lambda r, f: None)
    runner, cache = parts.runner, parts.cache
    model = runner.model
    ids = list(range(2000, 2000 + 70))  # crosses a 64-key tile

    def run_all() -> list[torch.Tensor]:
        row = cache.req_to_token_pool.alloc()
        slots = cache.allocator.alloc(len(ids) + 8)
        cache.req_to_token_pool.write(row, 0, slots)
        outs = []
        for mode, start, toks in ((ForwardMode.EXTEND, 0, ids),
                                  (ForwardMode.DECODE, len(ids), [7]),
                                  (ForwardMode.TARGET_VERIFY, len(ids) + 1, [5, 9, 11, 3])):
            loc = cache.req_to_token[row, start:start + len(toks)]
            fb = build_forward_batch(mode, [BatchRequestSpec(row, toks, start, loc)],
                                     cache.req_to_token)
            fb.capture_layer_ids = (1, 8, 27)
            out = runner.forward(fb)
            outs += [out.logits.clone(), out.aux_hidden.clone()]
        cache.allocator.free(slots)
        cache.req_to_token_pool.free(row)
        return outs

    used = {"stack": 0}
    real = model._decoder_stack

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        s = real(*a, **kw)
        used["stack"] += s is not None
        return s

    monkeypatch.setattr(model, "_decoder_stack", counting)
    with_stack = run_all()
    assert used["stack"] == 3
    built = model._stack
    monkeypatch.setattr(llama, "DECODER_STACK", False)
    per_layer = run_all()
    assert used["stack"] == 3
    for a, b in zip(with_stack, per_layer):
        assert torch.equal(a, b)
    # the stack is built once and kept; a projection that leaves the Q8 kernel for some row
    # counts (the 70-row prefill) drops it (per-layer path), and coming back builds a new one
    monkeypatch.setattr(llama, "DECODER_STACK", True)
    run_all()
    assert used["stack"] == 6 and model._stack is built
    o_proj = model.layers[3].o_proj
    rows = o_proj.max_quant_rows
    o_proj.max_quant_rows = 32
    run_all()
    assert used["stack"] == 6
    o_proj.max_quant_rows = rows
    assert torch.equal(run_all()[2], with_stack[2]) and used["stack"] == 9
    assert model._stack is not built


def test_drafter_context_update_fast_path_matches_torch(make_engine) -> None:
    """Next to a GGUF target the drafter's per-step context update runs k/v as one Q8 kernel
    call and norm + rotary + store in C++; the pool it writes matches the torch path's (drafts
    only: what is verified never depends on it)."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    assert getattr(w.drafter, "kv_blocks", None) is not None
    n = 6
    g = torch.Generator().manual_seed(0)
    aux = torch.randn(n, w.drafter.fc.in_features, generator=g)
    fb = ForwardBatch.__new__(ForwardBatch)
    fb.mode = ForwardMode.EXTEND
    fb.positions = torch.tensor([0, 1, 2, 40, 41, 300])
    fb.out_cache_loc = torch.tensor([3, 4, 5, 9, 10, 11])
    out = ModelOutput(logits=None, aux_hidden=aux, final_hidden=None)
    w.on_target_forward(fb, out)
    w.flush_context()  # (queued while the draft budget is not drafting)
    fast = [b[fb.out_cache_loc].clone() for b in w.ctx_pool.k_bufs + w.ctx_pool.v_bufs]
    saved, w.drafter.kv_blocks = w.drafter.kv_blocks, None
    try:
        w.on_target_forward(fb, out)
    finally:
        w.drafter.kv_blocks = saved
    slow = [b[fb.out_cache_loc] for b in w.ctx_pool.k_bufs + w.ctx_pool.v_bufs]
    for a, b in zip(fast, slow):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _two_request_context(make_engine):  # type: ignore[no-untyped-def]
    """A DSPARK engine on GGUF blocks whose drafter context holds two requests (5 tokens at
    slots 100-104, 70 at 200-269; seeded random captured rows): (engine, worker, its C++ block
    stack, lens, slots [2, 70])."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    stack = w.block_stack()
    assert stack is not None
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([5, 70])  # two requests, contexts of different lengths
    slots = torch.zeros(2, 70, dtype=torch.long)
    slots[0, :5] = torch.arange(100, 105)
    slots[1] = torch.arange(200, 270)
    fb = ForwardBatch.__new__(ForwardBatch)
    fb.mode = ForwardMode.EXTEND
    fb.positions = torch.cat([torch.arange(5), torch.arange(70)])
    fb.out_cache_loc = torch.cat([slots[0, :5], slots[1]])
    aux = torch.randn(int(lens.sum()), w.drafter.fc.in_features, generator=g)
    w.on_target_forward(fb, ModelOutput(logits=None, aux_hidden=aux, final_hidden=None))
    w.flush_context()
    return eng, w, stack, lens, slots


def test_drafter_block_stack_matches_torch_forward_block(make_engine) -> None:
    """Next to a GGUF target the drafter's block forward runs as one C++ DecoderStack over the
    context pool (block K/V in scratch slots, a mask of ones among the block's rows); its block
    hidden states match the torch forward_block's (drafts only: verification decides)."""
    import torch

    eng, w, stack, lens, slots = _two_request_context(make_engine)
    anchors = torch.tensor([17, 4242])
    fast = w._forward_block_stack(stack, anchors, lens, slots)
    valid = torch.arange(70)[None, :] < lens[:, None]
    ctx_k = [b[slots] for b in w.ctx_pool.k_bufs]
    ctx_v = [b[slots] for b in w.ctx_pool.v_bufs]
    slow = w.drafter.forward_block(anchors, lens, ctx_k, ctx_v, valid)
    assert fast.shape == slow.shape == (2, w.gamma, w.drafter.config.hidden_size)
    # The layers' inputs are quantised to Q8 per block of 32: a float-rounding difference of the
    # attention (paged kernel vs SDPA) can move a value across a rounding boundary, one step of
    # amax / 127, so elementwise closeness holds only up to that; the whole agrees tightly
    # (how tightly depends on the shipped weights: under 5e-3 with the tenth drafter, 5.6e-3 with
    # the eleventh, the same with and without the AMX path).
    rel = float((fast - slow).norm() / slow.norm())
    assert rel < 1e-2, rel
    assert float((fast - slow).abs().max()) < 0.05 * float(slow.abs().max())
    # the scratch slots are past the target's: the context pool's own slots are untouched
    assert int(w._scratch.min()) > int(eng.parts.cache.req_to_token.max())


def test_greedy_chain_kernel_draws_the_python_loops_tokens(make_engine, monkeypatch) -> None:
    """Next to a GGUF target an all-greedy chain over the vanilla Markov head runs as one C++
    call (markov_greedy_chain): the same tokens and confidences as sample_chain's Python loop."""
    import torch

    from dspark_sglang.speculative.dspark import model as dmodel

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    d = eng.parts.decoder.worker.drafter
    assert d.draft_vocab is not None and d.draft_vocab.markov_blocks is not None
    g = torch.Generator().manual_seed(2)
    bs = 5
    hidden = torch.randn(bs, d.gamma, d.config.hidden_size, generator=g)
    base = d.base_logits(hidden, in_map=True)
    anchors = torch.randint(0, d.config.vocab_size, (bs,), generator=g)
    temps = torch.zeros(bs)
    calls = {"n": 0}
    real = d.draft_vocab.markov_blocks.ops.markov_greedy_chain

    def counting(*a):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(*a)

    def chain_kernel(b, i, f=d._chain_kernel):  # type: ignore[no-untyped-def]
        got = f(b, i)
        return None if got is None else (counting, *got[1:])

    monkeypatch.setattr(d, "_chain_kernel", chain_kernel)
    for k in (1, 4, d.gamma):
        fast = d.sample_chain(hidden, base, anchors, temps, num_tokens=k)
        monkeypatch.setattr(dmodel, "CHAIN_KERNEL", False)
        slow = d.sample_chain(hidden, base, anchors, temps, num_tokens=k)
        monkeypatch.setattr(dmodel, "CHAIN_KERNEL", True)
        assert torch.equal(fast.tokens, slow.tokens)
        assert torch.equal(fast.confidences, slow.confidences)
        assert fast.confidence_logits is not None and slow.confidence_logits is not None
        assert torch.equal(fast.confidence_logits, slow.confidence_logits)
        assert torch.equal(fast.probs, slow.probs)  # one-hot over the whole vocabulary
        assert fast.tokens.shape == (bs, k)
    assert calls["n"] == 3
    # a sampled row takes the Python loop
    d.sample_chain(hidden, base, anchors, torch.full((bs,), 0.7), num_tokens=3)
    assert calls["n"] == 3
    # the bias cache is warm now: chains served from it draw the same tokens again, also for
    # anchors whose slots other tokens took (direct-mapped: token % rows)
    rows = d._bias_cache[2].shape[0]
    assert rows > 0 and int((d._bias_cache[3] >= 0).sum()) > bs
    # the last: one call where a miss takes the slot a hit of the same step reads
    both = (torch.cat([hidden, hidden]), torch.cat([base, base]), torch.zeros(2 * bs))
    for extra in (anchors, anchors + rows, anchors.flip(0), torch.cat([anchors, anchors + rows])):
        h, b, t = both if len(extra) > bs else (hidden, base, temps)
        fast = d.sample_chain(h, b, extra % d.config.vocab_size, t)
        monkeypatch.setattr(dmodel, "CHAIN_KERNEL", False)
        slow = d.sample_chain(h, b, extra % d.config.vocab_size, t)
        monkeypatch.setattr(dmodel, "CHAIN_KERNEL", True)
        assert torch.equal(fast.tokens, slow.tokens)


def test_markov_bias_rows_do_not_depend_on_the_other_rows(make_engine) -> None:
    """The chain's bias cache relies on the Q8 kernel computing every activation row on its own:
    a token's W2 e row computed alone, among 5 and among 37 rows is bitwise the same."""
    import torch

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    d = eng.parts.decoder.worker.drafter
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, d.gamma, d.config.hidden_size, generator=g)
    base = d.base_logits(hidden, in_map=True)
    got = d._chain_kernel(base, d.draft_vocab.token_ids)
    assert got is not None
    op, w1, w2, w2_type, _, _ = got
    ids = d.draft_vocab.token_ids.long()
    anchors = torch.randperm(512, generator=g)[:37] * 7  # distinct mod 512

    def cached_rows(n: int) -> dict[int, torch.Tensor]:
        cache = torch.empty(512, base.shape[-1])  # no two of these anchors share a slot
        tags = torch.full((cache.shape[0],), -1, dtype=torch.long)
        out = {}
        for i in range(0, 37, n):
            a = anchors[i:i + n]
            op(base[i:i + n].contiguous(), 1, w1, w2, w2_type, ids, a, cache, tags)
            out.update({int(t): cache[int(t) % cache.shape[0]].clone() for t in a})
        return out

    alone, five, all_rows = cached_rows(1), cached_rows(5), cached_rows(37)
    assert alone.keys() == five.keys() == all_rows.keys() and len(alone) == 37
    for t, row in alone.items():
        assert torch.equal(row, five[t]) and torch.equal(row, all_rows[t])


def test_drafter_context_update_in_one_call_is_the_fast_path(make_engine, monkeypatch) -> None:
    """At decode / verify sizes the context update is one C++ call (draft_context_update);
    it writes bitwise what the per-layer fast path writes (same kernels, same order)."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    assert w._context_plan() is not None
    g = torch.Generator().manual_seed(2)
    fb = ForwardBatch.__new__(ForwardBatch)
    fb.mode = ForwardMode.TARGET_VERIFY
    fb.positions = torch.tensor([0, 7, 8, 9, 500])
    fb.out_cache_loc = torch.tensor([20, 21, 22, 23, 24])
    out = ModelOutput(logits=None, aux_hidden=torch.randn(5, w.drafter.fc.in_features,
                                                          generator=g), final_hidden=None)
    calls = {"n": 0}
    ops = w.drafter.kv_blocks[0]
    real = ops.draft_context_update

    class Counting:  # the extension module's attributes are read-only: wrap the holder
        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(ops, name)

        def draft_context_update(self, *a):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            return real(*a)

    monkeypatch.setattr(w.drafter, "kv_blocks", (Counting(), w.drafter.kv_blocks[1]))
    w.on_target_forward(fb, out)
    w.flush_context()
    assert calls["n"] == 1
    one_call = [b[fb.out_cache_loc].clone() for b in w.ctx_pool.k_bufs + w.ctx_pool.v_bufs]
    w._ctx_plan = ()  # no plan: the per-layer fast path
    w.on_target_forward(fb, out)
    assert calls["n"] == 1
    per_layer = [b[fb.out_cache_loc] for b in w.ctx_pool.k_bufs + w.ctx_pool.v_bufs]
    for a, b in zip(one_call, per_layer):
        assert b.abs().max() > 0
        assert torch.equal(a, b)


def test_queued_context_updates_leave_the_pool_as_writing_each_at_once(make_engine) -> None:
    """With the draft budget on, decode / verify-sized context updates are queued and applied
    oldest first before the pool is read: the pool then holds bitwise what writing each update
    at once gives, including a slot written twice (the later write wins)."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    assert w.draft_budget and w.defer_context
    g = torch.Generator().manual_seed(3)
    steps = []
    for pos, slots in (([0, 1, 2], [3, 4, 5]), ([7, 8], [5, 6]), ([9], [7])):
        fb = ForwardBatch.__new__(ForwardBatch)
        fb.mode = ForwardMode.TARGET_VERIFY
        fb.positions, fb.out_cache_loc = torch.tensor(pos), torch.tensor(slots)
        aux = torch.randn(len(pos), w.drafter.fc.in_features, generator=g)
        steps.append((fb, ModelOutput(logits=None, aux_hidden=aux, final_hidden=None)))
    touched = torch.tensor([3, 4, 5, 6, 7])
    bufs = w.ctx_pool.k_bufs + w.ctx_pool.v_bufs
    for b in bufs:
        b[touched] = 0.0
    for fb, out in steps:
        w.on_target_forward(fb, out)
    assert w._pending_rows == 6
    assert all(bool((b[touched] == 0).all()) for b in bufs)  # nothing written yet
    w.flush_context()
    assert w._pending_rows == 0 and not w._pending
    queued = [b[touched].clone() for b in bufs]
    for b in bufs:
        b[touched] = 0.0
    w.defer_context = False
    for fb, out in steps:
        w.on_target_forward(fb, out)
    assert not w._pending
    at_once = [b[touched] for b in bufs]
    for a, b in zip(queued, at_once):
        assert b.abs().max() > 0
        assert torch.equal(a, b)


def _plain_greedy_on_blocks(make_engine):  # type: ignore[no-untyped-def]
    """Three chat prompts and the plain engine's greedy output ids (32 tokens) on GGUF blocks."""
    plain = make_engine(None, quantization="gguf", attention_backend="cpu")
    prompts = [chat_prompt(plain.tokenizer, q) for q in QUESTIONS[:3]]
    want = [o["output_ids"] for o in plain.generate(prompts, greedy(32))]
    plain.shutdown()
    return prompts, want


def test_queued_context_updates_give_the_same_drafts(make_engine, monkeypatch) -> None:
    """Through the engine: a budget that drafts every third step (the others queue their
    context updates) proposes exactly the drafts it proposes with every update written at once,
    and the output equals plain greedy."""
    from dspark_sglang.speculative.dspark_worker import DSparkWorker

    prompts, want = _plain_greedy_on_blocks(make_engine)
    calls = {"n": 0}
    real_budget = DSparkWorker._draft_budget

    def every_third(self, reqs, rooms):  # type: ignore[no-untyped-def]
        real_budget(self, reqs, rooms)  # (keeps the per-request records it makes)
        calls["n"] += 1
        return rooms if calls["n"] % 3 == 0 else [0] * len(reqs)

    monkeypatch.setattr(DSparkWorker, "_draft_budget", every_third)
    runs = []
    for defer in (True, False):
        eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                          speculative_algorithm="DSPARK")
        w = eng.parts.decoder.worker
        w.defer_context = defer
        drafts: list[list[list[int]]] = []
        flushed: list[int] = []
        real_propose, real_flush = w._propose, w.flush_context

        def propose(reqs, rooms, real=real_propose, out=drafts):  # type: ignore[no-untyped-def]
            res = real(reqs, rooms)
            out.append([d.tokens for d in res])
            return res

        def flush(keep=None, real=real_flush, w=w, out=flushed):  # type: ignore[no-untyped-def]
            out.append(len(w._pending))
            real(keep=keep)

        w._propose, w.flush_context = propose, flush
        calls["n"] = 0
        got = [o["output_ids"] for o in eng.generate(prompts, greedy(32))]
        assert got == want
        runs.append((drafts, flushed))
        eng.shutdown()
    (d_on, f_on), (d_off, f_off) = runs
    assert len(d_on) > 3 and d_on == d_off
    assert max(f_on) >= 2 and max(f_off) == 0  # updates were queued across skipped steps


def test_a_probe_applies_its_own_rows_and_an_overflow_drops_the_queue(make_engine,
                                                                      monkeypatch) -> None:
    """A probe's flush (``keep``) applies only the queued rows naming its requests' slots, in
    order, and leaves the others queued; flushing those later gives the pool bitwise as writing
    everything in order. Context holes: a queue that overflows while nothing drafts is dropped,
    its slots marked invalid and not written; a later write makes a slot valid again."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput
    from dspark_sglang.speculative import dspark_worker

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    assert w.draft_budget and w.defer_context and w.context_holes
    g = torch.Generator().manual_seed(5)
    steps = []
    # slots 3-5: the probing request (5 written twice); 10-12: another request
    for pos, slots in (([0, 1, 2, 0], [3, 4, 5, 10]), ([7, 1, 8], [5, 11, 12])):
        fb = ForwardBatch.__new__(ForwardBatch)
        fb.mode = ForwardMode.TARGET_VERIFY
        fb.positions, fb.out_cache_loc = torch.tensor(pos), torch.tensor(slots)
        aux = torch.randn(len(pos), w.drafter.fc.in_features, generator=g)
        steps.append((fb, ModelOutput(logits=None, aux_hidden=aux, final_hidden=None)))
    mine, other = torch.tensor([3, 4, 5]), torch.tensor([10, 11, 12])
    both = torch.cat([mine, other])
    bufs = w.ctx_pool.k_bufs + w.ctx_pool.v_bufs

    def queue() -> None:
        for b in bufs:
            b[both] = 0.0
        for fb, out in steps:
            w.on_target_forward(fb, out)

    queue()
    w.flush_context()
    everything = [b.clone() for b in bufs]
    queue()
    w.flush_context(keep=mine)
    assert w._pending_rows == 3 and sorted(torch.cat([p[2] for p in w._pending]).tolist()) == [
        10, 11, 12]
    for a, b in zip(everything, bufs):
        assert torch.equal(a[mine], b[mine]) and b[mine].abs().max() > 0
        assert bool((b[other] == 0).all())
    w.flush_context()
    for a, b in zip(everything, bufs):
        assert torch.equal(a[both], b[both])
    assert bool(w.ctx_valid[both].all()) and w.dropped_rows == 0
    # overflow while nothing drafts: every queued row dropped, nothing written
    monkeypatch.setattr(dspark_worker, "MAX_PENDING_ROWS", 5)
    queue()
    assert not w._pending and w.dropped_rows == 7
    assert not bool(w.ctx_valid[both].any())
    assert all(bool((b[both] == 0).all()) for b in bufs)
    # a write makes a slot valid again
    w.defer_context = False
    w.on_target_forward(*steps[0])
    assert bool(w.ctx_valid[torch.tensor([3, 4, 5, 10])].all())
    assert not bool(w.ctx_valid[torch.tensor([11, 12])].any())


def test_drafter_block_stack_reads_around_context_holes(make_engine) -> None:
    """A draft over a context with holes: the C++ block stack reading each row's valid slots
    only (``_context_table``) matches the torch forward_block with the holes masked, and
    differs from the draft over the whole context."""
    import torch

    eng, w, stack, lens, slots = _two_request_context(make_engine)
    anchors = torch.tensor([17, 4242])
    table, counts = w._context_table(slots, lens)
    assert counts is None and table is slots  # no holes: the table as it is
    whole = w._forward_block_stack(stack, anchors, lens, slots)
    w.ctx_valid[torch.tensor([102, 230, 231, 232, 268])] = False
    table, counts = w._context_table(slots, lens)
    assert counts is None  # (holes exist only once a row was dropped: the table is not built)
    w.dropped_rows = 5  # as _drop_pending records it
    table, counts = w._context_table(slots, lens)
    assert counts is not None and counts.tolist() == [4, 66]
    assert table[0, :4].tolist() == [100, 101, 103, 104]
    fast = w._forward_block_stack(stack, anchors, lens, table, counts)
    valid = (torch.arange(70)[None, :] < lens[:, None]) & w.ctx_valid[slots]
    ctx_k = [b[slots] for b in w.ctx_pool.k_bufs]
    ctx_v = [b[slots] for b in w.ctx_pool.v_bufs]
    slow = w.drafter.forward_block(anchors, lens, ctx_k, ctx_v, valid)
    rel = float((fast - slow).norm() / slow.norm())
    assert rel < 1e-2, rel  # (the bound of the block-stack test above, for the same reason)
    assert float((fast - whole).norm() / whole.norm()) > 5 * rel


def test_context_holes_keep_greedy_output_exact(make_engine, monkeypatch) -> None:
    """Through the engine, with a queue so small that rows are dropped between drafts (and
    probes of one request of several, which apply only their own rows): drafts read contexts
    with holes, and the output still equals plain greedy."""
    from dspark_sglang.speculative import dspark_worker
    from dspark_sglang.speculative.dspark_worker import DSparkWorker

    prompts, want = _plain_greedy_on_blocks(make_engine)
    calls = {"n": 0}
    real_budget = DSparkWorker._draft_budget

    def sparse(self, reqs, rooms):  # type: ignore[no-untyped-def]
        real_budget(self, reqs, rooms)
        calls["n"] += 1
        if calls["n"] % 4 == 0:
            return rooms
        if calls["n"] % 4 == 2:  # a probe of the first request only
            return [rooms[0]] + [0] * (len(reqs) - 1)
        return [0] * len(reqs)

    monkeypatch.setattr(DSparkWorker, "_draft_budget", sparse)
    monkeypatch.setattr(dspark_worker, "MAX_PENDING_ROWS", 4)
    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    holes = {"n": 0}
    real_table = w._context_table

    def table(slots, lens):  # type: ignore[no-untyped-def]
        out = real_table(slots, lens)
        holes["n"] += out[1] is not None
        return out

    w._context_table = table
    got = [o["output_ids"] for o in eng.generate(prompts, greedy(32))]
    assert got == want
    assert w.dropped_rows > 0 and holes["n"] > 0


def test_a_prefill_sized_write_keeps_the_queue_without_its_slots(make_engine) -> None:
    """A context update too large to queue (a prefill chunk) reads nothing from the pool: it
    removes the queued rows of its own slots (which it overwrites) and leaves the rest queued;
    after the flush the pool is bitwise what writing every update at once in order gives."""
    import torch

    from dspark_sglang.core.forward_batch import ForwardBatch, ForwardMode, ModelOutput

    eng = make_engine(None, quantization="gguf", attention_backend="cpu",
                      speculative_algorithm="DSPARK")
    w = eng.parts.decoder.worker
    g = torch.Generator().manual_seed(4)

    def batch(mode, pos, slots):  # type: ignore[no-untyped-def]
        fb = ForwardBatch.__new__(ForwardBatch)
        fb.mode = mode
        fb.positions, fb.out_cache_loc = torch.tensor(pos), torch.tensor(slots)
        aux = torch.randn(len(pos), w.drafter.fc.in_features, generator=g)
        return fb, ModelOutput(logits=None, aux_hidden=aux, final_hidden=None)

    big = list(range(300, 370))  # 70 rows: more than a queued update may have
    steps = [batch(ForwardMode.TARGET_VERIFY, [0, 1, 2], [3, 300, 5]),
             batch(ForwardMode.EXTEND, list(range(70)), big),
             batch(ForwardMode.TARGET_VERIFY, [9, 4], [301, 6])]
    touched = torch.tensor([3, 5, 6, *big])
    bufs = w.ctx_pool.k_bufs + w.ctx_pool.v_bufs

    def run(defer: bool) -> list[torch.Tensor]:
        w.defer_context = defer
        for b in bufs:
            b[touched] = 0.0
        for i, (fb, out) in enumerate(steps):
            w.on_target_forward(fb, out)
            if defer and i == 1:  # the queue kept the first step's other rows
                assert w._pending_rows == 2
                assert sorted(w._pending[0][2].tolist()) == [3, 5]
        w.flush_context()
        return [b[touched].clone() for b in bufs]

    queued, at_once = run(True), run(False)
    for a, b in zip(queued, at_once):
        assert b.abs().max() > 0 and torch.equal(a, b)
