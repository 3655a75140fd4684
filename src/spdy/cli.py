"""The `spdy` command line: one subcommand per pipeline stage.

Exit status: 0 success, 1 runtime failure, 2 bad input (including an infeasible target).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from spdy.errors import InputError
from spdy.search.budget import DEFAULT_SEARCH_BUDGET, parse_budget
from spdy.search.dp import DEFAULT_BUCKETS, InfeasibleTarget, solve
from spdy.levels import DENSE, Option, geometric_levels
from spdy.search.profile import ANCHOR_CHOICES, ANCHORS, METHODS, Profile
from spdy.search.select import VALIDATION
from spdy.timing.table import TimingTable, check_target

if TYPE_CHECKING:
    from spdy.pipeline import RunConfig

BUDGET_HELP = (f"wall time for the spdy/evo search: 300, 300s, 5m, 1h, or none to run it to the end (default {DEFAULT_SEARCH_BUDGET}; "
               "a rerun with a larger budget resumes where the search stopped; where a budget cuts depends on the machine's speed, "
               "so only --search-budget none is deterministic per seed)")


def _load_errors(path: str, table: TimingTable) -> dict[str, dict[str, float]]:
    """Read ``unit -> {sparsity or option key: error}``; keys are normalised to option keys."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"--errors: file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--errors {path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"--errors {path}: expected an object unit -> {{sparsity: error}}")
    errors = {}
    for unit, levels in data.items():
        if unit not in table.times:
            raise InputError(f"--errors {path}: unknown unit {unit!r}; the timing table's units are e.g. {table.units[:3]}")
        if not isinstance(levels, dict):
            raise InputError(f"--errors {path}: unit {unit!r}: expected {{sparsity: error}}")
        errors[unit] = {}
        for level, err in levels.items():
            try:
                key = Option.parse(str(level)).key
            except ValueError as e:
                raise InputError(f"--errors {path}: unit {unit!r}: {e}") from None
            if isinstance(err, bool) or not isinstance(err, (int, float)) or err != err:
                raise InputError(f"--errors {path}: unit {unit!r} level {level}: error must be a number, got {err!r}")
            errors[unit][key] = float(err)
    missing = [u for u in table.units if u not in errors]
    if missing:
        raise InputError(f"--errors {path}: no errors for units {missing[:5]} (exclude them with --exclude, or add them)")
    return errors


def cmd_solve(args: argparse.Namespace) -> int:
    table = TimingTable.load(args.timings, exclude=args.exclude or ())
    errors = _load_errors(args.errors, table) if args.errors else None
    solution = solve(table, args.target, errors, buckets=args.buckets)
    if args.json:
        print(json.dumps({
            "target": args.target,
            "budget": solution.budget,
            "predicted_time": solution.predicted_time,
            "predicted_speedup": solution.predicted_speedup,
            "max_speedup": solution.max_speedup,
            "total_error": solution.total_error,
            "profile": solution.sparsities(),
            "dense_blocks": table.blocks_left_dense(solution.profile),
        }, indent=1))
        return 0
    width = max(len(u) for u in table.units)
    print(f"{'unit':<{width}}  sparsity  time (ms)  dense (ms)")
    for unit, key in solution.profile.items():
        print(f"{unit:<{width}}  {key:>8}  {table.times[unit][key] * 1e3:9.3f}  {table.dense_time(unit) * 1e3:10.3f}")
    print(f"\ntarget {args.target:g}x: predicted speedup {solution.predicted_speedup:.4f}x "
          f"({solution.predicted_time * 1e3:.3f} ms of {table.base * 1e3:.3f} ms dense; fixed {table.fixed * 1e3:.3f} ms)")
    if left := table.blocks_left_dense(solution.profile):
        print(f"left dense, unfused in torch: {', '.join(left)}")
    print(f"maximum attainable speedup on this table: {solution.max_speedup:.4f}x")
    return 0


def _levels(text: str | None) -> list[float] | None:
    """``--levels``: comma-separated sparsities, or ``MIN:MAX:STEPS`` for a geometric grid."""
    if text is None:
        return None
    try:
        if text.count(":") == 2:
            lo, hi, steps = text.split(":")
            return geometric_levels(float(lo), float(hi), int(steps))
        levels = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError as e:
        raise InputError(f"--levels {text!r}: {e}; use e.g. 0.5,0.7,0.9 or 0.4:0.99:41") from None
    bad = [x for x in levels if not 0 < x < 1]
    if bad or not levels:
        raise InputError(f"--levels {text!r}: sparsities must lie in (0, 1), got {bad or 'none'}")
    return levels


def _bundle(args: argparse.Namespace):
    from spdy.pipeline import load_bundle

    return load_bundle(args.model, args.samples, args.heldout, args.seq_len, args.batch_size, args.include, args.exclude or (),
                       args.validation, args.database_samples, args.workload, getattr(args, "pattern", None) or "unstructured")


def cmd_time(args: argparse.Namespace) -> int:
    from spdy.pipeline import measure_to, option_keys, timing_engine
    from spdy.timing.backend import get_backend

    get_backend(timing_engine(args.engine, args.pattern))  # an engine that is not installed stops here, before the model loads
    bundle, units = _bundle(args)
    keys = option_keys(args.pattern, _levels(args.levels), units)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)  # the checkpoint goes beside it from the first unit on
    table = measure_to(out, bundle, units, keys, timing_engine(args.engine, args.pattern), not args.quiet, args.threads)
    summary = {"output": str(out), "units": len(table.units), "options": len(keys), "base": table.base,
               "fixed": table.fixed, "max_speedup": table.max_speedup()}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"wrote {out}: {len(table.units)} units x {len(keys)} options on {args.engine}; dense model {table.base * 1e3:.2f} ms, "
              f"fixed {table.fixed * 1e3:.2f} ms; maximum attainable speedup {table.max_speedup():.3f}x")
    return 0


def cmd_database(args: argparse.Namespace) -> int:
    from spdy.database import build_database
    from spdy.database.structured import build_structured_database
    from spdy.levels import STRUCTURED
    from spdy.pipeline import options_of

    from spdy.cluster import connect

    with connect(args.cluster) as cluster:  # before the model loads: a missing or unreachable Ray fails at once
        bundle, units = _bundle(args)
        if args.pattern == STRUCTURED:
            db = build_structured_database(bundle.model, units, bundle.statistics, args.output, pruner=args.pruner, progress=not args.quiet)
        else:
            db = build_database(bundle.model, units, bundle.statistics, options_of(args.pattern, _levels(args.levels)), args.output,
                                pruner=args.pruner, progress=not args.quiet, executor=cluster.map_unordered if cluster else None)
    summary = {**db.summary(), "units": len(db.units), "directory": str(db.directory)}
    summary["relative_error"].pop(DENSE, None)  # dense reconstructs exactly: not worth a line
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"database {db.directory}: {summary['entries']} entries for {len(db.units)} units ({args.pruner}, {args.pattern})")
        for level, err in summary["relative_error"].items():
            print(f"  sparsity {level}: mean relative output error {err:.4f}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from spdy.blocks import block_units
    from spdy.database import Database, StructuredDatabase
    from spdy.pipeline import SearchSettings, find_profile, profile_json

    bundle, units = _bundle(args)
    table = TimingTable.load(args.timings)
    db = Database.open(args.database)
    if isinstance(db, StructuredDatabase):  # its units are blocks, not layers
        units = block_units(bundle.model, args.include, args.exclude or ())
    missing = [u for u in table.units if u not in units]
    if missing:
        raise InputError(f"--timings {args.timings} has units the model does not offer (check --include/--exclude): {missing[:3]}")
    settings = SearchSettings(args.method, args.seed, args.random_starts, args.tries, args.generations, args.offspring,
                              parse_budget(args.search_budget), anchors=args.anchors, restarts=args.restarts)
    work = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    profile = find_profile(bundle, units, table, db, args.target, settings, work, progress=not args.quiet, cluster=args.cluster)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        profile.save(args.output)
    if args.json:
        print(json.dumps(profile_json(profile), indent=1))
    else:
        print(f"{profile.method}: predicted speedup {profile.predicted_speedup:.4f}x (target {args.target:g}x), "
              f"calibration loss {profile.calibration_loss:.6g}, held-out loss {profile.heldout_loss}, {profile.evaluations} evaluations"
              + (f"; profile written to {args.output}" if args.output else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from spdy.blocks import block_units
    from spdy.database import Database, StructuredDatabase
    from spdy.pipeline import check_same_model, structured_engine, timing_batch
    from spdy.verification import verify
    from spdy.verify_structured import verify_structured

    bundle, units = _bundle(args)
    db = Database.open(args.database) if args.database else None
    structured = isinstance(db, StructuredDatabase)
    if structured:  # its profile names blocks, not layers
        units = block_units(bundle.model, args.include, args.exclude or ())
    profile = Profile.load(args.profile)
    unknown = [u for u in profile.options if u not in units]
    if unknown:
        raise InputError(f"--profile {args.profile} names units the model does not have: {unknown[:3]}")
    if args.target is not None:
        profile.target = args.target
    table = TimingTable.load(args.timings) if args.timings else None
    check_same_model(bundle, db, profile, f"--profile {args.profile}")
    if structured:
        result = verify_structured(bundle.model, units, profile, timing_batch(bundle), table, db, args.rounds,
                                   engine=args.engine or structured_engine(table))
    else:
        result = verify(bundle.model, units, profile, timing_batch(bundle), table=table,
                        weights=db.weight if db is not None else None, rounds=args.rounds, engine=args.engine)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        predicted = "n/a" if result.predicted_speedup is None else f"{result.predicted_speedup:.3f}x"
        target = "none" if result.target is None else f"{result.target:g}x"
        print(f"measured {result.speedups()} (spread {result.measured_spread:.3f}, {result.rounds} rounds), "
              f"predicted {predicted}, target {target}: {'MET' if result.met else 'NOT MET' if result.met is False else 'no target'}")
        for note in (result.under_prediction(), result.over_delivery()):
            if note:
                print(f"note: {note}")
    return 0 if result.met is not False else 1


def _run_config(args: argparse.Namespace) -> RunConfig:
    """Flags given on the command line win over the --config TOML file, which wins over defaults."""
    from spdy.pipeline import RunConfig

    file_values: dict = {}
    if args.config:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            file_values = tomllib.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise InputError(f"--config: file {args.config} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"--config {args.config}: {e}") from None
        file_values = {k.replace("-", "_"): v for k, v in file_values.items()}
        keys = {f.name for f in fields(RunConfig)}
        unknown = sorted(set(file_values) - keys)
        if unknown:
            raise InputError(f"--config {args.config}: unknown keys {unknown}; valid keys are {sorted(keys)}")
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}
    merged = {**file_values, **given}
    if isinstance(merged.get("levels"), str):
        merged["levels"] = _levels(merged["levels"])
    if isinstance(merged.get("baselines"), str):
        merged["baselines"] = tuple(m.strip() for m in merged["baselines"].split(",") if m.strip())
    for key in ("include", "exclude"):
        if isinstance(merged.get(key), str):
            merged[key] = [merged[key]]
    return RunConfig(**merged)


def cmd_run(args: argparse.Namespace) -> int:
    from spdy.pipeline import run

    cfg = _run_config(args)
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    summary = run(cfg, say)
    met = summary["profiles"][cfg.method]["verify"]["met"]
    if args.json:
        chosen = summary["profiles"][cfg.method]
        print(json.dumps({"target": summary["target"], "targets": summary["targets"], "why": summary["choice"].get("why"),
                          "predicted_speedup": chosen["predicted_speedup"],
                          "measured_speedup": chosen["verify"]["measured_speedup"], "met": chosen["verify"]["met"],
                          "heldout": {m: p["heldout_loss"] for m, p in summary["profiles"].items()}, "work_dir": cfg.work_dir,
                          **({"heldout_after_gap": summary["gap"]["heldout_after_gap"]} if summary["gap"] else {})}, indent=1))
    return 0 if met else 1


def cmd_export(args: argparse.Namespace) -> int:
    from spdy.pipeline import export_point

    directory, point = export_point(args.work_dir, args.target, args.method, args.output)
    print(f"exported the {point['method']} profile for {point['target']:g}x (measured {point['measured_speedup']:.3f}x"
          + (f", held-out quality loss {point['quality_loss']:.3g}" if point.get("quality_loss") is not None else "") + f") to {directory}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spdy.report import write_report

    md, html_path = write_report(args.work_dir)
    print(f"wrote {md} and {html_path}")
    return 0


def cmd_gradual(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from spdy.recovery.gradual import Recipe
    from spdy.recovery.train import TrainConfig, default_distill, gradual_prune

    sources = [flag for flag, value in (("--profile", args.profile), ("--recipe", args.recipe), ("--sparsity", args.sparsity)) if value is not None]
    if len(sources) != 1:
        raise InputError(f"give exactly one of --profile, --recipe, --sparsity (got {', '.join(sources) or 'none'})")
    schedule = {"--steps": args.steps, "--update-every": args.update_every, "--prune-fraction": args.prune_fraction,
                "--initial": args.initial, "--criterion": args.criterion}
    if args.recipe and any(v is not None for v in schedule.values()):
        raise InputError(f"--recipe fixes the schedule; drop {', '.join(f for f, v in schedule.items() if v is not None)}")
    bundle, units = _bundle(args)
    try:
        if args.recipe:
            recipe = Recipe.load(args.recipe)
        else:
            if args.profile:
                profile = Profile.load(args.profile)
            else:
                profile = Profile({u: Option(args.sparsity).key for u in units})
            recipe = Recipe.from_profile(profile, args.steps or 100, args.prune_fraction or 0.75, initial=args.initial or 0.0,
                                         update_every=args.update_every or 10, criterion=args.criterion or "magnitude")
        unknown = [u for u in recipe.targets if u not in units]
        if unknown:
            raise InputError(f"{args.profile or args.recipe} names units the model does not have (check --include/--exclude): {unknown[:3]}")
        flags = {"lr": args.lr, "distill": args.distill, "layer": args.layer_weight, "seed": args.seed}
        config = TrainConfig.from_dict({**asdict(TrainConfig(distill=default_distill(bundle.loss))), **recipe.training,
                                        **{k: v for k, v in flags.items() if v is not None}})
        recipe.training = asdict(config)
        result = gradual_prune(bundle, units, recipe, config, args.work_dir, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    result.update(recipe=str(Path(args.work_dir) / "recipe.json"), model=str(Path(args.work_dir) / "model.safetensors"), steps=recipe.total_steps)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"held-out loss {result['heldout_dense']:.4g} dense, {result['heldout_before']:.4g} one-shot pruned, "
              f"{result['heldout_after']:.4g} after {recipe.total_steps} steps of gradual pruning; recipe {result['recipe']}, weights {result['model']}")
    return 0


def cmd_nm(args: argparse.Namespace) -> int:
    from spdy.recovery.nm import prune_nm

    bundle, units = _bundle(args)
    result = prune_nm(bundle, units, args.pattern, args.pruner, args.gap, args.work_dir, epochs=args.epochs, lr=args.lr,
                      batch_size=args.gap_batch, seed=args.seed, progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    after = f"{result['heldout_after_gap']:.6g}" if result["heldout_after_gap"] is not None else "(no gAP)"
    print(f"{args.model} {args.pattern} ({args.pruner}, {result['samples']} samples): held-out {bundle.loss} dense "
          f"{result['heldout_dense']:.6g}, pruned {result['heldout_before_gap']:.6g}, after gAP {after}")
    return 0


DATABASE_SAMPLES_HELP = ("samples the database's Hessians are computed on, drawn like the calibration data but disjoint from it, "
                         "so the search scores reconstructions on data they were not fitted to (0: the calibration samples)")


WORKLOAD_HELP = ("what the model is timed and verified on: prefill:BATCHxSEQ (whole sequences) or decode:BATCH@CONTEXT (one "
                 "generated token per step with a KV cache of CONTEXT tokens); default: decode:1@512 for causal LMs, else the "
                 "first calibration batch")


def _model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("model", metavar="MODEL", nargs=None if model_required else "?", default="minilm",
                   help="minilm | smollm2 | digits | digits-cnn | efficientnet-lite0 | a local Hugging Face model directory | "
                        "module:function (e.g. spdy.models.resnet:resnet50_job)")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences/samples (default %(default)s)")
    p.add_argument("--heldout", type=int, default=32, help="held-out sequences (default %(default)s)")
    p.add_argument("--validation", type=int, default=VALIDATION, help="validation samples, drawn like the calibration data but "
                   "disjoint from it: a search's final profile is its finalist that does best on them (0: none; default %(default)s)")
    p.add_argument("--database-samples", type=int, default=64, help=DATABASE_SAMPLES_HELP + " (default %(default)s)")
    p.add_argument("--workload", help=WORKLOAD_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="batch size, also the timed deployment batch (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for text models (default %(default)s)")
    p.add_argument("--include", nargs="+", metavar="GLOB", help="prune only layers whose names match (default: the model's own)")
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="never prune layers whose names match")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (shown by default, with --json too)")


def _option_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M (2:4) | blocks RxC (4x1, 16x16) | structured "
                   "(whole attention heads and feed-forward neurons of BERT-style encoders; --levels does not apply)")
    p.add_argument("--levels", help="sparsity levels: 0.5,0.7,0.9 or MIN:MAX:STEPS (default: the SPDY grid 0.4:0.99:41)")


def _cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="ray[:ADDRESS]", help="run the database's units and the search's candidates on Ray: ray starts "
                   "it on this machine, ray:ADDRESS joins a running cluster (needs pip install 'spdy[ray]'; workers must see the "
                   "database directory)")


ANCHORS_HELP = ("SPDY: comma-separated baselines whose profiles join the random starts, so the search can start from the best "
                f"of them: {', '.join(ANCHOR_CHOICES)} (default {','.join(ANCHORS)}; none for random starts only)")


RESTARTS_HELP = ("spdy/evo: independent searches from seeds SEED, SEED+1, ..., each with the search budget; every search's "
                 "finalists go to the validation pick (default 1)")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="spdy", choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-starts", type=int, default=100, help="SPDY: random coefficient vectors first (default %(default)s)")
    p.add_argument("--tries", type=int, default=100, help="SPDY: failed local-search tries before shrinking the step (default %(default)s)")
    p.add_argument("--anchors", default=",".join(ANCHORS), help=ANCHORS_HELP)
    p.add_argument("--restarts", type=int, default=1, help=RESTARTS_HELP)
    p.add_argument("--generations", type=int, default=50, help="evo: generations (default %(default)s)")
    p.add_argument("--offspring", type=int, default=16, help="evo: offspring per generation (default %(default)s)")
    p.add_argument("--search-budget", default=DEFAULT_SEARCH_BUDGET, metavar="TIME", help=BUDGET_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spdy", description="Prune a model to a target speedup measured on a real engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("solve", help="exact DP: least-error profile meeting a target speedup on a timing table")
    p.add_argument("timings", metavar="TIMINGS", help="timing table: spdy JSON or the SPDY reference text format")
    p.add_argument("--target", type=float, required=True, help="target speedup over the dense model, e.g. 2.0")
    p.add_argument("--errors", metavar="FILE", help="JSON unit -> {sparsity: error}; default: the SPDY prior (i/(n-1))^2")
    p.add_argument("--exclude", nargs="+", metavar="NAME", help="units kept dense and out of the solver (their time counts as fixed)")
    p.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS, help="time resolution of the DP (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("time", help="measure every unit at every option on an engine -> timing table JSON")
    _model_args(p)
    _option_args(p)
    p.add_argument("--engine", default="torch-cpu", help="timing backend (default %(default)s)")
    p.add_argument("--threads", type=int, help="threads the engine runs with (default: all cores)")
    p.add_argument("-o", "--output", default="timings.json", help="output JSON (default %(default)s); resumes from OUTPUT.checkpoint.json")
    p.set_defaults(func=cmd_time)

    p = sub.add_parser("database", help="prune every unit to every option from calibration data -> database directory")
    _model_args(p)
    _option_args(p)
    p.add_argument("--pruner", default="obs", choices=("obs", "adaprune", "magnitude"))
    p.add_argument("-o", "--output", default="database", help="database directory (default %(default)s); an interrupted build resumes")
    _cluster_arg(p)
    p.set_defaults(func=cmd_database)

    p = sub.add_parser("search", help="find the profile that loses least while meeting the target")
    _model_args(p)
    _search_args(p)
    p.add_argument("--timings", required=True, help="timing table (spdy time)")
    p.add_argument("--database", required=True, help="database directory (spdy database)")
    p.add_argument("--target", type=float, required=True, help="target speedup")
    p.add_argument("-o", "--output", help="write the profile JSON here")
    p.add_argument("--checkpoint-dir", help="directory for the search checkpoint (resume after interruption)")
    _cluster_arg(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("verify", help="run dense and pruned models alternately: measured vs predicted speedup")
    _model_args(p)
    p.add_argument("--profile", required=True, help="profile JSON (spdy search/solve --json output works)")
    p.add_argument("--timings", help="timing table: predicted speedup and the formats it measured")
    p.add_argument("--database", help="database directory for the pruned weights (default: magnitude masks)")
    p.add_argument("--target", type=float, help="target speedup (default: the profile's)")
    p.add_argument("--rounds", type=int, default=30, help="alternating dense/pruned rounds (default %(default)s)")
    p.add_argument("--engine", choices=["torch-cpu", "deepsparse", "cuda-2:4", "cuda"],
                   help="run both models on this engine (default: the one the timing table was measured on; a structured "
                        "profile's smaller model: torch-cpu, deepsparse or cuda)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", help="everything: time -> database -> search -> verify -> export -> report (resumable)")
    p.add_argument("model", metavar="MODEL", nargs="?", help="default minilm (all-MiniLM-L6-v2 on pydoc text)")
    p.add_argument("--config", help="TOML file with any of the flags below as keys (flags given here win)")
    p.add_argument("--target", type=float, help="one target speedup (default: a curve of targets, see --targets)")
    p.add_argument("--targets", help="comma-separated speedups, or auto (the default without --target: five spread over what the "
                   "engine can do on this model): a profile per target, each measured; the fastest whose held-out quality stays "
                   "within --max-loss is exported")
    p.add_argument("--max-loss", type=float, help="held-out quality loss the exported profile may have, in the model's own terms "
                   "(default: 0.05 of mean cosine for sentence encoders, +10%% perplexity for causal LMs, 1%% top-1 disagreement "
                   "for classifiers)")
    p.add_argument("--engine", help="timing backend (default torch-cpu)")
    p.add_argument("--pruner", choices=("obs", "adaprune", "magnitude"), help="database pruner (default obs)")
    p.add_argument("--pattern", help="unstructured | N:M | RxC blocks | structured: whole heads, neurons and conv channels, a physically smaller "
                   "model that dense torch runs faster (default unstructured)")
    p.add_argument("--shrink", type=float, metavar="S", help="mixed profile: first shrink the model with structured options (heads, "
                   "neurons, channels) to S x over dense torch, then prune the smaller model with --pattern to --target over the "
                   "original; the structured stage is cached in WORK/shrink (torch-cpu)")
    p.add_argument("--levels", help="sparsity levels: 0.5,0.7,0.9 or MIN:MAX:STEPS (default the SPDY grid)")
    p.add_argument("--method", choices=METHODS, help="search method (default spdy)")
    p.add_argument("--baselines", help="comma-separated methods to compare against (default uniform,global-magnitude,dp-errors)")
    p.add_argument("--samples", type=int, help="calibration samples (default 64)")
    p.add_argument("--heldout", type=int, help="held-out samples (default 32)")
    p.add_argument("--validation", type=int, help=f"validation samples that pick a search's final profile (default {VALIDATION})")
    p.add_argument("--database-samples", type=int, help=DATABASE_SAMPLES_HELP + " (default 64)")
    p.add_argument("--workload", help=WORKLOAD_HELP)
    p.add_argument("--search-loss", help="what the search minimises: the model's own loss (default) or a richer signal its family "
                   "offers (minilm: token-cosine, every token's last hidden state)")
    p.add_argument("--batch-size", type=int, help="batch size, also the timed deployment batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    p.add_argument("--include", nargs="+", metavar="GLOB")
    p.add_argument("--exclude", nargs="+", metavar="GLOB")
    p.add_argument("--work-dir", help="where every stage is cached (default spdy-work)")
    p.add_argument("--seed", type=int)
    p.add_argument("--random-starts", type=int)
    p.add_argument("--tries", type=int)
    p.add_argument("--generations", type=int)
    p.add_argument("--offspring", type=int)
    p.add_argument("--search-budget", metavar="TIME", help=BUDGET_HELP)
    p.add_argument("--tie", choices=("none", "kind-depth"), help="SPDY: one coefficient per unit (none, the default) or shared by unit kind and "
                   "depth (kind-depth: fewer free directions)")
    p.add_argument("--anchors", help=ANCHORS_HELP)
    p.add_argument("--restarts", type=int, help=RESTARTS_HELP)
    p.add_argument("--rounds", type=int, help="verify: alternating rounds (default 30)")
    p.add_argument("--threads", type=int, help="threads the engine runs with, timed and verified alike (default: all cores)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the timing table to the deployed runtime by running a few profiles end to end (default on: "
                        "torch-cpu, cuda-2:4, cuda, structured deepsparse)")
    p.add_argument("--gap", action="store_true", default=None, help="finish the chosen profile with global AdaPrune before export")
    p.add_argument("--gap-epochs", type=int, help="gAP passes over the calibration data (default 100, the paper's; slow on a CPU)")
    p.add_argument("--gap-lr", type=float, help="gAP Adam learning rate (default 1e-5)")
    _cluster_arg(p)
    p.add_argument("--json", action="store_true", help="end with one JSON object (for scripts); progress goes to stderr")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="export another point of a run's curve (any target and method it measured), no stage re-run")
    p.add_argument("work_dir", metavar="DIR", help="the work directory of a spdy run")
    p.add_argument("--target", type=float, required=True, help="one of the run's targets")
    p.add_argument("--method", default=None, help="the run's method by default (e.g. spdy, uniform)")
    p.add_argument("-o", "--output", help="export directory (default DIR/export-TARGETx-METHOD)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="(re)write report.md and report.html of a run's work directory")
    p.add_argument("work_dir", metavar="DIR")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("gradual", help="fine-tune while pruning gradually to a profile's per-unit sparsities (resumable)")
    _model_args(p)
    p.add_argument("--profile", help="profile JSON: the final per-unit sparsities (spdy search output)")
    p.add_argument("--recipe", help="re-run a recipe.json written by an earlier run (schedule, targets and training settings)")
    p.add_argument("--sparsity", type=float, help="uniform final sparsity for every unit instead of a profile")
    p.add_argument("--steps", type=int, help="optimizer steps in all (default 100)")
    p.add_argument("--update-every", type=int, help="steps between mask updates (default 10)")
    p.add_argument("--prune-fraction", type=float, help="share of the steps over which sparsity ramps up (default 0.75)")
    p.add_argument("--initial", type=float, help="sparsity at the first step (default 0; the final sparsity = one-shot)")
    p.add_argument("--criterion", choices=("magnitude", "obs"), help="which weights go: |w| or OBS w^2/diag(H^-1) (default magnitude)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--distill", choices=("kl", "cosine", "mse", "layer", "none"), help="teacher loss (default: kl; cosine for embedding models)")
    p.add_argument("--layer-weight", type=float, help="weight of the per-layer output loss over pruned units (default 0)")
    p.add_argument("--seed", type=int, help="batch order seed (default 0)")
    p.add_argument("--work-dir", default="spdy-gradual", help="checkpoints, recipe.json and model.safetensors (default %(default)s); reruns resume")
    p.set_defaults(func=cmd_gradual)

    p = sub.add_parser("nm", help="N:M (2:4) post-training pruning: layer-wise masks, then global AdaPrune (gAP)")
    _model_args(p)
    p.add_argument("--pattern", default="2:4", help="N:M pattern, N zeros in every M inputs (default %(default)s)")
    p.add_argument("--pruner", default="obs", choices=("obs", "adaprune", "magnitude"))
    p.add_argument("--gap", action="store_true", help="fine-tune the whole pruned model against the dense one (global AdaPrune)")
    p.add_argument("--epochs", type=int, default=100, help="gAP passes over the calibration samples (default %(default)s, the "
                   "paper's; hours for MiniLM on 2 CPU cores)")
    p.add_argument("--lr", type=float, default=1e-5, help="gAP Adam learning rate (default %(default)s)")
    p.add_argument("--gap-batch", type=int, default=32, help="gAP samples per step (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="gAP sample order (default %(default)s)")
    p.add_argument("--work-dir", default="spdy-nm", help="database and gAP checkpoints; a rerun resumes (default %(default)s)")
    p.set_defaults(func=cmd_nm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a verified target missed, 2 bad input (one line, no traceback), 130 interrupted.

    Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        if getattr(args, "target", None) is not None:
            check_target(args.target, "--target")  # before any model is loaded or anything is timed
        if getattr(args, "search_budget", None) is not None:
            parse_budget(args.search_budget)  # likewise
        if getattr(args, "cluster", None) is not None:
            from spdy.cluster import parse_cluster

            parse_cluster(args.cluster)  # likewise
        return handler(args)
    except InfeasibleTarget as e:
        print(f"spdy {args.command}: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": "infeasible", "target": e.target, "max_speedup": e.max_speedup}))
        return 2
    except (InputError, FileNotFoundError) as e:
        print(f"spdy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spdy {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
