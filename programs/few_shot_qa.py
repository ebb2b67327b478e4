"""Few-shot QA with ``select``: the model scores each choice by its token-length-normalised logprob.

    python programs/few_shot_qa.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import sglang as sgl

EXAMPLES = (
    ("What color is the sky on a clear day?", "blue"),
    ("What is 2 + 2?", "four"),
    ("Which animal barks?", "dog"),
)
QUESTIONS = (
    ("How many legs does a cat have?", ("two", "four", "six")),
    ("Which planet do we live on?", ("Mars", "Earth", "Venus")),
)


@sgl.function
def few_shot_qa(s: Any, question: str, choices: list[str]) -> None:
    s += "Answer each question with one word.\n\n"
    for q, a in EXAMPLES:
        s += f"Q: {q}\nA: {a}\n\n"
    s += f"Q: {question}\nA:" + sgl.select("answer", choices=[" " + c for c in choices])
    s += "\nConfidence (low/high):" + sgl.gen("confidence", max_tokens=8, temperature=0,
                                             regex=r" (low|high)")


def main(url: str, questions: tuple[tuple[str, tuple[str, ...]], ...] = QUESTIONS) -> dict:
    """Answer every question (as one ``run_batch``); returns answers and select ``meta_info``."""
    backend = sgl.RuntimeEndpoint(url)
    states = few_shot_qa.run_batch(
        [{"question": q, "choices": list(c)} for q, c in questions], backend=backend)
    return {"answers": [st["answer"].strip() for st in states],
            "confidence": [st["confidence"].strip() for st in states],
            "select_meta": [st.get_meta_info("answer") for st in states],
            "texts": [st.text() for st in states]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    a = p.parse_args()
    r = main(a.url)
    print(json.dumps({"answers": r["answers"], "confidence": r["confidence"]}, indent=2))
