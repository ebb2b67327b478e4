"""Branch and merge with ``fork``: n branches share the prompt's KV (radix cache), then merge.

    python programs/branch_merge.py --url http://127.0.0.1:30000 --branches 3
"""

from __future__ import annotations

import argparse
from typing import Any

import sglang as sgl

TOPIC = "How can a small team ship a reliable web service?"


@sgl.function
def branch_merge(s: Any, topic: str, num_branches: int, max_tokens: int,
                 join_mode: str) -> list[dict[str, Any]]:
    s += ("You are planning an essay. Write one distinct, short idea per line.\n"
          "Topic: How do you learn a language?\nIdea 1: Speak with native speakers daily.\n"
          f"Idea 2: Read children's books first.\n\nTopic: {topic}\n")
    # fork() sends the shared prefix once (max_new_tokens=0) so every branch hits the radix
    # cache, but it checks the prefix text before the interpreter thread has appended it;
    # s.text() waits for that thread first (an upstream frontend race).
    s.text()
    forks = s.fork(num_branches)
    for i, f in enumerate(forks):
        f += f"Idea {i + 1}:" + sgl.gen("idea", max_tokens=max_tokens, temperature=0,
                                         stop="\n") + "\n"
    branch_meta = [f.get_meta_info("idea") for f in forks]  # waits for every branch
    forks.join(join_mode)
    if join_mode == "gather_variable":
        for i, idea in enumerate(s["idea"]):
            s += f"Idea {i + 1}:{idea}\n"
    s += "Summary in one sentence:" + sgl.gen("summary", max_tokens=max_tokens, temperature=0,
                                              stop="\n\n")
    return branch_meta


def main(url: str, num_branches: int = 3, max_tokens: int = 16,
         join_mode: str = "gather_variable") -> dict:
    """Returns the branch ideas, their ``meta_info`` (``cached_tokens`` shows the shared prompt
    being reused) and the merged summary."""
    backend = sgl.RuntimeEndpoint(url)
    state = branch_merge.run(topic=TOPIC, num_branches=num_branches, max_tokens=max_tokens,
                             join_mode=join_mode, backend=backend)
    return {"summary": state["summary"], "text": state.text(),
            "branch_meta": state.ret_value, "summary_meta": state.get_meta_info("summary")}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--join-mode", default="gather_variable",
                   choices=["gather_variable", "concate_and_append"])
    a = p.parse_args()
    print(main(a.url, a.branches, join_mode=a.join_mode)["text"])
