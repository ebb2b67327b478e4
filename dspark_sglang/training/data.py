"""Self-distillation data: the target regenerates answers to training prompts (DeepSpec style).

Input prompt files are jsonl with ``{"turns": [str, ...], "domain": str?}`` (the first turn is
used). Each prompt is rendered with the target's chat template (non-thinking: a plain user
message, generation prompt appended) and answered by our own :class:`Engine` in batch mode.

Output: one jsonl line per finished prompt::

    {"key": "<file stem>:<line>", "domain": str, "temperature": float,
     "prompt_ids": [int, ...], "output_ids": [int, ...]}

The file is appended after every batch and ``key`` identifies a prompt, so a rerun skips the
prompts already answered (resumable). Greedy and T=1 answers are mixed per prompt with a fixed,
seeded draw (``sample_fraction``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROMPT_FILES = (
    "/work/shared/workloads/train_prompts.jsonl",
    str(Path(__file__).with_name("chat_json_prompts.jsonl")),
)


@dataclass(frozen=True)
class Prompt:
    key: str
    domain: str
    text: str


@dataclass(frozen=True)
class Sample:
    """One regenerated training sequence: ``prompt_ids + output_ids``."""

    key: str
    prompt_ids: list[int]
    output_ids: list[int]
    domain: str = ""
    temperature: float = 0.0

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


def read_prompts(paths: Sequence[str | Path]) -> list[Prompt]:
    """Prompts from jsonl files (first turn of each line); refuses the held-out eval folder."""
    out: list[Prompt] = []
    for path in paths:
        p = Path(path)
        if "workloads/eval" in p.resolve().as_posix():
            raise ValueError(f"refusing to train on evaluation prompts: {p}")
        for i, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            turns = row.get("turns") or [row.get("prompt", "")]
            out.append(Prompt(f"{p.stem}:{i}", str(row.get("domain", p.stem)), str(turns[0])))
    return out


def read_samples(path: str | Path) -> list[Sample]:
    """All samples of a data jsonl (missing file = empty)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return [Sample(r["key"], r["prompt_ids"], r["output_ids"], r.get("domain", ""),
                   float(r.get("temperature", 0.0))) for r in rows]


def _batches(items: Sequence[Prompt], size: int) -> Iterator[list[Prompt]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def generate_dataset(
    engine: Any,
    prompts: Sequence[Prompt],
    out_path: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    sample_fraction: float = 0.25,
    seed: int = 0,
    max_prompt_tokens: int = 512,
    log: Any = print,
) -> dict[str, float]:
    """Answer every prompt not yet in ``out_path`` with ``engine`` and append the results.

    ``engine`` is an :class:`dspark_sglang.entrypoints.engine.Engine` (or anything with the same
    ``generate(input_ids=[[...]], sampling_params=[...])`` and ``tokenizer``). Returns
    ``{"new_samples", "new_tokens", "seconds", "tokens_per_s"}`` for this call.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {s.key for s in read_samples(out)}
    todo = [p for p in prompts if p.key not in done]
    rng = random.Random(seed)
    temps = {p.key: (1.0 if rng.random() < sample_fraction else 0.0) for p in prompts}
    tok = engine.tokenizer
    t0 = time.monotonic()
    n_tokens = n_samples = 0
    for batch in _batches(todo, batch_size):
        ids, params, kept = [], [], []
        for p in batch:
            text = tok.apply_chat_template([{"role": "user", "content": p.text}])
            pid = tok.encode(text)
            if len(pid) > max_prompt_tokens:
                continue
            ids.append(pid)
            params.append({"max_new_tokens": max_new_tokens, "temperature": temps[p.key],
                           "seed": seed + len(done) + n_samples + len(kept)})
            kept.append(p)
        if not kept:
            continue
        outs = engine.generate(input_ids=ids, sampling_params=params)
        with out.open("a") as f:
            for p, pid, sp, o in zip(kept, ids, params, outs):
                f.write(json.dumps({"key": p.key, "domain": p.domain,
                                    "temperature": sp["temperature"], "prompt_ids": pid,
                                    "output_ids": list(o["output_ids"])}) + "\n")
                n_tokens += len(o["output_ids"])
        n_samples += len(kept)
        dt = time.monotonic() - t0
        log(f"[data] {len(done) + n_samples}/{len(prompts)} prompts, {n_tokens} new tokens, "
            f"{n_tokens / max(dt, 1e-9):.1f} tok/s")
    dt = time.monotonic() - t0
    return {"new_samples": float(n_samples), "new_tokens": float(n_tokens), "seconds": dt,
            "tokens_per_s": n_tokens / max(dt, 1e-9)}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dspark_sglang.training.data --out data.jsonl [--limit N] ...``"""
    import argparse

    ap = argparse.ArgumentParser(description="regenerate training answers with the target")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", nargs="*", default=list(DEFAULT_PROMPT_FILES))
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sample-fraction", type=float, default=0.25)
    ap.add_argument("--limit", type=int, default=0, help="use the first N prompts after shuffle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=None)
    args = ap.parse_args(argv)

    from dspark_sglang.entrypoints.engine import Engine

    prompts = read_prompts(args.prompts)
    random.Random(args.seed).shuffle(prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    engine = Engine(model_path=args.model_path, dtype=args.dtype,
                    max_total_tokens=max(8192, args.batch_size * (512 + args.max_new_tokens)),
                    max_running_requests=args.batch_size, num_threads=args.num_threads)
    try:
        stats = generate_dataset(engine, prompts, args.out, args.max_new_tokens,
                                 args.batch_size, args.sample_fraction, args.seed)
    finally:
        engine.shutdown()
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
