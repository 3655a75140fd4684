"""The default job's search stage, old vs new: every candidate scored on all the data (the search
as it was) against multi-fidelity evaluation, each under a wall budget (default the default
job's) or, with ``--budget none``, run to the end.

    # once: a timing table and a database in a work dir (or any spdy run's work dir)
    spdy time minilm -o /tmp/mini/timings.json && spdy database minilm -o /tmp/mini/db
    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_default_job.py \\
        --timings /tmp/mini/timings.json --database /tmp/mini/db --variant old --out /tmp/mini/old.json  # --budget none: to the end
    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_default_job.py \\
        --timings /tmp/mini/timings.json --database /tmp/mini/db --variant new --out /tmp/mini/new.json

Both variants search MiniLM (64 calibration / 32 held-out sequences of 128 tokens of pydoc
text, the default job's data) at the same target on the same table and database, seed 0.
Each prints one Markdown row (variant, budget, target, wall seconds, candidates, batch passes,
full evaluations, calibration and held-out loss, load average before / after) and writes it,
with the convergence trace, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from spdy import pipeline
from spdy.database import Database, Stitcher
from spdy.models import load_model
from spdy.search.budget import DEFAULT_SEARCH_BUDGET, parse_budget
from spdy.search.spdy import SpdyConfig, SpdySearch
from spdy.timing.table import TimingTable

FULL = 10**6  # first_batches beyond any batch count: every evaluation on all the data, as before multi-fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timings", required=True, help="timing table JSON (spdy time, or a run's calibrated table)")
    parser.add_argument("--database", required=True, help="database directory (spdy database)")
    parser.add_argument("--target", type=float, help="default: the default job's (60%% of the way to the table's maximum)")
    parser.add_argument("--variant", choices=("old", "new"), required=True)
    parser.add_argument("--budget", default=DEFAULT_SEARCH_BUDGET, help="wall budget, or none (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the row and the convergence trace here (JSON)")
    args = parser.parse_args()

    bundle = load_model("minilm", samples=64, heldout=32)
    units = pipeline.prunable_units(bundle)
    table = TimingTable.load(args.timings)
    db = Database.open(args.database)
    target = args.target or pipeline.default_target(table)
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    evaluation = pipeline.evaluators(bundle, stitcher)
    calibration, heldout = evaluation.calibration, evaluation.heldout
    cfg = SpdyConfig(seed=args.seed, first_batches=FULL) if args.variant == "old" else SpdyConfig(seed=args.seed)
    search = SpdySearch(table, target, calibration, cfg, progress=False, budget=parse_budget(args.budget))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    profile = search.run()
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    held = heldout(profile.options)
    stitcher.restore()
    row = {"variant": args.variant, "target": target, "budget": args.budget, "wall_s": round(wall, 1),
           "evaluations": profile.evaluations, "batch_evaluations": profile.meta["batch_evaluations"],
           "full_evaluations": profile.meta["full_evaluations"], "calibration_loss": profile.calibration_loss, "heldout_loss": held,
           "predicted_speedup": profile.predicted_speedup, "load_before": load_before, "load_after": load_after,
           "torch_threads": __import__("torch").get_num_threads(), "trace": profile.trace}
    print(f"| {args.variant} | {args.budget} | {target:g} | {wall:.0f} | {profile.evaluations} | {row['batch_evaluations']} | {row['full_evaluations']} "
          f"| {profile.calibration_loss:.5f} | {held:.5f} | {load_before:.2f} / {load_after:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
