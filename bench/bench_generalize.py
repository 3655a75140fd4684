"""Does the search's choice hold on held-out data? Search objectives and baselines side by side.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_generalize.py --timings T (--database D | --database-samples N --work-dir W) \\
        [--model minilm] [--fractions 0.25,0.5,0.75] [--variants output,signal,signal+validation] \\
        [--methods spdy,evo] [--baselines uniform,global-magnitude,dp-errors,owl] [--budget 90s]

One timing table and database (e.g. a default ``spdy run``'s calibrated table and database, or
one built here in W on N samples drawn apart from the calibration samples), targets at
fractions of the way to the table's maximum. Variants of the search objective:
``output`` scores the model's output with its loss (for MiniLM: 1 - cosine of the pooled
embeddings), no validation pick (the search before issue 23); ``signal`` scores the family's
richer signal (MiniLM: 1 - cosine of every token's last hidden state); ``+validation`` picks the
final profile among the search's finalists on validation samples; ``+tied`` shares SPDY's
coefficients by unit kind and depth; ``+random`` starts SPDY from random vectors only (no baseline
anchors); ``+oracle`` searches on the held-out samples themselves: not a method but an estimate of
the least held-out loss any allocation reaches, i.e. how large a margin over the baselines exists
at all. Baselines are scored once.
Columns: predicted speedup on the table, calibration / validation / held-out loss in the
variant's search loss, and the held-out loss in the model's own output loss (the one number
every row shares), plus the load average when the row finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from spdy import pipeline
from spdy.database import Database, Stitcher
from spdy.search.budget import parse_budget
from spdy.search.evaluate import Evaluator
from spdy.timing.table import TimingTable


def split_heldout(bundle, first: str, batches: int = 3):
    """``bundle`` with the first half of its held-out samples (and labels) as its ``first`` split ("calibration": the
    search is scored on digits the model never saw; "validation": they pick the final profile) and the second half
    held out, each in ``batches``."""
    x, y = torch.cat(bundle.heldout), torch.cat(bundle.heldout_labels)
    half = len(x) // 2
    size = -(-half // batches)
    return replace(bundle, **{first: list(x[:half].split(size)), f"{first}_labels": list(y[:half].split(size))},
                   heldout=list(x[half:].split(size)), heldout_labels=list(y[half:].split(size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--timings", required=True)
    parser.add_argument("--database", help="an OBS database built on the calibration samples (else one is built in --work-dir)")
    parser.add_argument("--database-samples", type=int, default=0, help="samples, apart from the calibration ones, to build it on")
    parser.add_argument("--work-dir", default="bench/results/generalize")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--fractions", default="0.25,0.5,0.75")
    parser.add_argument("--variants", default="output,signal,signal+validation")
    parser.add_argument("--methods", default="spdy")
    parser.add_argument("--baselines", default="uniform,global-magnitude,dp-errors,owl")
    parser.add_argument("--budget", default="90s")
    parser.add_argument("--seeds", default="0", help="comma-separated search seeds (each a row)")
    parser.add_argument("--restarts", type=int, default=1, help="searches per row, from seeds SEED..SEED+N-1, finalists pooled")
    parser.add_argument("--out", help="append every row here as a JSON line")
    parser.add_argument("--unseen-calibration", action="store_true",
                        help="a model calibrated on its training set: search on the first half of its held-out "
                             "samples and score on the other half (the database stays on the training samples)")
    parser.add_argument("--validation-from-heldout", action="store_true",
                        help="a classifier without a validation split: validate on the first half of its held-out "
                             "samples, score on the other half")
    args = parser.parse_args()

    bundle, units = pipeline.load_bundle(args.model, args.samples, args.heldout, validation=args.validation, database=args.database_samples)
    if args.unseen_calibration:
        bundle = split_heldout(bundle, "calibration")
    if args.validation_from_heldout:
        bundle = split_heldout(bundle, "validation")
    table = TimingTable.load(args.timings)
    db = Database.open(args.database) if args.database else pipeline.database(bundle, units, Path(args.work_dir))
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    output_heldout = Evaluator(bundle.model, bundle.heldout, bundle.loss, stitcher.apply, bundle.heldout_labels, "heldout")
    plain = replace(bundle, search_loss=None)
    evaluations = {"output": pipeline.evaluators(plain, stitcher)}
    signal = next(iter(bundle.signals), None)  # a model without signals has only its output
    if signal is not None:
        bundle.search_on(signal)
        evaluations["signal"] = pipeline.evaluators(bundle, stitcher)
    maximum = table.max_speedup()
    # batch counts as the bundle holds them: a built-in with its own splits (digits-cnn) ignores --samples and the like
    print(f"{bundle.name}: dense {table.base * 1e3:.1f} ms, max {maximum:.3f}x on the table; {len(bundle.calibration)} calibration / "
          f"{len(bundle.validation)} validation / {len(bundle.heldout)} held-out batches; database on "
          f"{f'{len(bundle.database)} batches of its own' if bundle.database else 'the calibration batches'}; "
          f"output loss {bundle.loss}, signal loss {bundle.objective}\n")
    print(f"| target | method | variant | predicted | calibration | validation | held-out | held-out {bundle.loss} | evaluations | s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def row(target: float, method: str, variant: str, seed: int = 0) -> None:
        kind, *extras = variant.split("+")
        pick, tie = "validation" in extras, "kind-depth" if "tied" in extras else "none"
        calibration, validation, heldout = evaluations[kind]
        if "oracle" in extras:
            calibration, validation = heldout, None
        settings = pipeline.SearchSettings(method, seed, budget=parse_budget(args.budget) if method in ("spdy", "evo") else None, tie=tie,
                                           anchors=() if "random" in extras else pipeline.ANCHORS,
                                           restarts=args.restarts if method in ("spdy", "evo") else 1)
        started = time.perf_counter()
        profile = pipeline.find_profile(bundle if kind == "signal" else plain, units, table, db, target, settings, progress=False,
                                        evaluation=pipeline.Evaluators(calibration, validation if pick else None, heldout))
        seconds = time.perf_counter() - started
        validation_loss = profile.validation_loss if pick else validation(profile.options) if validation else None  # digits, oracle: none
        output = output_heldout(profile.options)
        stitcher.restore()
        load = os.getloadavg()[0]
        print(f"| {target:.3f} | {method}{f' (seed {seed})' if seed else ''} | {variant} | {profile.predicted_speedup:.3f} | {profile.calibration_loss:.5f} | {'-' if validation_loss is None else f'{validation_loss:.5f}'} "
              f"| {profile.heldout_loss:.5f} | {output:.5f} | {profile.evaluations} | {seconds:.0f} | {load:.2f} |", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"model": bundle.name, "database_samples": args.database_samples, "target": target, "method": method,
                                    "seed": seed, "restarts": settings.restarts, "variant": variant,
                                    "predicted": profile.predicted_speedup, "calibration": profile.calibration_loss,
                                    "validation": validation_loss, "heldout": profile.heldout_loss, "heldout_output": output,
                                    "evaluations": profile.evaluations, "seconds": seconds, "load": load,
                                    "picked": profile.meta.get("picked"), "finalists": profile.meta.get("validation")}) + "\n")

    for fraction in (float(f) for f in args.fractions.split(",")):
        target = round(1 + fraction * (maximum - 1), 3)
        for method in args.methods.split(","):
            for variant in args.variants.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    row(target, method, variant, seed)
        for method in filter(None, args.baselines.split(",")):
            row(target, method, "signal" if signal else "output")


if __name__ == "__main__":
    main()
