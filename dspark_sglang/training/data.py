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
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_sglang.utils.jsonl import iter_jsonl, read_jsonl
from dspark_sglang.utils.paths import workloads_dir

DEFAULT_PROMPT_FILES = (
    str(workloads_dir() / "train_prompts.jsonl"),
    str(Path(__file__).with_name("chat_json_prompts.jsonl")),
    str(Path(__file__).with_name("chat_json_synth.jsonl")),
    str(Path(__file__).with_name("chat_synth2.jsonl")),
    str(Path(__file__).with_name("code_math_synth.jsonl")),
    str(Path(__file__).with_name("written_prompts.jsonl")),
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
        for i, row in iter_jsonl(p):
            turns = row.get("turns") or [row.get("prompt", "")]
            out.append(Prompt(f"{p.stem}:{i}", str(row.get("domain", p.stem)), str(turns[0])))
    return out


def read_samples(path: str | Path) -> list[Sample]:
    """All samples of a data jsonl (missing file = empty)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = read_jsonl(p)
    return [Sample(r["key"], r["prompt_ids"], r["output_ids"], r.get("domain", ""),
                   float(r.get("temperature", 0.0))) for r in rows]


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
    domain_max_new_tokens: dict[str, int] | None = None,
    log_every: int = 8,
    key_suffix: str = "",
) -> dict[str, float]:
    """Answer every prompt not yet in ``out_path`` with ``engine`` and append the results.

    ``engine`` is an :class:`dspark_sglang.entrypoints.engine.Engine` (or anything with the same
    ``generate(input_ids=[[...]], sampling_params=[...])`` and ``tokenizer``). Returns
    ``{"new_samples", "new_tokens", "seconds", "tokens_per_s"}`` for this call.

    ``batch_size`` requests run at once (continuously); ``domain_max_new_tokens`` overrides
    ``max_new_tokens`` per prompt domain (e.g. longer chat answers). A prompt's temperature and
    seed depend only on its position in ``prompts`` and ``seed``, so a resumed run makes the same
    answers. ``key_suffix`` is appended to every key written (and looked up for resuming): a second
    pass over the same prompts with another seed and suffix adds new answers instead of skipping.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {s.key for s in read_samples(out)}
    rng = random.Random(seed)
    temps = {p.key: (1.0 if rng.random() < sample_fraction else 0.0) for p in prompts}
    seeds = {p.key: seed + i for i, p in enumerate(prompts)}
    todo = [p for p in prompts if p.key + key_suffix not in done]
    tok = engine.tokenizer
    limits = dict(domain_max_new_tokens or {})
    t0 = time.monotonic()
    lock = threading.Lock()
    counts = {"tokens": 0, "samples": 0}

    def answer(p: Prompt) -> None:
        pid = tok.encode(tok.apply_chat_template([{"role": "user", "content": p.text}]))
        if len(pid) > max_prompt_tokens:
            return
        sp = {"max_new_tokens": limits.get(p.domain, max_new_tokens),
              "temperature": temps[p.key], "seed": seeds[p.key]}
        o = engine.generate(input_ids=[pid], sampling_params=[sp])[0]
        row = {"key": p.key + key_suffix, "domain": p.domain, "temperature": sp["temperature"],
               "prompt_ids": pid, "output_ids": list(o["output_ids"])}
        with lock:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            counts["tokens"] += len(row["output_ids"])
            counts["samples"] += 1
            if counts["samples"] % log_every == 0:
                dt = time.monotonic() - t0
                log(f"[data] {len(done) + counts['samples']}/{len(prompts)} prompts, "
                    f"{counts['tokens']} new tokens, {counts['tokens'] / max(dt, 1e-9):.1f} tok/s")

    # One thread per in-flight request keeps ``batch_size`` requests running continuously (no
    # batch barrier waiting for the longest answer); each answer is appended when it finishes.
    with ThreadPoolExecutor(max_workers=batch_size) as pool:
        for fut in [pool.submit(answer, p) for p in todo]:
            fut.result()
    n_tokens, n_samples = counts["tokens"], counts["samples"]
    dt = time.monotonic() - t0
    return {"new_samples": float(n_samples), "new_tokens": float(n_tokens), "seconds": dt,
            "tokens_per_s": n_tokens / max(dt, 1e-9)}


def select_prompts(prompts: list[Prompt], seed: int, domains: Sequence[str] | None = None,
                   limit: int = 0) -> list[Prompt]:
    """Shuffled by ``seed`` (the order a resumed run repeats), then only ``domains``, then the
    first ``limit``."""
    out = list(prompts)
    random.Random(seed).shuffle(out)
    if domains:
        out = [p for p in out if p.domain in set(domains)]
    return out[:limit] if limit else out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dspark_sglang.training.data --out data.jsonl [--limit N] ...``"""
    import argparse

    ap = argparse.ArgumentParser(description="regenerate training answers with the target")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", nargs="*", default=list(DEFAULT_PROMPT_FILES))
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sample-fraction", type=float, default=0.25)
    ap.add_argument("--limit", type=int, default=0, help="use the first N prompts after shuffle")
    ap.add_argument("--domains", nargs="*", default=None,
                    help="only prompts of these domains (e.g. code), to grow a thin one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domain-max-new-tokens", nargs="*", default=["chat=512"],
                    help="per-domain overrides of --max-new-tokens, e.g. chat=512")
    ap.add_argument("--key-suffix", default="",
                    help="appended to every sample key, e.g. '@s15' for a second answer per "
                         "prompt (with another --seed) next to the first")
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--attention-backend", default=None,
                    help="engine attention backend (default: the engine's; 'cpu' decodes long "
                         "float32 batches ~2x faster on CPUs, docs/benchmarks.md)")
    args = ap.parse_args(argv)

    from dspark_sglang.entrypoints.engine import Engine

    prompts = select_prompts(read_prompts(args.prompts), args.seed, args.domains, args.limit)
    limits = {k: int(v) for k, v in (x.split("=", 1) for x in args.domain_max_new_tokens)}
    longest = max([args.max_new_tokens, *limits.values()])
    engine = Engine(model_path=args.model_path, dtype=args.dtype,
                    max_total_tokens=max(8192, args.batch_size * (512 + longest)),
                    max_running_requests=args.batch_size, num_threads=args.num_threads,
                    **({"attention_backend": args.attention_backend}
                       if args.attention_backend else {}))
    try:
        stats = generate_dataset(engine, prompts, args.out, args.max_new_tokens,
                                 args.batch_size, args.sample_fraction, args.seed,
                                 domain_max_new_tokens=limits, key_suffix=args.key_suffix)
    finally:
        engine.shutdown()
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
