"""Predicted vs measured speedup: MiniLM-L6, torch-cpu table, DP profiles, verified.

    .venv/bin/python bench/bench_verify.py [--levels 0.5,0.7,...] [--table T.json]
        [--checkpoint CK.json] [--targets 1.1,1.2,1.3] [--rounds 20] [--threads N]

Measures the torch-cpu timing table of MiniLM-L6's 36 encoder Linears at batch 8 x seq 128
(or loads ``--table``), solves the targets with `spdy.search.dp.solve` (SPDY prior errors; default
targets at 30/60/90% of the way from 1x to the table's maximum speedup), and verifies each
profile with magnitude masks: dense and pruned model alternated ``--rounds`` times. Goal:
measured >= 0.97 x target. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import time

from spdy.search.dp import solve
from spdy.levels import geometric_levels
from spdy.models import load_model
from spdy.search.profile import Profile
from spdy.timing import measure
from spdy.timing.table import TimingTable
from spdy.units import find_units
from spdy.verification import verify


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=floats, default=None, help="sparsity levels (default: the 41 SPDY levels)")
    parser.add_argument("--table", help="load this timing table instead of measuring (if it exists), else save to it")
    parser.add_argument("--checkpoint", help="measurement checkpoint (resumes)")
    parser.add_argument("--targets", type=floats, default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    bundle = load_model("minilm")
    units = find_units(bundle.model, bundle.include)
    batch = bundle.calibration[0]
    if args.table and os.path.exists(args.table):
        table, measured_s = TimingTable.load(args.table), None
    else:
        started = time.perf_counter()
        table = measure(bundle.model, units, batch, levels=args.levels, checkpoint=args.checkpoint, threads=args.threads)
        measured_s = time.perf_counter() - started
        if args.table:
            table.save(args.table)
    top = table.max_speedup()
    targets = args.targets or [round(1 + f * (top - 1), 3) for f in (0.3, 0.6, 0.9)]
    levels = args.levels or geometric_levels()
    print(
        f"MiniLM-L6, batch 8 x seq 128, {len(units)} units x {len(levels) + 1} options, threads={table.meta.get('threads')}, "
        f"base {table.base * 1e3:.1f} ms, fixed {table.fixed * 1e3:.1f} ms, max speedup {top:.3f}x, "
        f"{len(table.meta.get('shared', {}))} units shared a measurement"
        + (f", measured in {measured_s:.0f} s" if measured_s is not None else "")
        + f", loadavg {table.meta.get('loadavg')}\n"
    )
    print("| target | predicted | measured (median) | spread (IQR) | measured / target | met (>= 0.97 target) | sparse layers (formats) |")
    print("|---|---|---|---|---|---|---|")
    for target in targets:
        solution = solve(table, target)
        profile = Profile(solution.profile, target=target, predicted_speedup=solution.predicted_speedup)
        result = verify(bundle.model, units, profile, batch, table=table, rounds=args.rounds)
        counts: dict[str, int] = {}
        for fmt in result.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        print(
            f"| {target:.3f}x | {result.predicted_speedup:.3f}x | {result.measured_speedup:.3f}x | {result.measured_spread:.0%} | "
            f"{result.measured_speedup / target:.3f} | {'yes' if result.met else 'NO'} | {len(result.formats)} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) |"
        )


if __name__ == "__main__":
    main()
