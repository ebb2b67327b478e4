"""The in-process Engine (no HTTP): greedy generation with the embedded default model.

    PYTHONPATH=. python examples/engine_example.py
"""

from __future__ import annotations

from dspark_sglang import Engine

if __name__ == "__main__":
    with Engine() as engine:  # no model_path: the embedded SmolLM2-135M-Instruct
        out = engine.generate("The capital of France is",
                              {"max_new_tokens": 16, "temperature": 0})
        print(out["text"])
        print(out["meta_info"])
