"""JSON Lines reading (U+2028 inside strings) and the synthesised chat / JSON training prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark_sglang.benchmark.workloads import load_prompt_file
from dspark_sglang.training.data import read_prompts
from dspark_sglang.training.synth_prompts import synthesize
from dspark_sglang.utils.jsonl import iter_jsonl, read_jsonl


def test_line_separator_inside_a_string_stays_one_record(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    rows = [{"turns": ["first\u2028line"]}, {"turns": ["x\u2029y\x85z"]}, {"turns": ["plain"]}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n",
                 encoding="utf-8")
    assert "first\u2028line" in p.read_text(encoding="utf-8")  # raw, not escaped
    assert len(p.read_text(encoding="utf-8").splitlines()) > 4  # what str.splitlines() does
    assert read_jsonl(p) == rows
    assert [i for i, _ in iter_jsonl(p)] == [0, 1, 2]
    assert [x.text for x in read_prompts([p])] == ["first\u2028line", "x\u2029y\x85z", "plain"]
    assert [x.text for x in load_prompt_file(p)][0] == "first\u2028line"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(p)


def test_synthesized_prompts_are_unique_and_exclude_eval_prompts() -> None:
    rows = synthesize(300, 50, seed=1)
    texts = [r["turns"][0] for r in rows]
    assert len(texts) == 350 and len({t.lower() for t in texts}) == 350
    assert sum(r["domain"] == "chat" for r in rows) == 300
    banned = texts[:10]
    again = synthesize(300, 50, exclude=banned, seed=1)
    assert not {r["turns"][0] for r in again} & set(banned)
    with pytest.raises(ValueError, match="distinct json"):
        synthesize(10, 10_000)


def test_synthesized_code_and_math_prompts() -> None:
    rows = synthesize(0, 0, seed=3, num_code=400, num_math=200)
    by_domain = {d: [r["turns"][0] for r in rows if r["domain"] == d] for d in ("code", "math")}
    assert len(by_domain["code"]) == 400 and len(by_domain["math"]) == 200
    assert all(t.endswith("within \\boxed{}.") for t in by_domain["math"])
    assert len({t.lower() for t in by_domain["code"]}) == 400
    # the stdlib stubs are real signatures with docstrings, in a fenced code block
    stubs = [t for t in by_domain["code"] if t.startswith("Write a solution")]
    assert stubs and all("```python\ndef " in t and '"""' in t for t in stubs)
    # a pool of zero rows takes nothing (and does not raise)
    assert synthesize(0, 5, seed=3) and all(r["domain"] == "json" for r in synthesize(0, 5))


def test_filter_prompts_drops_duplicates_and_near_eval_prompts() -> None:
    from dspark_sglang.training.filter_prompts import filter_prompts
    from dspark_sglang.training.synth_prompts import MATH_SUFFIX

    eval_texts = ["Find the greatest common divisor of $3339$, $2961$, and $1491$." + MATH_SUFFIX,
                  "Write a python function to find the volume of a triangular prism."]
    rows = [
        {"domain": "math", "turns": ["Find the greatest common divisor of $3339$, $2961$ and "
                                     "$1491$." + MATH_SUFFIX]},  # near: a comma dropped
        {"domain": "code", "turns": ["write a  Python function to find the volume of a "
                                     "triangular prism."]},  # equal once folded
        {"domain": "chat", "turns": ["Plan a three-day trip to Kyoto for a family."]},
        {"domain": "chat", "turns": ["plan a three-day trip to kyoto for a family."]},  # dup
        {"domain": "math", "turns": ["How many positive divisors does $360$ have?" + MATH_SUFFIX]},
    ]
    kept, dropped = filter_prompts(rows, eval_texts)
    assert [r["turns"][0][:20] for r in kept] == ["Plan a three-day tri", "How many positive di"]
    assert len(dropped) == 2


def test_written_prompts_file_holds_no_eval_prompt() -> None:
    from dspark_sglang.training.data import DEFAULT_PROMPT_FILES
    from dspark_sglang.training.filter_prompts import core_text, first_turns

    written = Path(__file__).parents[1] / "dspark_sglang" / "training" / "written_prompts.jsonl"
    assert str(written) in DEFAULT_PROMPT_FILES
    rows = read_jsonl(written)
    texts = {core_text(t) for t in first_turns(rows)}
    assert len(texts) == len(rows) >= 1500
    assert {r["domain"] for r in rows} == {"chat", "math", "code"}
    from dspark_sglang.utils.paths import workloads_dir

    eval_dir = workloads_dir() / "eval"
    if not eval_dir.is_dir():
        pytest.skip("no ../shared/workloads/eval here")
    evals = {core_text(t) for f in eval_dir.glob("*.jsonl") for r in read_jsonl(f)
             for t in r["turns"]}
    assert not texts & evals
