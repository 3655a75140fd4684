"""Database pruners compared: build time per unit-level and layer output error on MiniLM-L6.

Six units, one of each weight shape from two layers, calibrated on pydoc text. Each pruner
prunes every unit to nested levels 50/70/90% (unstructured); the error is the relative
layer output error ``||W_p X - W X|| / ||W X||`` on all calibration inputs (from H).

    .venv/bin/python bench/bench_database.py [--samples 256] [--threads N] [--full DIR]

``--full DIR`` also builds the whole MiniLM-L6 OBS database (36 units x 42 options) into DIR
(resuming it if present) and times stitching random profiles from it.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from spdy.database import Database, Stitcher, build_database, capture, make_pruner, relative_error
from spdy.levels import Option, options_for
from spdy.models import load_model
from spdy.units import find_units, weight_matrix

UNITS = [
    "bert.encoder.layer.1.attention.self.query",
    "bert.encoder.layer.1.intermediate.dense",
    "bert.encoder.layer.1.output.dense",
    "bert.encoder.layer.4.attention.output.dense",
    "bert.encoder.layer.4.intermediate.dense",
    "bert.encoder.layer.4.output.dense",
]
LEVELS = [0.5, 0.7, 0.9]
PRUNERS = ["magnitude", "adaprune", "obs"]


def compare(samples: int) -> None:
    bundle = load_model("minilm", samples=samples)
    units = find_units(bundle.model, bundle.include)
    chosen = {n: units[n] for n in UNITS}
    rows = max(make_pruner(p).rows for p in PRUNERS)
    started = time.perf_counter()
    stats = capture(bundle.model, chosen, bundle.calibration, rows=rows)
    capture_s = time.perf_counter() - started
    options = [Option(0.0)] + [Option(s) for s in LEVELS]

    pruners = {name: make_pruner(name) for name in PRUNERS}
    seconds = {name: 0.0 for name in PRUNERS}
    errors = {name: {s: [] for s in LEVELS} for name in PRUNERS}
    for unit in UNITS:  # pruners interleaved per unit, so they share the machine's load alike
        w = weight_matrix(chosen[unit]).clone()
        for name, pruner in pruners.items():
            started = time.perf_counter()
            pruned = pruner.prune(w, stats[unit], options)
            seconds[name] += time.perf_counter() - started
            for s in LEVELS:
                errors[name][s].append(relative_error(w, pruned[Option(s).key], stats[unit].hessian))
    results = {
        name: (seconds[name] / (len(UNITS) * len(LEVELS)), {s: statistics.mean(e) for s, e in errors[name].items()}, errors[name])
        for name in PRUNERS
    }

    tokens = stats[UNITS[0]].count
    print(f"MiniLM-L6, {samples} calibration sequences ({tokens} tokens), capture of {len(UNITS)} units {capture_s:.1f} s, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| pruner | s / unit-level | error 50% | error 70% | error 90% |")
    print("|---|---:|---:|---:|---:|")
    for name, (per_level, mean, _) in results.items():
        print(f"| {name} {make_pruner(name).params() or ''} | {per_level:.3f} | " + " | ".join(f"{mean[s]:.4f}" for s in LEVELS) + " |")
    print("\nPer unit (error at 50 / 70 / 90%):\n")
    print("| unit | shape | " + " | ".join(PRUNERS) + " |")
    print("|---|---|" + "---|" * len(PRUNERS))
    for i, unit in enumerate(UNITS):
        cells = [" / ".join(f"{results[p][2][s][i]:.3f}" for s in LEVELS) for p in PRUNERS]
        print(f"| {unit.removeprefix('bert.encoder.')} | {list(chosen[unit].weight_shape)} | " + " | ".join(cells) + " |")
    obs, ada = results["obs"], results["adaprune"]
    wins = sum(obs[2][s][i] <= ada[2][s][i] for s in LEVELS for i in range(len(UNITS)))
    print(f"\nOBS vs AdaPrune: {ada[0] / obs[0]:.1f}x less time per unit-level; OBS error <= AdaPrune's in {wins}/{len(LEVELS) * len(UNITS)} unit-levels")


def full(samples: int, directory: str) -> None:
    bundle = load_model("minilm", samples=samples)
    units = find_units(bundle.model, bundle.include)
    started = time.perf_counter()
    db = build_database(bundle.model, units, bundle.calibration, options_for(), directory, "obs", progress=True)
    seconds = time.perf_counter() - started
    size = sum(db.path(u).stat().st_size for u in db.units)
    summary = db.summary()
    print(f"\nFull OBS database: {len(db.units)} units x {len(db.options(db.units[0]))} options = {summary['entries']} entries "
          f"in {seconds:.0f} s ({size / 2**30:.2f} GiB); mean relative error "
          + ", ".join(f"{k}: {summary['relative_error'][k]:.3f}" for k in ("0.4000", "0.7069", "0.9049", "0.9900") if k in summary["relative_error"]))
    stitch_timing(units, db)


def stitch_timing(units: dict, db: Database, repeats: int = 20) -> None:
    """What a search candidate pays to put a random profile in place and take it out again."""
    generator = random.Random(0)
    stitcher = Stitcher(units, db)
    for unit in db.units:  # first reads verify each file's checksum: not part of the steady state
        db.weight(unit, db.options(unit)[-1])
    apply, restore = [], []
    for _ in range(repeats):
        profile = {u: generator.choice(db.options(u)[1:]) for u in db.units}
        started = time.perf_counter()
        stitcher.apply(profile)
        apply.append(time.perf_counter() - started)
        started = time.perf_counter()
        stitcher.restore()
        restore.append(time.perf_counter() - started)
    print(f"Stitch a random {len(db.units)}-unit profile: apply {statistics.median(apply) * 1e3:.0f} ms, restore {statistics.median(restore) * 1e3:.0f} ms (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--full", metavar="DIR", help="also build the whole MiniLM-L6 OBS database into DIR")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compare(args.samples)
    if args.full:
        full(args.samples, args.full)


if __name__ == "__main__":
    main()
