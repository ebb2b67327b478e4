"""``SpecDecoder`` verifies through ``speculative/verify.py`` and ``tree.py`` only (issue 14).

The unit tests of those modules (test_verify.py, test_ngram_tree.py, test_tree_sampling.py)
therefore test the code the server runs: here every acceptance rule is seen being called from a
real Engine step, and the seeded rule is checked against its definition.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from dspark_sglang.layers.coupling import coupled_sample
from dspark_sglang.speculative import spec_decoder, tree, verify
from tests.conftest import PROMPTS, greedy

RULES = ("greedy_verify_rows", "coupled_verify", "rejection_verify", "tree_greedy_verify",
         "tree_rejection_verify")


def test_spec_decoder_has_no_private_copy_of_the_rules() -> None:
    assert spec_decoder.tree_attention_mask is tree.tree_attention_mask
    assert spec_decoder.node_depths is tree.node_depths
    for name in ("_accept_tree", "_greedy_accept", "_coupled_accept"):
        assert not hasattr(spec_decoder.SpecDecoder, name)


def test_every_rule_is_called_from_an_engine_step(make_engine: Any, llama_dir: str,
                                                  drafter_dir: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    for name in RULES:
        fn = getattr(verify, name)

        def spy(*args: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(verify, name, spy)
    sampled = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    for algo in ("CHAIN", "TREE"):
        e = make_engine(llama_dir, speculative_algorithm=algo,
                        speculative_draft_model_path=drafter_dir)
        e.generate(PROMPTS[:2], greedy(8))
        e.generate(PROMPTS[:2], sampled)
        if algo == "CHAIN":
            e.generate(PROMPTS[:2], {**sampled, "seed": 11})
        e.shutdown()
    assert all(calls[name] > 0 for name in RULES), calls


def test_coupled_verify_emits_the_position_samples() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 40, generator=gen) * 3, dim=-1)  # [l + 1, V]
    seed, first = 123, 17
    samples = [coupled_sample(probs[j], seed, first + j) for j in range(6)]
    for k in range(6):  # drafts matching the first k samples, then a wrong one (if any room)
        drafts = samples[:k] + [(samples[k] + 1) % 40] * (k < 5)
        drafts = drafts + [0] * (5 - len(drafts))
        assert verify.coupled_verify(probs, drafts, seed, first) == samples[: k + 1]
    assert verify.coupled_verify(probs, samples[:5], seed, first) == samples
    assert verify.coupled_verify(probs[:1], [], seed, first) == samples[:1]


def test_greedy_list_and_padded_rules_agree_on_ragged_batches() -> None:
    gen = torch.Generator().manual_seed(5)
    lens = [0, 3, 1, 5, 2]
    drafts = [torch.randint(0, 3, (n,), generator=gen) for n in lens]
    targets = [torch.randint(0, 3, (n + 1,), generator=gen) for n in lens]
    targets[3][:5] = drafts[3]  # one full acceptance
    got = verify.greedy_verify(targets, drafts)
    for tgt, drf, out in zip(targets, drafts, got, strict=True):
        m = 0
        while m < len(drf) and int(drf[m]) == int(tgt[m]):
            m += 1
        assert out == drf[:m].tolist() + [int(tgt[m])]
    assert len(got[3]) == 6
