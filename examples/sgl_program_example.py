"""An unmodified ``sglang`` frontend program against our server, started by ``Runtime``.

    PYTHONPATH=. python examples/sgl_program_example.py
"""

from __future__ import annotations

from typing import Any

import sglang as sgl

from dspark_sglang import Runtime


@sgl.function
def qa(s: Any, question: str) -> None:
    s += f"Q: {question}\nA:" + sgl.gen("answer", max_tokens=24, temperature=0, stop="\n")
    s += "\nIs that answer correct?" + sgl.select("check", choices=[" yes", " no"])


if __name__ == "__main__":
    with Runtime() as rt:  # the embedded default model on a free 127.0.0.1 port
        state = qa.run(question="What is the capital of Japan?", backend=rt.endpoint)
        print(state["answer"], "|", state["check"])
        print(state.get_meta_info("answer"))
