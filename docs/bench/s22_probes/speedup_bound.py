"""What speed-up over plain decoding a drafter of a given acceptance could give at c=1 on this
host, from its SPS table (target forward time by verify-token count) and a draft's cost.

    python docs/bench/s22_probes/speedup_bound.py SPS_JSON --draft-ms 1.5 --overhead-ms 0.3
    python docs/bench/s22_probes/speedup_bound.py 1:2.78,2:3.03,4:3.68,8:5.92 --draft-ms 1.5

Per-position acceptance ``a`` (the same at every block position, i.i.d.: the usual model),
block ``g`` = 7. Verifying ``k`` drafts gives ``(1 - a^(k+1)) / (1 - a)`` tokens a step for
``draft + T(k + 1) + overhead`` ms, against ``T(1) + overhead`` ms a token without drafting;
the best ``k`` per ``a`` is taken. T(b) = 1000 / SPS(b): a verify priced as the table's hot
loop prices it (in the engine a verify after a draft measured 0.3-2 ms dearer), so the bound is
optimistic.
"""

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sps", help="an SPS table JSON, or 'tokens:ms,...' forward times")
    ap.add_argument("--draft-ms", type=float, required=True)
    ap.add_argument("--overhead-ms", type=float, default=0.0)
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.sps.endswith(".json"):
        t = json.load(open(args.sps))
        counts, sps = t["sample_batch_tokens"], t["sample_steps_per_sec"]
    else:
        pairs = [p.split(":") for p in args.sps.split(",")]
        counts, sps = [int(b) for b, _ in pairs], [1000 / float(m) for _, m in pairs]

    def ms(b: int) -> float:  # linear interpolation of 1 / SPS
        for (b0, s0), (b1, s1) in zip(zip(counts, sps), zip(counts[1:], sps[1:])):
            if b0 <= b <= b1:
                return 1000 * (1 / s0 + (b - b0) / (b1 - b0) * (1 / s1 - 1 / s0))
        return 1000 / sps[0]

    plain = ms(1) + args.overhead_ms
    rows = []
    print(f"T(1..{args.block + 1}) ms: " + " ".join(f"{ms(b):.2f}"
                                                  for b in range(1, args.block + 2)))
    print(f"plain step {plain:.2f} ms; draft {args.draft_ms} ms")
    print("| acceptance a | tau at block | best k | tokens a step | step ms | speed-up vs plain |")
    print("|---|---|---|---|---|---|")
    for a in (0.6, 0.65, 0.7, 0.74, 0.8, 0.85, 0.9, 0.95, 1.0):
        def tau(k: int, a: float = a) -> float:
            return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)
        best = max(range(1, args.block + 1),
                   key=lambda k: tau(k) / (args.draft_ms + ms(k + 1) + args.overhead_ms))
        step = args.draft_ms + ms(best + 1) + args.overhead_ms
        sp = tau(best) / step * plain
        rows.append({"a": a, "tau_block": tau(args.block), "k": best, "tokens": tau(best),
                     "step_ms": step, "speedup": sp})
        print(f"| {a:.2f} | {tau(args.block):.2f} | {best} | {tau(best):.2f} | {step:.2f} "
              f"| {sp:.2f}x |")
    if args.out:
        json.dump({"sps": args.sps, "draft_ms": args.draft_ms, "overhead_ms": args.overhead_ms,
                   "plain_ms": plain, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
