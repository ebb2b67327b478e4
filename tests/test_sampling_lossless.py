"""T=1 speculation through the real Engine follows the target distribution exactly.

A regex grammar ``[v-z]{3}`` restricts every output position to five single-byte tokens of the
tiny tokenizer, so the exact distribution of the outputs is computable from the target alone:
``P(x1, x2, x3) = Π_k softmax_allowed(target logits)``. Many seeded requests run through DSPARK
(prefix scheduler on an SPS table whose marginal admission threshold lands among the drafts'
confidences, so the verify length varies per draft) and their ``(x2, x3)`` pairs — the positions
that speculation decides — are compared with the exact law by a chi-square test. Drafters with
and without a confidence head are covered: both confidence paths used to look at the drafted
token itself, which biased the output (issue 14).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_drafter_for

CHARS = "vwxyz"
N_SAMPLES = 1500
BATCH = 100


@pytest.fixture(scope="module")
def target_dir(tiny_model_dir) -> str:
    return tiny_model_dir("llama", layers=2, hidden=64, heads=4, kv_heads=2)


def _no_head_drafter(model_dir: str, out: Path) -> str:
    """A random drafter like ``random_drafter_for``'s but without a confidence head."""
    import json

    from dspark_sglang.models.config import ModelConfig
    from dspark_sglang.speculative.dspark.random_init import write_random_dspark_checkpoint

    target = ModelConfig.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))
    return str(write_random_dspark_checkpoint(out / "no_head", target, block_size=4,
                                              confidence=False))


@pytest.fixture(scope="module")
def exact_pairs(target_dir: str) -> tuple[list[int], dict[tuple[int, int], float]]:
    """Prompt ids and the exact law of (x2, x3) under the grammar (T = 1, no truncation)."""
    from dspark_sglang.entrypoints.model_setup import build_target_model
    from dspark_sglang.models.loader import load_model_files
    from dspark_sglang.models.tokenizer import Tokenizer
    from dspark_sglang.training.target_cache import TargetHiddenExtractor

    loaded = load_model_files(target_dir)
    model = build_target_model(loaded.config, loaded.state_dict, torch.float32, "cpu", 256)
    tok = Tokenizer.from_dir(target_dir)
    allowed = [tok.encode(c, add_special_tokens=False) for c in CHARS]
    assert all(len(a) == 1 for a in allowed), "each char must be one token"
    allowed_ids = [a[0] for a in allowed]
    prompt = tok.encode("Pick three letters:", add_special_tokens=False)
    ext = TargetHiddenExtractor(model, [0], 512, 256)

    def law(prefix: list[int]) -> np.ndarray:
        _, fin = ext.run([prompt + prefix])[0]
        logits = model.lm_head(fin[-1]).double()[allowed_ids]
        return torch.softmax(logits, -1).numpy()

    pairs: dict[tuple[int, int], float] = {}
    p1 = law([])
    for i, a in enumerate(allowed_ids):
        p2 = law([a])
        for j, b in enumerate(allowed_ids):
            p3 = law([a, b])
            for k, c in enumerate(allowed_ids):
                key = (b, c)
                pairs[key] = pairs.get(key, 0.0) + p1[i] * p2[j] * p3[k]
    return prompt, pairs


def _sps_table(tmp: Path, threshold: float) -> str:
    from dspark_sglang.speculative.sps_profile import SPSTable

    # flat up to the batch size, then falling: one more verify token costs ``threshold`` of a
    # token's worth, so a draft is admitted when its survival exceeds about ``threshold``
    p = tmp / "sps.json"
    SPSTable.from_measurements({1: 100.0, BATCH: 100.0, 2 * BATCH: 100.0 * (1 - threshold),
                                8 * BATCH: 10.0}).save(p)
    return str(p)


def _chi_square_p(counts: dict[tuple[int, int], int], law: dict[tuple[int, int], float],
                  n: int) -> float:
    keys = sorted(law)
    exp = np.array([law[k] * n for k in keys])
    obs = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    assert sum(counts.values()) == n and set(counts) <= set(keys)
    # pool sparse cells (expected < 5) into one
    small = exp < 5
    if small.any():
        exp = np.append(exp[~small], exp[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    exp = exp * obs.sum() / exp.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    # upper tail of chi-square(dof): Q(dof / 2, stat / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def _token_map(tmp: Path, target_dir: str) -> str:
    """A token map holding three of the five allowed letters (and some other ids): the draft
    distribution is zero on the other two, so only rejection and the residual reach them."""
    from dspark_sglang.models.tokenizer import Tokenizer
    from dspark_sglang.speculative.dspark.token_map import save_token_map

    tok = Tokenizer.from_dir(target_dir)
    letters = [tok.encode(c, add_special_tokens=False)[0] for c in CHARS[:3]]
    others = [t for t in range(40) if t not in letters]
    path = tmp / "token_map.json"
    save_token_map(path, letters + others, tok.vocab_size)
    return str(path)


@pytest.mark.parametrize("head,threshold,seeded,token_map", [
    ("confidence_head", 0.5, False, False),  # rejection sampling
    ("no_confidence_head", 0.25, False, False),
    ("confidence_head", 0.5, True, False),  # seeded: position-keyed Gumbel coupling
    ("confidence_head", 0.5, False, True),  # drafts over a reduced vocabulary
])
def test_t1_dspark_with_grammar_follows_target(make_engine, target_dir, exact_pairs,
                                               tmp_path_factory, head, threshold,
                                               seeded, token_map) -> None:
    tmp = tmp_path_factory.mktemp(f"lossless_{head}_{seeded}_{token_map}")
    drafter = (random_drafter_for(target_dir, tmp / "d", block_size=4) if head == "confidence_head"
               else _no_head_drafter(target_dir, tmp))
    prompt, law = exact_pairs
    e = make_engine(target_dir, speculative_algorithm="DSPARK",
                    speculative_draft_model_path=drafter,
                    speculative_dspark_sps_table_path=_sps_table(tmp, threshold),
                    speculative_dspark_disable_draft_budget=True,
                    speculative_token_map=_token_map(tmp, target_dir) if token_map else None,
                    max_running_requests=BATCH, max_total_tokens=8192)
    vocab = e.parts.decoder.worker.drafter.draft_vocab
    assert (vocab is not None and len(vocab) < 50) if token_map else vocab is None
    counts: dict[tuple[int, int], int] = {}
    for start in range(0, N_SAMPLES, BATCH):
        sps = [{"max_new_tokens": 3, "temperature": 1.0, "regex": "[v-z]{3}",
                **({"seed": 1000 + i} if seeded else {})} for i in range(start, start + BATCH)]
        for o in e.generate(input_ids=[prompt] * BATCH, sampling_params=sps):
            ids = o["output_ids"]
            assert len(ids) == 3, o
            counts[(ids[1], ids[2])] = counts.get((ids[1], ids[2]), 0) + 1
    stats = e.get_server_info()["spec_stats"]
    # each request has one step with room for a draft (x2; x3 is its bonus or correction): the
    # scheduler verified that draft for some requests and not others (else this proves nothing)
    assert 0.05 * N_SAMPLES < stats["drafted_tokens"] < 0.95 * N_SAMPLES, stats
    assert stats["accepted_tokens"] > 0
    p = _chi_square_p(counts, law, N_SAMPLES)
    assert p > 1e-3, (p, counts)


def test_chi_square_detects_a_biased_law(exact_pairs) -> None:
    """The test above has power: a law moved by TV 0.05 is rejected at this sample size."""
    _, law = exact_pairs
    keys = sorted(law, key=law.get)
    biased = dict(law)
    shift = min(0.05, biased[keys[-1]] * 0.9)  # move mass from the likeliest cell (TV 0.05)
    biased[keys[-1]] -= shift
    biased[keys[0]] += shift
    rng = np.random.default_rng(0)
    draws = rng.choice(len(keys), size=N_SAMPLES, p=np.array([biased[k] for k in keys]))
    counts: dict[tuple[int, int], int] = {}
    for d in draws:
        counts[keys[d]] = counts.get(keys[d], 0) + 1
    assert _chi_square_p(counts, law, N_SAMPLES) < 1e-3
