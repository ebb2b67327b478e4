"""Incremental detokenization and ``stop_regex``: exact for multi-byte characters and inside
accepted speculative runs."""

from __future__ import annotations

import random
import re

import pytest

from dspark_sglang.core.req import Req
from dspark_sglang.core.sampling_params import SamplingParams
from dspark_sglang.models.tokenizer import Tokenizer
from dspark_sglang.scheduler.output_processor import OutputProcessor
from tests.conftest import PROMPTS, greedy


@pytest.fixture(scope="module")
def tok(llama_dir: str) -> Tokenizer:
    return Tokenizer.from_dir(llama_dir)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decoder_equals_full_decode(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(0)
    texts = ["Unicode: café, naïve, Straße, 東京, emoji 🙂 — done.", "plain ascii", "🙂🙂 東"]
    for trial in range(60):
        if trial < len(texts):
            ids = tok.encode(texts[trial], add_special_tokens=False)
        else:  # random ids: lone UTF-8 bytes, specials, anything
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        dec = tok.incremental_decoder(skip_special_tokens=skip)
        got = ""
        for k, t in enumerate(ids):
            got += dec.step([t])
            assert tok.decode(ids[:k + 1], skip).startswith(got)
            assert not got.endswith("\ufffd") or "\ufffd" in tok.decode(ids[:k], skip)
        got += dec.finish()
        assert got == tok.decode(ids, skip)


def _req(sp: SamplingParams) -> Req:
    return Req(rid="r", origin_input_ids=[1], sampling_params=sp)


def test_multibyte_char_split_over_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("東京🙂", add_special_tokens=False)
    op = OutputProcessor(tok, {2})
    req = _req(SamplingParams(max_new_tokens=64))
    seen = []
    for t in ids:
        op.append_tokens(req, [t])
        seen.append(op.output_text(req))
    assert all("\ufffd" not in s for s in seen) and seen[-1] == "東京🙂"
    assert len(ids) > 3  # the characters really were split over byte tokens


def test_stop_regex_inside_one_accepted_run(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    op = OutputProcessor(tok, {2})
    sp = SamplingParams(max_new_tokens=64, stop_regex=r"b\w+n")
    sp.normalize_and_validate(tok.vocab_size, 512)
    req = _req(sp)
    kept = op.append_tokens(req, ids)  # one "speculative step" with everything accepted
    text = tok.decode(ids[:kept])
    assert re.search(r"b\w+n", text) and not re.search(r"b\w+n", tok.decode(ids[:kept - 1]))
    assert req.finish_reason == {"type": "stop", "matched": r"b\w+n"}
    assert op.output_text(req) == "The quick "
    # anchored pattern: matches only at the end of the text so far
    req = _req(SamplingParams(max_new_tokens=64, stop_regex=[r"fox$", "zzz"]))
    kept = op.append_tokens(req, ids)
    assert tok.decode(ids[:kept]).endswith("fox") and op.output_text(req) == "The quick brown "
    req.sampling_params.no_stop_trim = True
    assert op.output_text(req) == "The quick brown fox"


def test_stop_regex_validation(tok: Tokenizer) -> None:
    for bad in ("(", ["ok", ""], [3]):
        with pytest.raises(ValueError, match="stop_regex"):
            SamplingParams(stop_regex=bad).normalize_and_validate(tok.vocab_size, 512)


@pytest.mark.parametrize("algo", ["NONE", "STANDALONE", "NGRAM"])
def test_stop_regex_identical_under_speculation(make_engine, llama_dir: str, algo: str) -> None:
    kw = {} if algo == "NONE" else {"speculative_algorithm": algo,
                                     "speculative_num_draft_tokens": 3}
    if algo == "STANDALONE":  # the target as its own drafter: every draft is accepted
        kw["speculative_draft_model_path"] = llama_dir
    e = make_engine(llama_dir, **kw)
    full = e.generate(PROMPTS[0], greedy(40))
    text = full["text"]
    starts = [i for i in range(6, len(text) - 2)
              if text[i].isascii() and text[i + 2].isascii() and text[i] + text[i + 2] != "  "]
    if not starts:
        pytest.skip("tiny model produced too little ASCII text")
    i = starts[0]
    pattern = re.escape(text[i]) + "." + re.escape(text[i + 2])
    m = re.search(pattern, text)
    o = e.generate(PROMPTS[0], greedy(40, stop_regex=pattern))
    assert o["text"] == text[:m.start()]
    assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    n = len(o["output_ids"])
    assert o["output_ids"] == full["output_ids"][:n]
    assert re.search(pattern, e.tokenizer.decode(o["output_ids"]))
    assert not re.search(pattern, e.tokenizer.decode(o["output_ids"][:-1]))
    e.check_integrity()
