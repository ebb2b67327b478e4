"""Small speculative-decoding contracts: spec counters under NONE, tree residual edge case."""

from __future__ import annotations

from tests.conftest import greedy


def test_spec_verify_ct_is_zero_without_speculation(make_engine, llama_dir, drafter_dir) -> None:
    plain = make_engine(llama_dir).generate("The quick brown fox", greedy(6))
    assert plain["meta_info"]["spec_verify_ct"] == 0
    spec = make_engine(llama_dir, speculative_algorithm="CHAIN",
                       speculative_draft_model_path=drafter_dir)
    out = spec.generate("The quick brown fox", greedy(6))
    assert out["output_ids"] == plain["output_ids"]
    assert 1 <= out["meta_info"]["spec_verify_ct"] <= 6
