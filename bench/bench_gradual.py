"""Gradual pruning to SPDY vs uniform vs global-magnitude profiles, at equal fine-tuning budget.

The digits CNN (spdy.models.digits) is timed on torch-cpu at a subset of the SPDY grid, an OBS database
is built, and for two feasible targets each method's profile is fine-tuned with the same
recipe (cubic schedule, KL distillation + labels). Reported per target and method: held-out
accuracy and cross-entropy one-shot (magnitude) and after gradual pruning, and the speedup of
the final model measured with ``spdy.verify`` (dense and pruned run alternately).

    .venv/bin/python bench/bench_gradual.py [--steps 300] [--targets 1.5,2.0] [--threads 1]

``--minilm STEPS`` also distills MiniLM-L6 gradually to a uniform 50% for STEPS steps
(cosine + per-layer loss) and reports the held-out 1 - cosine before and after.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from spdy import pipeline
from spdy.recovery.gradual import Recipe
from spdy.levels import spdy_grid
from spdy.timing import measure
from spdy.recovery.train import TrainConfig, gradual_prune
from spdy.units import find_units, weight_matrix
from spdy.models.digits import digits_cnn

METHODS = ("spdy", "uniform", "global-magnitude")


def cnn_rows(args: argparse.Namespace, work: Path) -> None:
    from spdy.verification import verify

    bundle = digits_cnn(width=args.width, hidden=args.hidden)
    units = find_units(bundle.model)
    levels = spdy_grid()[1::4]
    with torch.no_grad():
        for _ in range(5):  # warm up, so the first unit timed is not charged for it
            bundle.model(bundle.calibration[0])
    table = measure(bundle.model, units, bundle.calibration[0], levels=levels, threads=args.threads, progress=False)
    db = pipeline.database(bundle, units, work, pruner="obs", levels=levels, progress=False)
    targets = [float(t) for t in args.targets.split(",")] if args.targets else \
        [round(1 + f * (table.max_speedup() - 1), 2) for f in (0.4, 0.7)]
    print(f"digits CNN (width {args.width}, hidden {args.hidden}): dense {table.base * 1e3:.3f} ms per batch of {len(bundle.calibration[0])}, "
          f"table max speedup {table.max_speedup():.2f}x, levels {levels}\n")
    print("| target | profile | predicted | measured (verify) | overall sparsity | one-shot acc / CE | gradual acc / CE | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for target in targets:
        for method in METHODS:
            settings = pipeline.SearchSettings(method=method, random_starts=args.random_starts, tries=args.tries)
            profile = pipeline.find_profile(bundle, units, table, db, target, settings, progress=False)
            student = copy.copy(bundle)
            student.model = copy.deepcopy(bundle.model)
            student_units = find_units(student.model)
            recipe = Recipe.from_profile(profile, args.steps, update_every=args.update_every)
            started = time.perf_counter()
            result = gradual_prune(student, student_units, recipe, TrainConfig(lr=args.lr), progress=False)
            seconds = time.perf_counter() - started
            weights = {u: weight_matrix(student_units[u]).clone() for u in profile.options}
            check = verify(student.model, student_units, profile, bundle.calibration[0], table, weights=weights)
            sparsity = sum(result["sparsity"][u] * student_units[u].module.weight.numel() for u in result["sparsity"]) / \
                sum(student_units[u].module.weight.numel() for u in result["sparsity"])
            print(f"| {target:g}x | {method} | {profile.predicted_speedup:.3f}x | {check.measured_speedup:.3f}x | {sparsity:.3f} | "
                  f"{result['accuracy_before']:.4f} / {result['heldout_before']:.4f} | "
                  f"{result['accuracy_after']:.4f} / {result['heldout_after']:.4f} | {seconds:.0f} |", flush=True)
    print(f"\ndense: accuracy {result['accuracy_dense']:.4f}, held-out CE {result['heldout_dense']:.4f}")


def minilm(steps: int) -> None:
    from spdy.models import load_model

    bundle = load_model("minilm")
    units = pipeline.prunable_units(bundle)
    recipe = Recipe({u: 0.5 for u in units}, total_steps=steps, steps=max(1, round(0.75 * steps)), update_every=max(1, steps // 10))
    started = time.perf_counter()
    result = gradual_prune(bundle, units, recipe, TrainConfig(lr=2e-5, distill="cosine", layer=1.0), progress=False)
    print(f"\nMiniLM-L6, uniform 50% over {len(units)} units, {steps} steps ({time.perf_counter() - started:.0f} s): "
          f"held-out 1 - cosine {result['heldout_before']:.4f} one-shot -> {result['heldout_after']:.4f} gradual")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--update-every", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--targets", help="comma-separated speedups (default 40%% and 70%% of the way to the table's maximum)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for timing, training and verify (default %(default)s)")
    parser.add_argument("--random-starts", type=int, default=30)
    parser.add_argument("--tries", type=int, default=30)
    parser.add_argument("--minilm", type=int, metavar="STEPS", help="also distill MiniLM-L6 for STEPS steps")
    parser.add_argument("--skip-cnn", action="store_true", help="only the MiniLM run")
    parser.add_argument("--work-dir", default="bench-work/gradual")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_cnn:
        cnn_rows(args, work)
    if args.minilm:
        minilm(args.minilm)


if __name__ == "__main__":
    main()
