"""Does the measured speedup land on the target? Raw vs calibrated vs planned table, before and after the closed loop.

    .venv/bin/python bench/bench_landing.py [--model minilm] [--work-dir spdy-work]
        [--targets 1.3,2,2.7,3.4] [--rounds 20] [--threads N] [--variants raw,calibrated,planned]

For each target: the DP profile over the database's own errors (the `dp-errors` baseline, OBS
weights), solved on the raw timing table, on the table calibrated to the deployed runtime
(`pipeline.calibrate`) at the target, and on the calibrated table at its planning target
(`TimingTable.planning_target`: what `spdy run` does), verified, then put through the closed
loop (`pipeline.land`). Reuses
the timing table, calibration and database cached in ``--work-dir`` by `spdy run` (or makes
them). Prints one Markdown table: per target and table, the first round's measured / target and
the landed one, with the rounds it took. Goal (issue 16): first rounds within [0.97, 1.08],
median within [0.98, 1.04]; after the loop all within [0.98, 1.05].
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from spdy import pipeline
from spdy.cli import _levels as parse_levels
from spdy.search import baselines
from spdy.verification import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--work-dir", default="spdy-work")
    parser.add_argument("--targets", default=None, help="comma-separated; default 1.3 up to 90%% of the calibrated maximum, five points")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores (and the table `spdy run` cached)")
    parser.add_argument("--variants", default="raw,calibrated,planned")
    parser.add_argument("--levels", default=None, help="sparsity levels as `spdy run` takes them (default: the SPDY grid)")
    parser.add_argument("--pruner", default="obs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--exclude", nargs="*", default=(), help="units never pruned (e.g. a ResNet's first conv)")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bundle, units = pipeline.load_bundle(args.model, batch_size=args.batch_size, exclude=args.exclude)
    levels = parse_levels(args.levels) if args.levels else None
    raw, raw_path = pipeline.timings(bundle, units, work, levels=levels, threads=args.threads)
    calibrated, _ = pipeline.calibrate(bundle, units, raw, raw_path, print)
    db = pipeline.database(bundle, units, work, pruner=args.pruner, levels=levels)
    errors = {u: {k: e ** 2 for k, e in errs.items()} for u, errs in db.relative_errors().items() if u in raw.times}
    top = 0.9 * min(raw.max_speedup(), calibrated.max_speedup())
    targets = [float(t) for t in args.targets.split(",")] if args.targets else [1.3 + i * (top - 1.3) / 4 for i in range(5)]
    batch = pipeline.timing_batch(bundle)
    print(f"# {bundle.name}: dense {raw.base * 1e3:.1f} ms, {raw.meta.get('threads')} threads, load {os.getloadavg()[0]:.2f}; "
          f"maximum {raw.max_speedup():.3f}x (raw) / {calibrated.max_speedup():.3f}x (calibrated)\n")
    print("| target | table | first: predicted | first: measured | first / target | landed: measured | landed / target | rounds |")
    print("|---|---|---|---|---|---|---|---|")
    variants = args.variants.split(",")
    firsts: dict[str, list[float]] = {name: [] for name in variants}
    for target in targets:
        plans = {"raw": (raw, target), "calibrated": (calibrated, target), "planned": (calibrated, calibrated.planning_target(target))}
        for name in variants:
            table, plan = plans[name]
            def measure(profile, table=table) -> dict:
                return verify(bundle.model, units, profile, batch, table, weights=db.weight, rounds=args.rounds).to_json()

            def resolve(profile, table_target, table=table):
                new = baselines.dp_errors(table, table_target, errors)
                new.target, new.meta["table_target"] = target, table_target
                return new

            if plan > table.max_speedup():
                print(f"| {target:.2f} | {name} | beyond this table's maximum ({table.max_speedup():.3f}x) | | | | | |", flush=True)
                continue
            start = baselines.dp_errors(table, plan, errors)
            start.target, start.meta["table_target"] = target, plan
            _, result, rounds = pipeline.land(start, target, table.max_speedup(), measure, resolve)
            first = rounds[0]
            firsts[name].append(first["measured"] / target)
            print(f"| {target:.2f} | {name} | {first['predicted']:.3f} | {first['measured']:.3f} | {first['measured'] / target:.3f} "
                  f"| {result['measured_speedup']:.3f} | {result['measured_speedup'] / target:.3f} | {len(rounds)} |", flush=True)
    for name, ratios in firsts.items():
        print(f"\n{name}: first-round measured / target median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
