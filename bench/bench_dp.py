"""Solver speed: spdy's DP vs a straightforward per-layer numpy DP (the reference's approach).

    .venv/bin/python bench/bench_dp.py [--repeats 30]

Both solve the same problem at the same bucket count; medians over repeats, run
alternately so machine noise hits both alike. The baseline spans the whole budget with
its buckets and rounds to nearest, as the reference did; the script also reports how
often that rounding breaks the budget, which ours never does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from spdy.search.dp import prior_errors, solve, solve_arrays
from spdy.timing.table import TimingTable

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-timings" / "rn50_unstr.txt"


def baseline_dp(times: list[np.ndarray], errors: list[np.ndarray], budget: float, buckets: int) -> list[int]:
    """Per-layer DP over buckets spanning the budget, times rounded to nearest, choices stored."""
    width = budget / buckets
    dp = np.full(buckets + 1, np.inf)
    dp[0] = 0.0
    choices = np.zeros((len(times), buckets + 1), dtype=np.int64)
    for layer, (t, e) in enumerate(zip(times, errors)):
        new = np.full(buckets + 1, np.inf)
        for s, (ts, es) in enumerate(zip(np.round(t / width).astype(int), e)):
            if ts > buckets:
                continue
            cand = np.full(buckets + 1, np.inf)
            cand[ts:] = dp[: buckets + 1 - ts] + es
            better = cand < new
            new[better] = cand[better]
            choices[layer, better] = s
        dp = new
    b = int(np.argmin(dp))
    picks = []
    for layer in range(len(times) - 1, -1, -1):
        s = int(choices[layer, b])
        picks.append(s)
        b -= int(np.round(times[layer][s] / width))
    return picks[::-1]


def synthetic(units: int, options: int, seed: int = 0) -> TimingTable:
    """Times falling with sparsity like real layers (dense sometimes faster than low levels)."""
    rng = np.random.default_rng(seed)
    levels = np.r_[0.0, 1 - 0.6 * (0.01 / 0.6) ** (np.arange(options - 1) / (options - 2))]
    times = {}
    for u in range(units):
        dense = rng.uniform(0.5e-3, 5e-3)
        curve = dense * (1.1 - 0.95 * levels ** rng.uniform(1.0, 3.0)) * rng.uniform(0.97, 1.03, options)
        curve[0] = dense
        times[f"unit{u}"] = {f"{s:.4f}": float(c) for s, c in zip(levels, curve)}
    total = sum(t["0.0000"] for t in times.values())
    return TimingTable(times, base=total * 1.3, fixed=total * 0.3)


def bench(name: str, table: TimingTable, target: float, buckets: int, repeats: int) -> dict:
    errors = prior_errors(table)
    units, keys = table.units, [table.options(u) for u in table.units]
    times = [np.array([table.times[u][k] for k in ks]) for u, ks in zip(units, keys)]
    errs = [np.array([errors[u][k] for k in ks]) for u, ks in zip(units, keys)]
    budget = table.budget(target)
    solve(table, target, errors, buckets)  # compile / warm caches
    ours, base = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours_solution = solve(table, target, errors, buckets)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        picks = baseline_dp(times, errs, budget, buckets)
        base.append(time.perf_counter() - t0)
    base_time = sum(t[p] for t, p in zip(times, picks))
    ours_arrays = solve_arrays(times, errs, budget, buckets)
    return {
        "case": name, "units": len(units), "options": max(len(k) for k in keys), "buckets": buckets,
        "ours_ms": statistics.median(ours) * 1e3, "baseline_ms": statistics.median(base) * 1e3,
        "ours_over": ours_arrays.time - budget, "baseline_over": base_time - budget,
        "ours_error": ours_solution.total_error, "baseline_error": float(sum(e[p] for e, p in zip(errs, picks))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cases = []
    if REFERENCE.is_file():
        cases.append(("rn50 reference (DeepSparse)", TimingTable.load(REFERENCE), 2.0))
    else:
        print(f"(reference table not found at {REFERENCE}; skipping it)")
    cases.append(("synthetic 200 x 42", synthetic(200, 42), 2.0))
    print("| case | units x options | buckets | spdy (ms) | baseline numpy DP (ms) | speedup | spdy over budget | baseline over budget | error spdy / baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, table, target in cases:
        r = bench(name, table, target, 10_000, args.repeats)
        print(f"| {r['case']} | {r['units']} x {r['options']} | {r['buckets']} | {r['ours_ms']:.2f} | {r['baseline_ms']:.2f} "
              f"| {r['baseline_ms'] / r['ours_ms']:.1f}x | {max(r['ours_over'], 0) * 1e6:.2f} us | {max(r['baseline_over'], 0) * 1e6:.2f} us "
              f"| {r['ours_error']:.4f} / {r['baseline_error']:.4f} |")


if __name__ == "__main__":
    main()
