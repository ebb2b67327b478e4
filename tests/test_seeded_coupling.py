"""A seed makes speculation invisible at T > 0: NONE == DSPARK == MTP1 == CHAIN == NGRAM token
for token, in any batch, and each position is an exact sample of the target (Gumbel-max)."""

from __future__ import annotations

import torch

from dspark_sglang.layers.coupling import coupled_sample, position_gumbel
from tests.conftest import PROMPTS


def test_coupled_sample_is_an_exact_sample() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 6000
    counts = torch.zeros(5)
    for seed in range(n):
        counts[coupled_sample(probs, seed, 3)] += 1
    assert counts[1] == 0  # never a zero-probability token
    exp = probs * n
    keep = exp > 0
    stat = float((((counts - exp) ** 2)[keep] / exp[keep]).sum())
    assert stat < 20.0, (stat, counts)  # chi-square, 3 dof: p ~ 2e-4 at 20
    # a function of (seed, position) only
    assert coupled_sample(probs, 7, 11) == coupled_sample(probs.clone(), 7, 11)
    assert not torch.equal(position_gumbel(7, 11, 16), position_gumbel(7, 12, 16))
    assert not torch.equal(position_gumbel(7, 11, 16), position_gumbel(8, 11, 16))


def _sampled(seed: int, n: int = 14) -> dict:
    return {"max_new_tokens": n, "temperature": 1.0, "top_p": 0.95, "seed": seed,
            "ignore_eos": True}


def test_seeded_sampling_identical_across_modes_and_batches(make_engine, llama_dir,
                                                            drafter_dir, tmp_path) -> None:
    from dspark_sglang.speculative.sps_profile import SPSTable

    flat = tmp_path / "flat.json"
    SPSTable.flat(10.0).save(flat)
    prompts = PROMPTS[:5]
    params = [_sampled(100 + i) for i in range(len(prompts))]
    ref = [o["output_ids"] for o in make_engine(llama_dir).generate(prompts, params)]
    assert len({tuple(r) for r in ref}) == len(ref)  # different seeds, different texts
    modes = {
        "DSPARK": {"speculative_draft_model_path": drafter_dir,
                   "speculative_dspark_sps_table_path": str(flat)},
        "MTP1": {"speculative_draft_model_path": drafter_dir},
        "CHAIN": {"speculative_draft_model_path": drafter_dir},
        "NGRAM": {"speculative_num_draft_tokens": 3},
        "STANDALONE": {"speculative_draft_model_path": llama_dir,
                       "speculative_num_draft_tokens": 3},
    }
    for algo, kw in modes.items():
        e = make_engine(llama_dir, speculative_algorithm=algo, **kw)
        # whole batch, then each request alone, then mixed with greedy and unseeded neighbours
        assert [o["output_ids"] for o in e.generate(prompts, params)] == ref, algo
        assert e.generate(prompts[2], params[2])["output_ids"] == ref[2], algo
        mixed = e.generate([prompts[0], prompts[3], prompts[1]],
                           [{"max_new_tokens": 9, "temperature": 0.0}, params[3],
                            {"max_new_tokens": 12, "temperature": 1.0}])
        assert mixed[1]["output_ids"] == ref[3], algo
        if algo == "STANDALONE":  # an oracle drafter under coupling accepts drafts
            assert e.get_server_info()["spec_stats"]["accepted_tokens"] > 0
