"""Benchmark prompts: ``{"turns": [...]}`` prompt files and JSON-schema task files.

Prompt files hold one JSON object per line with a ``turns`` list (the first turn is used); task
files hold ``{"prompt": ..., "schema": {...}}`` lines. The domain of a prompt is its file's stem
(``gsm8k``, ``humaneval``, ...). The default workloads folder is ``$DSPARK_WORKLOADS_DIR`` or
``shared/workloads`` beside the repository checkout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_sglang.utils.jsonl import iter_jsonl
from dspark_sglang.utils.paths import WORKLOADS_ENV_VAR, workloads_dir

__all__ = ["WORKLOADS_ENV_VAR", "PromptItem", "default_workloads_dir", "load_prompt_file"]

# Used only when no workloads folder exists (a fresh machine without shared/).
_FALLBACK_PROMPTS = (
    ("builtin", "Explain in three sentences why the sky is blue."),
    ("builtin", "Write a Python function that returns the n-th Fibonacci number."),
    ("builtin", "List five fruits and their colours, one per line."),
    ("builtin", ("Natalia sold clips to 48 friends in April and half as many in May. How many "
                 "clips did she sell in total? Reason step by step.")),
)


@dataclass(frozen=True)
class PromptItem:
    """One benchmark request: the user text, its domain, and an optional JSON schema."""

    text: str
    domain: str
    schema: dict[str, Any] | None = None


def default_workloads_dir() -> Path:
    return workloads_dir()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object")  # noqa: TRY004
        rows.append(obj)
    return rows


def load_prompt_file(path: str | Path, limit: int | None = None) -> list[PromptItem]:
    """Prompts of one file: ``{"turns": [...]}`` lines (first turn) or ``{"prompt", "schema"}``
    task lines. ``limit`` keeps the first N. Raises ValueError on a malformed line."""
    p = Path(path)
    items: list[PromptItem] = []
    for i, obj in enumerate(_read_jsonl(p)):
        if "turns" in obj:
            turns = obj["turns"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise ValueError(f"{p}:{i + 1}: 'turns' must be a non-empty list of strings")
            items.append(PromptItem(turns[0], p.stem))
        elif "prompt" in obj:
            schema = obj.get("schema")
            if schema is not None and not isinstance(schema, dict):
                raise ValueError(f"{p}:{i + 1}: 'schema' must be a JSON object")
            items.append(PromptItem(str(obj["prompt"]), p.stem, schema))
        else:
            raise ValueError(f"{p}:{i + 1}: expected a 'turns' or 'prompt' field")
        if limit is not None and len(items) >= limit:
            break
    return items


def default_eval_prompts(per_file: int = 2, root: str | Path | None = None) -> list[PromptItem]:
    """The first ``per_file`` prompts of each ``eval/*.jsonl`` (interleaved by domain), or a few
    built-in prompts when the workloads folder is absent."""
    eval_dir = Path(root) if root is not None else default_workloads_dir() / "eval"
    files = sorted(eval_dir.glob("*.jsonl")) if eval_dir.is_dir() else []
    if not files:
        return [PromptItem(t, d) for d, t in _FALLBACK_PROMPTS][: max(per_file, 1) * 2]
    per_domain = [load_prompt_file(f, per_file) for f in files]
    out: list[PromptItem] = []
    for k in range(per_file):
        out += [items[k] for items in per_domain if k < len(items)]
    return out


def load_prompts(paths: list[str] | None, per_file: int, num_prompts: int | None = None
                 ) -> list[PromptItem]:
    """``paths`` (files, or folders of ``*.jsonl``) or the default eval set; at most
    ``per_file`` from each file, then at most ``num_prompts`` in all."""
    if not paths:
        items = default_eval_prompts(per_file)
    else:
        items = []
        for raw in paths:
            p = Path(raw)
            files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
            if not files or not all(f.is_file() for f in files):
                raise ValueError(f"prompt file {raw!r} not found")
            for f in files:
                items += load_prompt_file(f, per_file)
    if num_prompts is not None:
        items = items[:num_prompts]
    if not items:
        raise ValueError("no prompts loaded")
    return items


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as one user turn through the model's chat template (plain text without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return text
    return str(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True))


def sampling_for(item: PromptItem, max_new_tokens: int, temperature: float, seed: int | None,
                 ignore_eos: bool = False) -> dict[str, Any]:
    """SGLang-style sampling params for one request (``json_schema`` as a JSON string)."""
    sp: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if temperature > 0 and seed is not None:
        sp["seed"] = seed
    if ignore_eos:
        sp["ignore_eos"] = True
    if item.schema is not None:
        sp["json_schema"] = json.dumps(item.schema)
    return sp
