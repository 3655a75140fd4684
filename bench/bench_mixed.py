"""Mixed profiles (issue 19): shrink with structured options, then prune the smaller model unstructured, against
unstructured alone and structured alone, at one target measured over the original model on dense torch.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_mixed.py --target 2 --shrink 1.3 \\
        [--model minilm] [--work-dir bench/results/mixed] [--budget 120s] [--out rows.jsonl]

Three `spdy run`s, each cached in its own work directory (a cut-short invocation resumes):
- *unstructured*: `spdy run MODEL --target T` on our sparse runtime (engine torch-cpu);
- *mixed*: `spdy run MODEL --shrink S --target T`: the structured stage lands on S x over dense torch, and the
  smaller model is then pruned unstructured to T x over the original;
- *structured*: `spdy run MODEL --pattern structured --target T` on the mixed run's block table and structured
  database (linked).
Each run's SPDY profile and its uniform baseline are landed by the run's closed loop and measured over the original
model in dense torch (median of alternated rounds); held-out loss is against the original model's outputs. One
markdown row per run and method, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from spdy.pipeline import RunConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--shrink", type=float, required=True)
    parser.add_argument("--work-dir", default="bench/results/mixed")
    parser.add_argument("--budget", default="120s")
    parser.add_argument("--runs", default="unstructured,mixed,structured")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="append every row here as a JSON line")
    args = parser.parse_args()

    work = Path(args.work_dir)
    common = dict(model=args.model, target=args.target, baselines=("uniform",), search_budget=args.budget, rounds=args.rounds,
                  threads=args.threads)
    mixed_dir = work / f"mixed-{args.shrink:g}"
    configs = {
        "unstructured": RunConfig(**common, work_dir=str(work / "unstructured")),
        "mixed": RunConfig(**common, shrink=args.shrink, work_dir=str(mixed_dir)),
        "structured": RunConfig(**common, pattern="structured", work_dir=str(work / "structured")),
    }
    rows = []
    for name in args.runs.split(","):
        if name == "structured":  # the mixed run's block table and structured database, linked rather than measured again
            (work / "structured").mkdir(parents=True, exist_ok=True)
            for cached in [*(mixed_dir / "shrink").glob("timings-*"), *(mixed_dir / "shrink").glob("database-*")]:
                if not (link := work / "structured" / cached.name).exists():
                    link.symlink_to(cached.resolve())
        before = os.getloadavg()
        summary = run(configs[name], say=lambda text, n=name: print(f"[{n}] {text}", flush=True), progress=False)
        after = os.getloadavg()
        for method, p in summary["profiles"].items():
            v = p["verify"]
            rows.append({"run": name, "method": method, "target": args.target, "shrink": args.shrink if name == "mixed" else None,
                         "shrunk_measured": (summary.get("shrink") or {}).get("measured_speedup"),
                         "measured_speedup": v["measured_speedup"], "spread": v["measured_spread"], "baseline": v["baseline"],
                         "over_engine_dense": v.get("speedup_over_engine_dense"), "predicted": p["predicted_speedup"],
                         "heldout_loss": p["heldout_loss"], "quality": p["quality"], "landing_rounds": len(p["rounds"]),
                         "dense_ms": v["dense_time"] * 1e3, "pruned_ms": v["pruned_time"] * 1e3, "load_before": before,
                         "load_after": after})
    print("\n| run | method | measured speedup (spread) over | over the engine's fastest dense | held-out loss | landing rounds | load before / after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        engine = "-" if r["over_engine_dense"] is None else f"{r['over_engine_dense']:.3f}x"
        shrunk = f", shrunk {r['shrunk_measured']:.3f}x first" if r["shrunk_measured"] else ""
        print(f"| {r['run']}{shrunk} | {r['method']} | {r['measured_speedup']:.3f}x ({r['spread']:.3f}) over {r['baseline']} | {engine} "
              f"| {r['heldout_loss']:.4f} | {r['landing_rounds']} | {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
