"""SPDY vs evolutionary search vs every baseline on MiniLM-L6, at three feasible targets.

    .venv/bin/python bench/bench_search.py [--samples 32] [--random-starts 100] [--tries 100] [--work bench-work]

Timings (torch-cpu) and the OBS database are cached in --work, so reruns only search.
Held-out loss is 1 - cosine similarity to the dense embeddings on held-out pydoc topics
(calibration and held-out text share no topic).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spdy import pipeline
from spdy.database import Stitcher
from spdy.models import load_model
from spdy.search.profile import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--random-starts", type=int, default=100)
    parser.add_argument("--tries", type=int, default=100)
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--fractions", default="0.3,0.6,0.9", help="targets as fractions of the way to the maximum speedup")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", default="bench-work")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(exist_ok=True)
    bundle = load_model("minilm", samples=args.samples, heldout=args.heldout)
    units = pipeline.prunable_units(bundle)
    table, _ = pipeline.timings(bundle, units, work)
    db = pipeline.database(bundle, units, work)
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    evaluation = pipeline.evaluators(bundle, stitcher)
    maximum = table.max_speedup()
    print(f"MiniLM-L6, torch-cpu table: dense {table.base * 1e3:.1f} ms, fixed {table.fixed * 1e3:.1f} ms, max speedup {maximum:.3f}x; "
          f"{args.samples} calibration / {args.heldout} held-out sequences of 128 tokens\n")
    print("| target | method | predicted | calibration loss | held-out loss | evaluations | seconds |")
    print("|---|---|---|---|---|---|---|")
    for fraction in (float(f) for f in args.fractions.split(",")):
        target = round(1 + fraction * (maximum - 1), 3)
        for method in args.methods.split(","):
            settings = pipeline.SearchSettings(method, 0, args.random_starts, args.tries, args.generations)
            started = time.perf_counter()
            p = pipeline.find_profile(bundle, units, table, db, target, settings, work, progress=False, evaluation=evaluation)
            print(f"| {target:.3f} | {method} | {p.predicted_speedup:.3f} | {p.calibration_loss:.5f} | {p.heldout_loss:.5f} "
                  f"| {p.evaluations} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
