"""An agent-style tool loop with ``regex``: the model picks a tool and its argument under regex
constraints, the client runs the tool and appends the observation, until ``finish`` or the step
limit. Every call re-sends the growing transcript, so each step reuses the previous steps' KV.

    python programs/tool_agent.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
from typing import Any

import sglang as sgl

TOOLS = {
    "calculator": "evaluates + - * on integers, e.g. 3 * 4",
    "lookup": "looks a word up in a tiny dictionary",
    "finish": "gives the final answer",
}
DICTIONARY = {"tau": "accepted tokens per verify step", "kv": "key/value cache"}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
ARG_REGEX = {"calculator": r"[0-9]{1,3}( [-+*] [0-9]{1,3}){0,2}", "lookup": r"[a-z]{1,8}",
             "finish": r"[A-Za-z0-9 ]{1,24}"}


def _calc(expr: str) -> str:
    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported expression {expr!r}")

    return str(ev(ast.parse(expr, mode="eval").body))


def run_tool(tool: str, arg: str) -> str:
    if tool == "calculator":
        return _calc(arg)
    if tool == "lookup":
        return DICTIONARY.get(arg, "unknown word")
    raise ValueError(f"unknown tool {tool!r}")


@sgl.function
def agent(s: Any, task: str, max_steps: int) -> list[dict[str, str]]:
    s += "You can use these tools:\n"
    for name, doc in TOOLS.items():
        s += f"- {name}: {doc}\n"
    s += f"Task: {task}\n"
    trace: list[dict[str, str]] = []
    for step in range(max_steps):
        s += f"Step {step + 1} tool: " + sgl.gen(
            "tool", max_tokens=16, temperature=0, regex="(calculator|lookup|finish)")
        tool = s["tool"]
        s += "\nArgument: " + sgl.gen("arg", max_tokens=16, temperature=0,
                                      regex=ARG_REGEX[tool])
        arg = s["arg"]
        if tool == "finish":
            trace.append({"tool": tool, "arg": arg, "observation": ""})
            break
        obs = run_tool(tool, arg)
        trace.append({"tool": tool, "arg": arg, "observation": obs})
        s += f"\nObservation: {obs}\n"
    return trace


def main(url: str, task: str = "What is 12 * 7 + 3?", max_steps: int = 4) -> dict:
    """Returns the tool-call trace and the final transcript."""
    backend = sgl.RuntimeEndpoint(url)
    state = agent.run(task=task, max_steps=max_steps, backend=backend)
    return {"trace": state.ret_value, "text": state.text()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--task", default="What is 12 * 7 + 3?")
    a = p.parse_args()
    print(json.dumps(main(a.url, a.task)["trace"], indent=2))
