"""A grammar that dead-ends mid-generation ends the request with a clear finish reason (issue 14).

A dead end is a live matcher state that is not complete (EOS not allowed) and allows no token. It
cannot be reached with the shipped backends' compiled grammars in a few tokens, so a small
``Grammar`` here allows one scripted token per step and then nothing. Plain and speculative
decoding must both stop right there -- finish ``abort`` with a message naming the dead end, no
token past the script -- instead of decoding from an all-masked distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from dspark_sglang.constrained.base import CompiledGrammar, Grammar
from dspark_sglang.constrained.tokenizer_info import TokenizerInfo
from tests.conftest import PROMPTS


class ScriptedGrammar(Grammar):
    """Allows ``script[i]`` as the ``i``-th token, then no token at all; never complete."""

    def __init__(self, info: TokenizerInfo, script: list[int], pos: int = 0) -> None:
        super().__init__(info)
        self.script = script
        self.pos = pos

    def _accept(self, token: int) -> bool:
        if self.pos < len(self.script) and token == self.script[self.pos]:
            self.pos += 1
            return True
        return False

    def _rollback(self, num_tokens: int) -> None:
        self.pos -= num_tokens

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        if self.pos < len(self.script):
            tok = self.script[self.pos]
            bitmask[row].numpy().view(np.uint32)[tok >> 5] |= np.uint32(1 << (tok & 31))

    def _is_accepting(self) -> bool:
        return False

    def _copy(self) -> Grammar:
        return ScriptedGrammar(self.info, self.script, self.pos)

    def _forced_bytes(self) -> bytes:
        return b""  # no jump-forward: the drafter and the target decide every token


class ScriptedBackend:
    def __init__(self, info: TokenizerInfo, script: list[int]) -> None:
        self.info, self.script = info, script

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        backend = self

        class Compiled(CompiledGrammar):
            def new_matcher(self) -> Grammar:
                return ScriptedGrammar(backend.info, backend.script)

        return Compiled(kind, spec)


@pytest.fixture(scope="module")
def flat_sps(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dspark_sglang.speculative.sps_profile import SPSTable

    p = tmp_path_factory.mktemp("sps") / "flat.json"
    SPSTable.flat(10.0).save(p)
    return str(p)


@pytest.mark.parametrize("algo", ["NONE", "NGRAM", "DSPARK"])
def test_dead_end_aborts_after_the_script(make_engine: Any, llama_dir: str, drafter_dir: str,
                                          flat_sps: str, algo: str) -> None:
    kw: dict[str, Any] = {"speculative_algorithm": algo}
    if algo == "DSPARK":
        kw.update(speculative_draft_model_path=drafter_dir,
                  speculative_dspark_sps_table_path=flat_sps,
                  speculative_dspark_disable_draft_budget=True)
    e = make_engine(llama_dir, **kw)
    info = e.parts.grammar_backend().info
    specials = set(info.special_token_ids) | set(info.eos_token_ids)
    script = [t for t in range(300, 340) if t not in specials][:3]
    script = script + script  # repeats give the n-gram drafter something to propose
    e.parts._grammar_backend = ScriptedBackend(info, script)
    cases = [
        {"max_new_tokens": 24, "temperature": 0.0, "regex": "scripted"},
        {"max_new_tokens": 24, "temperature": 1.0, "seed": 4, "regex": "scripted"},
        {"max_new_tokens": 24, "temperature": 1.0, "regex": "scripted"},
    ]
    for sp in cases:
        outs = e.generate(PROMPTS[:2], sp)
        for out in outs:
            assert out["output_ids"] == script, (sp, out["output_ids"])
            fr = out["meta_info"]["finish_reason"]
            assert fr["type"] == "abort" and "grammar dead end" in fr["message"], fr
            assert fr["status_code"] == 400
    # a grammar that dead-ends before any token: nothing is emitted
    e.parts._grammar_backend = ScriptedBackend(info, [])
    out = e.generate(PROMPTS[0], {"max_new_tokens": 8, "temperature": 0.0, "regex": "x"})
    assert out["output_ids"] == []
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    e.check_integrity()
