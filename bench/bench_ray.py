"""Local vs Ray at equal total threads: a MiniLM (or SmolLM2) database build and one SPDY search, and a worker killed in each.

Local runs torch (and numba) on ``--threads`` threads; Ray runs ``--threads`` workers of one
thread each on a local instance. The database covers the units of ``--layers`` encoder layers
at ``--levels`` (a full MiniLM build is ~3 minutes per run on this machine); the search is SPDY
with ``--random-starts`` and ``--tries`` on a synthetic timing table (time proportional to the
weights kept plus a fixed part: the search's cost does not depend on the table's numbers).

    NUMBA_NUM_THREADS=2 python bench/bench_ray.py [--layers 2] [--threads 2] [--parts database,search,faults] [--repeats 3] [-o bench/results/ray.json]

Prints JSON: wall times, per-task compute and the overhead Ray adds per task, whether the
outputs are identical, and the fault runs (one worker SIGKILLed mid-task): time added. The Ray
database is built in two orders, its units handed to the workers longest first (what
`build_database` does) and in the model's order, to show what the order costs at the end of a
build; ``--repeats`` alternates the two (and the local and Ray searches) and keeps the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from spdy.cli import _levels
from spdy.cluster import RayCluster
from spdy.database import Stitcher, build_database
from spdy.levels import DENSE, Option, options_for
from spdy.pipeline import load_bundle
from spdy.search.evaluate import Evaluator
from spdy.search.spdy import SpdyConfig, SpdySearch
from spdy.timing.table import TimingTable


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def kill_after(title: str, delay: float) -> list[float]:
    """SIGKILL the first worker running ``title`` once ``delay`` seconds have passed; returns [when] once done."""
    done: list[float] = []
    start = time.perf_counter()

    def hunt() -> None:
        time.sleep(delay)
        while not done and time.perf_counter() - start < delay + 600:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if (p.info["cmdline"] or [""])[0].startswith(title):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    done.append(round(time.perf_counter() - start, 2))
                    return
            time.sleep(0.01)

    threading.Thread(target=hunt, daemon=True).start()
    return done


LAYERS = {"minilm": "bert.encoder.layer.{}.*", "smollm2": "lm.model.layers.{}.*"}  # the units of the first --layers


def median_run(results: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count), with every run's wall time beside it."""
    middle = sorted(results, key=lambda r: r["wall_s"])[(len(results) - 1) // 2]
    return dict(middle, walls_s=[r["wall_s"] for r in results])


def table_for(units, levels: list[float]) -> TimingTable:
    keys = [DENSE] + [o.key for o in options_for("unstructured", levels)]
    times = {u: {k: unit.weight_shape[0] * unit.weight_shape[1] * 1e-9 * (0.2 + 0.8 * (1 - Option.parse(k).sparsity)) for k in keys}
             for u, unit in units.items()}
    dense = sum(t[DENSE] for t in times.values())
    return TimingTable(times, base=1.25 * dense, fixed=0.25 * dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(LAYERS))
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--levels", default="0.4:0.99:41", help="MIN:MAX:STEPS or a list (default: the SPDY grid)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-starts", type=int, default=32)
    parser.add_argument("--tries", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="Ray database builds per order, and local and Ray searches (alternated; medians kept)")
    parser.add_argument("--parts", default="database,search,faults", help="which of database, search, faults to run")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    levels = _levels(args.levels)
    include = [LAYERS[args.model].format(i) for i in range(args.layers)]
    bundle, units = load_bundle(args.model, args.samples, include=include, batch_size=args.batch_size)
    opts = options_for("unstructured", levels)
    table = table_for(units, levels)
    target = 1 + 0.5 * (table.max_speedup() - 1)
    cfg = SpdyConfig(random_starts=args.random_starts, tries=args.tries, seed=0)
    out: dict = {"units": len(units), "options": len(set(opts) | {Option(0.0)}), "threads": args.threads, "search": {"random_starts": args.random_starts,
                 "tries": args.tries, "batches": len(bundle.calibration)}}
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))

    def build(name: str, executor=None):
        started, before = time.perf_counter(), load()
        db = build_database(bundle.model, units, bundle.calibration, opts, work / name, progress=False, executor=executor)
        wall = time.perf_counter() - started
        tasks = [e["seconds"] for e in db.manifest["units"].values()]
        return db, {"wall_s": round(wall, 2), "task_s_sum": round(sum(tasks), 2), "load_before": before, "load_after": load()}

    def passes(pool) -> int:
        """Batch passes the pool's actors have run, kept or not."""
        return sum(pool.ray.get([actor.call.remote(lambda e, _: e.passes, None) for actor in pool.actors]))

    def search(pool=None):
        started, before = time.perf_counter(), load()
        ran = passes(pool) if pool else 0
        profile = SpdySearch(table, target, evaluator, cfg, progress=False, pool=pool).run()
        wall = round(time.perf_counter() - started, 2)
        if pool:
            profile.meta["pool"]["batch_passes_run"] = passes(pool) - ran  # vs batch_evaluations: the speculation's cost
        return profile, {"wall_s": wall, "evaluations": profile.evaluations,
                         "batch_evaluations": profile.meta["batch_evaluations"], "loss": profile.calibration_loss,
                         "load_before": before, "load_after": load(), **({"pool": profile.meta["pool"]} if pool else {})}

    torch.set_num_threads(args.threads)
    local_db, out["database_local"] = build("local")
    stitcher = Stitcher(units, local_db)
    evaluator = Evaluator(bundle.model, bundle.calibration, bundle.objective, stitcher.apply)
    print(json.dumps(out, indent=1), flush=True)

    started = time.perf_counter()
    with RayCluster("ray", cpus=args.threads, threads=1) as cluster:
        out["ray_start_s"] = round(time.perf_counter() - started, 2)
        if "database" in parts:
            n = len(units)
            rank = {u: i for i, u in enumerate(units)}

            def model_order(fn, jobs):
                return cluster.map_unordered(fn, sorted(jobs, key=lambda job: rank[job[0]]))

            runs: dict[str, list[dict]] = {"database_ray": [], "database_ray_model_order": []}
            for repeat in range(args.repeats):  # the two orders alternated, so a change in the machine's load hits both
                ray_db, result = build(f"ray-{repeat}", cluster.map_unordered)
                runs["database_ray"].append(result)
                runs["database_ray_model_order"].append(build(f"ray-model-order-{repeat}", model_order)[1])
            for run, results in runs.items():
                out[run] = median_run(results)
                out[run]["overhead_per_task_s"] = round((out[run]["wall_s"] * args.threads - out[run]["task_s_sum"]) / n, 3)
            # a task's result depends on its thread count: compared with a local build at the workers' one thread
            torch.set_num_threads(1)
            one_db, out["database_local_1_thread"] = build("local-1")
            torch.set_num_threads(args.threads)
            out["database_ray"]["identical_to_1_thread"] = all(ray_db.manifest["units"][u]["sha256"] == one_db.manifest["units"][u]["sha256"] for u in units)
            out["database_ray"]["same_errors_as_1_thread"] = ray_db.relative_errors() == one_db.relative_errors()
            out["database_ray"]["largest_error_difference"] = max(abs(a - one_db.relative_errors()[u][k]) / max(a, 1e-300)
                                                                  for u, e in ray_db.relative_errors().items() for k, a in e.items())
            out["database_ray"]["identical_to_2_threads"] = all(ray_db.manifest["units"][u]["sha256"] == local_db.manifest["units"][u]["sha256"] for u in units)
            print(json.dumps(out["database_ray"]), flush=True)

            if "faults" in parts:
                killed = kill_after("ray::_run_task", 0.4 * out["database_ray"]["wall_s"])
                _, out["database_ray_killed"] = build("ray-killed", cluster.map_unordered)
                out["database_ray_killed"]["killed_at_s"] = killed
                out["database_ray_killed"]["added_s"] = round(out["database_ray_killed"]["wall_s"] - out["database_ray"]["wall_s"], 2)
                print(json.dumps(out["database_ray_killed"]), flush=True)
        if "search" in parts:
            made = time.perf_counter()
            pool = cluster.pool(evaluator, stitcher)
            pool.pids()  # waits for every actor's constructor: the model, its batches and outputs from the object store
            out["pool_start_s"] = round(time.perf_counter() - made, 2)  # paid once per search, apart from the search's wall
            searches: dict[str, list[dict]] = {"search_local": [], "search_ray": []}
            for _ in range(args.repeats):  # alternated; the pool's actors stay up (idle) while the local search runs
                local_profile, result = search()
                stitcher.restore()
                searches["search_local"].append(result)
                print("search_local", json.dumps(result), flush=True)
                ray_profile, result = search(pool)
                searches["search_ray"].append(result)
                print("search_ray", json.dumps(result), flush=True)
            for run, results in searches.items():
                out[run] = median_run(results)
            out["search_ray"]["same_profile"] = ray_profile.options == local_profile.options
            out["search_ray"]["same_loss"] = ray_profile.calibration_loss == local_profile.calibration_loss
            print(json.dumps(out["search_ray"]), flush=True)

            if "faults" in parts:
                killed = kill_after("ray::_Evaluating.call", 0.4 * out["search_ray"]["wall_s"])
                again, out["search_ray_killed"] = search(pool)
                out["search_ray_killed"]["killed_at_s"] = killed
                out["search_ray_killed"]["same_profile"] = again.options == ray_profile.options
                out["search_ray_killed"]["added_s"] = round(out["search_ray_killed"]["wall_s"] - out["search_ray"]["wall_s"], 2)
            pool.close()
    print(json.dumps(out, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
