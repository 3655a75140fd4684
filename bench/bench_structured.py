"""Structured options (issue 19): SPDY-structured vs uniform structured on dense torch, at measured speedups.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_structured.py --target 1.5 [--model minilm] \\
        [--work-dir bench/results/structured] [--budget 120s] [--pruner obs] [--heldout 64] [--out rows.jsonl]
    # SmolLM2-135M, prefill (whole sequences), perplexity on held-out pydoc text:
    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_structured.py --model smollm2 --target 1.3 \\
        --workload prefill:4x128 --samples 16 --validation 16 --heldout 32 --budget 6m --rounds 15 \\
        --work-dir bench/results/structured-smollm2 --out rows.jsonl

One `spdy run --pattern structured` per invocation (the work directory caches the block timing
table, the structured database, every searched profile and every verify, so an invocation cut
short by a time limit resumes where it stopped, and a second target reuses the table and the
database): the SPDY profile and the uniform one (the same kept fraction in every block, the least
that meets the target) are each landed on the target by the run's closed loop and measured as
physically smaller models against the dense model on dense torch (median of alternated rounds).
Held-out loss is the run's: 1 - mean cosine of the pooled embeddings to the dense model's for
MiniLM, next-token cross-entropy for a causal LM (whose perplexity is printed too).
Prints one markdown row per method with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os

from spdy.pipeline import RunConfig, run
from spdy.search.profile import ANCHORS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--work-dir", default="bench/results/structured")
    parser.add_argument("--budget", default="120s")
    parser.add_argument("--pruner", default="obs", choices=("obs", "magnitude"))
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples the search scores candidates on")
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--workload", help="e.g. prefill:4x128 (a causal LM's default is decode, which structured pruning is not timed for)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--anchors", default=",".join(ANCHORS), help="SPDY's anchors (none: random starts only)")
    parser.add_argument("--out", help="append every row here as a JSON line")
    args = parser.parse_args()

    before = os.getloadavg()
    cfg = RunConfig(model=args.model, target=args.target, pattern="structured", pruner=args.pruner, baselines=("uniform",),
                    search_budget=args.budget, heldout=args.heldout, samples=args.samples, validation=args.validation,
                    workload=args.workload, rounds=args.rounds, threads=args.threads, work_dir=args.work_dir,
                    anchors=args.anchors)
    summary = run(cfg, say=print, progress=False)
    after = os.getloadavg()
    print("\n| model | target | pruner | method | measured speedup (spread) | predicted | held-out loss | perplexity (dense) | load before / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, p in summary["profiles"].items():
        v, quality = p["verify"], p["quality"] or {}
        perplexity = f"{quality['perplexity']:.3f} ({quality['dense_perplexity']:.3f})" if "perplexity" in quality else "-"
        row = {"model": args.model, "target": args.target, "pruner": args.pruner, "method": method, "workload": args.workload,
               "anchors": args.anchors if method == "spdy" else None,
               "measured_speedup": v["measured_speedup"], "spread": v["measured_spread"], "predicted": p["predicted_speedup"],
               "heldout_loss": p["heldout_loss"], "quality": p["quality"], "dense_ms": v["dense_time"] * 1e3,
               "pruned_ms": v["pruned_time"] * 1e3, "rounds": v["rounds"], "load_before": before, "load_after": after,
               "kept": {u: k for u, k in p["options"].items()}}
        print(f"| {args.model} | {args.target:g}x | {args.pruner} | {method} | {v['measured_speedup']:.3f}x ({v['measured_spread']:.3f}) | "
              f"{p['predicted_speedup']:.3f}x | {p['heldout_loss']:.4f} | {perplexity} | {before[0]:.2f} / {after[0]:.2f} |")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
