"""``python -m dspark_sglang.training.token_map``: rank the answer tokens of self-distilled
training data into a drafter's ``token_map.json`` (speculative/dspark/token_map.py).

Only ``output_ids`` count (what the target writes is what the drafter must propose); ids the
data never shows follow in id order up to ``--size``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dspark_sglang.speculative.dspark.token_map import build_token_map, save_token_map
from dspark_sglang.utils.jsonl import read_jsonl


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dspark_sglang.training.token_map")
    ap.add_argument("--data", nargs="+", required=True, help="training jsonl (output_ids)")
    ap.add_argument("--out", required=True, help="token_map.json to write")
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--vocab-size", type=int, default=49152)
    args = ap.parse_args(argv)
    answers = [row["output_ids"] for path in args.data for row in read_jsonl(path)]
    ids = build_token_map(answers, args.vocab_size, args.size)
    seen = {t for a in answers for t in a}
    save_token_map(args.out, ids, args.vocab_size,
                   {"sequences": len(answers), "tokens": sum(len(a) for a in answers),
                    "distinct": len(seen), "size": len(ids)})
    print(f"wrote {args.out}: {len(ids)} ids from {len(answers)} answers "
          f"({len(seen)} distinct tokens)")


if __name__ == "__main__":
    main()
