"""Merge prompt files written outside the project's synthesiser into one training prompt file,
keeping none that is, or nearly is, an evaluation prompt.

A prompt is dropped when its text (case and whitespace folded, the fixed frames the eval sets
share removed: the math suffix and the HumanEval preamble) equals an earlier prompt or an
``--exclude`` prompt, or is at least ``--near`` similar to an ``--exclude`` prompt
(``difflib.SequenceMatcher.ratio``): a prompt an author half-remembered from a public benchmark
does not reach the training data.

``python -m dspark_sglang.training.filter_prompts --out written_prompts.jsonl --inputs a.jsonl
b.jsonl --exclude ../shared/workloads/eval/*.jsonl``
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from dspark_sglang.training.synth_prompts import MATH_SUFFIX, _norm
from dspark_sglang.utils.jsonl import read_jsonl

FRAMES = (MATH_SUFFIX,
          "Write a solution to the following problem and make sure that it passes the tests:")


def core_text(text: str) -> str:
    """The comparable part of a prompt: normalised, fixed frames removed."""
    out = _norm(text)
    for frame in FRAMES:
        out = out.replace(_norm(frame), " ")
    return " ".join(out.split())


def first_turns(rows: Iterable[dict]) -> list[str]:
    return [str((r.get("turns") or [r.get("prompt", "")])[0]) for r in rows]


def filter_prompts(rows: Sequence[dict], exclude: Sequence[str], near: float = 0.8
                   ) -> tuple[list[dict], list[tuple[str, str]]]:
    """``rows`` ({"domain", "turns"}) without duplicates and without prompts equal or ``near``
    an ``exclude`` text. Returns (kept rows, [(dropped prompt, the eval prompt it resembles)])."""
    banned = [core_text(t) for t in exclude]
    banned_set = set(banned)
    kept: list[dict] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for row in rows:
        text = first_turns([row])[0]
        key = core_text(text)
        if key in seen:
            continue
        if key in banned_set:
            dropped.append((text, text))
            continue
        hit = next((b for b in banned
                    if difflib.SequenceMatcher(None, key, b).quick_ratio() >= near
                    and difflib.SequenceMatcher(None, key, b).ratio() >= near), None)
        if hit is not None:
            dropped.append((text, hit))
            continue
        seen.add(key)
        kept.append({"domain": str(row.get("domain", "chat")), "turns": [text]})
    return kept, dropped


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="merge written prompt files, eval prompts excluded")
    ap.add_argument("--out", required=True)
    ap.add_argument("--inputs", nargs="+", required=True)
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="jsonl prompt files (every turn) no kept prompt may equal or resemble")
    ap.add_argument("--near", type=float, default=0.8)
    args = ap.parse_args(argv)
    rows = [r for path in args.inputs for r in read_jsonl(path)]
    exclude = [str(t) for path in args.exclude for r in read_jsonl(path)
               for t in (r.get("turns") or [r.get("prompt", "")])]
    kept, dropped = filter_prompts(rows, exclude, args.near)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept))
    for text, hit in dropped:
        print(f"dropped {text[:70]!r} (like {hit[:70]!r})")
    print(f"wrote {len(kept)} of {len(rows)} prompts to {args.out} ({len(dropped)} too close "
          f"to an excluded prompt)")


if __name__ == "__main__":
    main()
