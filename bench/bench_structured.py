"""Structured options (issue 19): SPDY-structured vs uniform structured on dense torch, at measured speedups.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_structured.py --target 1.5 [--model minilm] \\
        [--work-dir bench/results/structured] [--budget 120s] [--pruner obs] [--heldout 64] [--out rows.jsonl]

One `spdy run --pattern structured` per invocation (the work directory caches the block timing
table and the structured database, so a second target reuses them): the SPDY profile and the
uniform one (the same kept fraction in every block, the least that meets the target) are each
landed on the target by the run's closed loop and measured as physically smaller models against
the dense model on dense torch (median of alternated rounds). Held-out loss is the run's:
1 - mean cosine of the pooled embeddings to the dense model's, on held-out text.
Prints one markdown row per method with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os

from spdy.pipeline import RunConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--work-dir", default="bench/results/structured")
    parser.add_argument("--budget", default="120s")
    parser.add_argument("--pruner", default="obs", choices=("obs", "magnitude"))
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="append every row here as a JSON line")
    args = parser.parse_args()

    before = os.getloadavg()
    cfg = RunConfig(model=args.model, target=args.target, pattern="structured", pruner=args.pruner, baselines=("uniform",),
                    search_budget=args.budget, heldout=args.heldout, rounds=args.rounds, threads=args.threads, work_dir=args.work_dir)
    summary = run(cfg, say=print, progress=False)
    after = os.getloadavg()
    print("\n| target | pruner | method | measured speedup (spread) | predicted | held-out 1-cos | load before / after |")
    print("|---|---|---|---|---|---|---|")
    for method, p in summary["profiles"].items():
        v = p["verify"]
        row = {"model": args.model, "target": args.target, "pruner": args.pruner, "method": method,
               "measured_speedup": v["measured_speedup"], "spread": v["measured_spread"], "predicted": p["predicted_speedup"],
               "heldout_loss": p["heldout_loss"], "quality": p["quality"], "dense_ms": v["dense_time"] * 1e3,
               "pruned_ms": v["pruned_time"] * 1e3, "rounds": v["rounds"], "load_before": before, "load_after": after,
               "kept": {u: k for u, k in p["options"].items()}}
        print(f"| {args.target:g}x | {args.pruner} | {method} | {v['measured_speedup']:.3f}x ({v['measured_spread']:.3f}) | "
              f"{p['predicted_speedup']:.3f}x | {p['heldout_loss']:.4f} | {before[0]:.2f} / {after[0]:.2f} |")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
