"""Multi-turn chat: every turn re-sends the whole conversation, so turn k+1 reuses turn k's KV.

    python programs/multi_turn_chat.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import sglang as sgl

QUESTIONS = (
    "What is speculative decoding?",
    "Why does it not change the output?",
    "Give one short example.",
)


@sgl.function
def multi_turn(s: Any, questions: list[str], max_tokens: int) -> None:
    s += sgl.system("You are a concise assistant.")
    for i, q in enumerate(questions):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0))


def main(url: str, max_tokens: int = 24, questions: tuple[str, ...] = QUESTIONS) -> dict:
    """Run the conversation; returns the answers and per-turn ``meta_info``."""
    backend = sgl.RuntimeEndpoint(url)
    state = multi_turn.run(questions=list(questions), max_tokens=max_tokens, backend=backend)
    names = [f"answer_{i}" for i in range(len(questions))]
    return {"answers": [state[n] for n in names],
            "meta": [state.get_meta_info(n) for n in names], "text": state.text()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--max-tokens", type=int, default=24)
    a = p.parse_args()
    print(json.dumps(main(a.url, a.max_tokens)["answers"], indent=2, ensure_ascii=False))
