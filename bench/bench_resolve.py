"""A landing re-solve: the DP's profile for the coefficients a search found, or a short search from them?

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_resolve.py --timings T --database D \\
        [--model minilm] [--targets 2,3] [--factors 0.95,1.05] [--budget 60] [--resolve-budget 15]

When a profile's measured speedup misses its target, `spdy run` asks the table for another
target (`pipeline.land`). For each target: SPDY searches (``--budget`` seconds); then, at each
target x factor (where a runtime off by that factor sends the table), the DP solved with the
coefficients found, against a search warm-started from them (``--resolve-budget`` seconds,
what `spdy run` gives a re-solve). Prints calibration and held-out loss of both, the search's
evaluations and seconds, and the load average beside each row. T, D: a `spdy run` work dir's
calibrated table and database for MODEL.
"""

from __future__ import annotations

import argparse
import os
import time

from spdy import pipeline
from spdy.database import Database, Stitcher
from spdy.search.dp import scaled_errors, solve
from spdy.timing.table import TimingTable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--timings", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--targets", default="2,3")
    parser.add_argument("--factors", default="0.95,1.05")
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--resolve-budget", type=float, default=15.0)
    args = parser.parse_args()

    bundle, units = pipeline.load_bundle(args.model, 64, 64, validation=32, database=64)
    table, db = TimingTable.load(args.timings), Database.open(args.database)
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    evaluation = pipeline.evaluators(bundle, stitcher)
    calibration, _, heldout = evaluation
    print("| target | re-solve at | DP only: calibration / held-out | search: calibration / held-out | evaluations | s | held-out change | load |")
    print("|---|---|---|---|---|---|---|---|")
    for target in (float(t) for t in args.targets.split(",")):
        first = pipeline.find_profile(bundle, units, table, db, target, pipeline.SearchSettings("spdy", 0, budget=args.budget),
                                      progress=False, evaluation=evaluation)
        coefficients = first.meta["coefficients"]
        for factor in (float(f) for f in args.factors.split(",")):
            at = target * factor
            dp_only = solve(table, at, scaled_errors(table, coefficients)).profile
            evaluation.attach(stitcher.apply)  # find_profile attached its own stitcher
            dp = calibration(dp_only), heldout(dp_only)
            stitcher.restore()
            started = time.perf_counter()
            warm = pipeline.find_profile(bundle, units, table, db, at, pipeline.SearchSettings("spdy", 0, budget=args.resolve_budget),
                                         progress=False, evaluation=evaluation, start=coefficients)
            print(f"| {target:g} | {at:.3f} | {dp[0]:.5f} / {dp[1]:.5f} | {warm.calibration_loss:.5f} / {warm.heldout_loss:.5f} "
                  f"| {warm.evaluations} | {time.perf_counter() - started:.0f} | {100 * (warm.heldout_loss / dp[1] - 1):+.1f}% "
                  f"| {os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
