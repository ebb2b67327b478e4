"""Registries own their names: a speculative algorithm is one worker class plus one registration,
and ``ServerArgs`` takes its choices from the attention, grammar and speculative registries."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import PROMPTS, greedy, root

from dspark_sglang.core.req import Req
from dspark_sglang.server_args import ServerArgs
from dspark_sglang.speculative.registry import (
    register_speculative_algorithm,
    speculative_algorithm_names,
    unregister_speculative_algorithm,
)
from dspark_sglang.speculative.worker import Draft, DraftWorker


class RepeatWorker(DraftWorker):
    """Toy drafter: proposes the last token ``k`` more times (weight-free, lossless to verify)."""

    name = "REPEAT"

    def __init__(self, ctx, cfg) -> None:
        self.k = cfg.num_draft_tokens or 3
        self.context_len = ctx.context_len

    def max_draft_len(self) -> int:
        return self.k

    def propose(self, reqs: list[Req]) -> list[Draft]:
        rooms = [min(r.sampling_params.max_new_tokens - len(r.output_ids) - 1,
                     self.context_len - r.kv_len - 1) for r in reqs]
        return [Draft(tokens=[r.output_ids[-1]] * max(0, min(self.k, room)))
                for r, room in zip(reqs, rooms)]


@pytest.fixture
def repeat_algorithm():
    register_speculative_algorithm("REPEAT", RepeatWorker)
    yield "REPEAT"
    unregister_speculative_algorithm("REPEAT")


def test_toy_algorithm_is_one_class_and_one_registration(make_engine, llama_dir,
                                                         repeat_algorithm) -> None:
    plain = make_engine(llama_dir).generate(PROMPTS[:3], greedy(12))
    e = make_engine(llama_dir, speculative_algorithm=repeat_algorithm,
                    speculative_num_draft_tokens=3)
    outs = e.generate(PROMPTS[:3], greedy(12))
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in plain]
    stats = e.get_server_info()["spec_stats"]
    assert stats["drafted_tokens"] > 0  # the toy worker really drafted and was verified
    e.check_integrity()


def test_server_args_choices_come_from_the_registries(repeat_algorithm) -> None:
    from dspark_sglang.constrained.registry import grammar_backend_names
    from dspark_sglang.layers.attention.registry import attention_backend_names

    assert ServerArgs(speculative_algorithm=repeat_algorithm).speculative_algorithm == "REPEAT"
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    choices = {a.dest: a.choices for a in parser._actions}
    assert tuple(choices["speculative_algorithm"]) == speculative_algorithm_names()
    assert "REPEAT" in choices["speculative_algorithm"]
    assert tuple(choices["attention_backend"]) == attention_backend_names()
    assert tuple(choices["grammar_backend"]) == grammar_backend_names()
    with pytest.raises(ValueError, match="speculative_algorithm"):
        ServerArgs(speculative_algorithm="NO_SUCH_ALGORITHM")


def test_unregistered_name_is_refused_after_removal() -> None:
    register_speculative_algorithm("GONE", RepeatWorker)
    unregister_speculative_algorithm("GONE")
    with pytest.raises(ValueError):
        ServerArgs(speculative_algorithm="GONE")


def test_server_args_import_stays_light() -> None:
    code = ("import sys; import dspark_sglang.server_args as s; s.ServerArgs(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    r = subprocess.run([sys.executable, "-c", code], cwd=root(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
