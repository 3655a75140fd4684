"""The whole method as functions: model -> timings -> database -> profile -> pruned model -> verified.

This is the only module that wires the stages together (the CLI is a thin layer over it).
Each stage's result is cached in a work directory under a name derived from a hash of the
stage's inputs, so a rerun skips what is done, resumes what was interrupted (timing,
database and search checkpoint themselves), and recomputes only what a changed input
affects.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from spdy.cluster import RayCluster, connect, parse_cluster
from spdy.database import Database, Stitcher, build_database, capture
from spdy.database.structured import StructuredDatabase
from spdy.search.evaluate import Evaluator
from spdy.search.evolution import EvoConfig, EvolutionSearch
from spdy.levels import DENSE, STRUCTURED, Option, options_for, spdy_grid
from spdy.errors import InputError
from spdy.models import ModelBundle, load_model
from spdy.models.bundle import model_fingerprint
from spdy.models.workload import Workload
from spdy.search import baselines
from spdy.search.dp import InfeasibleTarget, solve
from spdy.search.budget import DEFAULT_SEARCH_BUDGET, parse_budget
from spdy.search.profile import ANCHOR_CHOICES, ANCHORS, METHODS, Profile
from spdy.search.select import VALIDATION, pick_on_validation, pooled, with_baselines
from spdy.quality import default_max_loss, outputs, quality, quality_loss, quality_loss_name
from spdy.search.spdy import SpdyConfig, SpdySearch
from spdy.files import digest, replace_atomically, write_json
from spdy.timing import measure
from spdy.timing.backend import get_backend
from spdy.timing.table import TimingTable, check_target
from spdy.units import Unit, find_units, set_weight_matrix, weight_matrix

def runtime_fingerprint(package: str = "runtime") -> str:
    """A digest of the source of ``spdy.<package>`` (the runtime by default). Measurements are cached
    under it, so they are taken again once the code that runs (or times) the model has changed."""
    root = Path(__file__).parent / package
    return digest(*[(str(f.relative_to(root)), f.read_text()) for f in sorted(root.rglob("*.py"))])


def prunable_units(bundle: ModelBundle, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> dict[str, Unit]:
    """The bundle's default units unless ``include`` says otherwise."""
    return find_units(bundle.model, include or bundle.include, exclude)


def timing_batch(bundle: ModelBundle) -> Any:
    """The batch the model is timed and verified on: its workload's (default the first calibration batch)."""
    return bundle.timing_batch


def options_of(pattern: str, levels: Sequence[float] | None) -> list[Option]:
    return options_for(pattern, list(levels) if levels is not None else spdy_grid()[1:])


def option_keys(pattern: str, levels: Sequence[float] | None, units: Mapping[str, Unit]) -> list[str] | dict[str, list[str]]:
    """The option keys to time: the pattern's grid for every unit, or (structured) each block's kept sizes."""
    if pattern == STRUCTURED:
        from spdy.blocks import unit_options

        return unit_options(units)
    return [o.key for o in options_of(pattern, levels)]


# engines that run a smaller dense model -> the backend that times its blocks; ``cuda`` (dense torch on a GPU) has no other
STRUCTURED_ENGINES = {"torch-cpu": "torch-cpu-blocks", "deepsparse": "deepsparse-blocks", "cuda": "cuda-blocks"}


def timing_engine(engine: str, pattern: str) -> str:
    """The backend that times ``pattern`` for ``engine``: structured blocks have their own."""
    if pattern != STRUCTURED:
        if engine == "cuda":
            raise InputError(f"--engine cuda runs dense torch on a GPU, which is faster only for a smaller model: use --pattern {STRUCTURED} "
                             f"(for 2:4 sparse tensor cores, --engine cuda-2:4 --pattern 2:4), not --pattern {pattern}")
        return engine
    if engine not in STRUCTURED_ENGINES:
        raise InputError(f"--pattern {STRUCTURED} is timed on --engine {', '.join(STRUCTURED_ENGINES)} (dense engines run the "
                         f"smaller layers), not {engine!r}")
    return STRUCTURED_ENGINES[engine]


def structured_engine(table: TimingTable | None) -> str:
    """The engine a structured table's blocks were timed for (torch-cpu without a table)."""
    backend = table.meta.get("backend") if table is not None else None
    return next((engine for engine, timed in STRUCTURED_ENGINES.items() if timed == backend), "torch-cpu")


def timing_path(bundle: ModelBundle, units: Mapping[str, Unit], work: Path, pattern: str = "unstructured",
                levels: Sequence[float] | None = None, engine: str = "torch-cpu", threads: int | None = None) -> Path:
    """Where the timing table for these inputs is cached: under everything the times depend on (the
    model's weights, units, options, engine, batch shape, threads, the runtime's code, torch and the
    CPU), so a table measured by another runtime or machine is measured again, not reused."""
    from spdy.timing.backend import cpu_model

    keys = option_keys(pattern, levels, units)
    engine = timing_engine(engine, pattern)
    batch = timing_batch(bundle)
    shape = {k: list(v.shape) for k, v in batch.items()} if isinstance(batch, dict) else list(getattr(batch, "shape", []))
    shape = [str(bundle.workload), shape] if bundle.workload is not None else shape  # old tables keep their key
    machine = [runtime_fingerprint(), runtime_fingerprint("timing"), torch.__version__, cpu_model()]
    return work / f"timings-{digest(bundle.name, model_fingerprint(bundle.model), sorted(units), keys, engine, shape, threads, machine)}.json"


def timings(bundle: ModelBundle, units: Mapping[str, Unit], work: Path, pattern: str = "unstructured",
            levels: Sequence[float] | None = None, engine: str = "torch-cpu", progress: bool = True,
            threads: int | None = None) -> tuple[TimingTable, Path]:
    """Measure (or load the cached) timing table of ``units`` on ``engine`` (``threads``: default all cores)."""
    path = timing_path(bundle, units, work, pattern, levels, engine, threads)
    if path.is_file():
        return TimingTable.load(path), path
    keys = option_keys(pattern, levels, units)
    return measure_to(path, bundle, units, keys, timing_engine(engine, pattern), progress, threads), path


def measure_to(path: Path, bundle: ModelBundle, units: Mapping[str, Unit], keys: Sequence[str] | Mapping[str, Sequence[str]],
               engine: str = "torch-cpu", progress: bool = True, threads: int | None = None) -> TimingTable:
    """Measure on the deployment batch, checkpointing beside ``path`` (a rerun resumes), then save to ``path``.
    ``keys``: the options of every unit, or per unit (structured blocks)."""
    checkpoint = path.with_suffix(".checkpoint.json")
    table = measure(bundle.model, units, timing_batch(bundle), options=dict(keys) if isinstance(keys, Mapping) else list(keys), backend=engine,
                    checkpoint=checkpoint, progress=progress, **({"threads": threads} if threads else {}))
    table.save(path)
    checkpoint.unlink(missing_ok=True)
    return table


def database(bundle: ModelBundle, units: Mapping[str, Unit], work: Path, pruner: str = "obs", pattern: str = "unstructured",
             levels: Sequence[float] | None = None, progress: bool = True, cluster: str | RayCluster | None = None) -> Database:
    """Build (or resume, or reuse) the pruned-weight database for ``units``; ``cluster``: run its units on Ray (`spdy.cluster`).
    Structured: the blocks' kept structures and updated consumer weights (`spdy.database.structured`), built here."""
    if pattern == STRUCTURED:
        from spdy.database.structured import build_structured_database

        if cluster is not None:
            raise InputError(f"--cluster: the {STRUCTURED} database is built on this machine only")
        directory = work / f"database-{digest(bundle.fingerprint, sorted(units), pruner, STRUCTURED, option_keys(pattern, levels, units))}"
        return build_structured_database(bundle.model, dict(units), bundle.statistics, directory, pruner=pruner, progress=progress)
    options = options_of(pattern, levels)
    directory = work / f"database-{digest(bundle.fingerprint, sorted(units), pruner, [o.key for o in options])}"
    with connect(cluster) as ray:
        return build_database(bundle.model, dict(units), bundle.statistics, options, directory, pruner=pruner, progress=progress,
                              executor=ray.map_unordered if ray else None)


def parse_anchors(anchors: str | Sequence[str]) -> tuple[str, ...]:
    """``"uniform,dp-errors"`` or a sequence -> a tuple of baseline names; ``"none"`` -> no anchors."""
    if isinstance(anchors, str):
        anchors = [] if anchors.strip() == "none" else [a.strip() for a in anchors.split(",") if a.strip()]
    return tuple(anchors)


@dataclass
class SearchSettings:
    method: str = "spdy"
    seed: int = 0
    random_starts: int = 100
    tries: int = 100
    generations: int = 50
    offspring: int = 16
    budget: float | None = None  # seconds of wall time for the spdy/evo search; None: run to the end (deterministic)
    tie: str = "none"  # SPDY: coefficients per unit, or shared by kind and depth (`SpdyConfig.tie`)
    anchors: tuple[str, ...] = ANCHORS  # SPDY: baselines whose profiles join the random starts (`SpdySearch`)
    restarts: int = 1  # spdy/evo: searches from seeds seed, seed+1, ..., each with the budget, finalists pooled (`pooled`)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.anchors = parse_anchors(self.anchors)
        unknown = [a for a in self.anchors if a not in ANCHOR_CHOICES]
        if unknown:
            raise InputError(f"SPDY anchors {unknown}: choose among {', '.join(ANCHOR_CHOICES)} (or none)")
        if self.budget is not None and not 0 < self.budget < float("inf"):
            raise InputError(f"search budget {self.budget!r}: need a positive, finite number of seconds")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise InputError(f"--restarts {self.restarts!r}: need a whole number of searches, 1 or more")


class Evaluators(NamedTuple):
    """The search's objective on calibration data, on validation data (picks the final profile) and on held-out data."""

    calibration: Evaluator
    validation: Evaluator | None
    heldout: Evaluator | None

    def attach(self, apply: Callable[[Mapping[str, str]], object]) -> None:
        for evaluator in self:
            if evaluator is not None:
                evaluator.apply = apply


def evaluators(bundle: ModelBundle, stitcher: Stitcher) -> Evaluators:
    """Built while the model is dense (they cache dense outputs); all three score the search's loss
    (`ModelBundle.objective`), so calibration, validation and held-out losses compare."""
    stitcher.restore()

    def make(batches: list, labels: list | None, split: str) -> Evaluator | None:
        return (Evaluator(bundle.model, batches, bundle.objective, stitcher.apply, labels, split, bundle.search_output, bundle.reference)
                if batches else None)

    return Evaluators(make(bundle.calibration, bundle.calibration_labels, "calibration"),
                      make(bundle.validation, bundle.validation_labels, "validation"), make(bundle.heldout, bundle.heldout_labels, "heldout"))


def find_profile(bundle: ModelBundle, units: Mapping[str, Unit], table: TimingTable, db: Database, target: float,
           settings: SearchSettings = SearchSettings(), work: Path | None = None, progress: bool = True,
           evaluation: Evaluators | None = None, start: Sequence[float] | None = None, cluster: str | RayCluster | None = None) -> Profile:
    """Find a profile with ``settings.method`` that meets ``target`` on ``table``; loss on calibration, validation and
    held-out data. With validation data a search's final profile is its finalist that does best there.

    ``start`` (SPDY only): the per-unit sensitivities an earlier search learned, to search from (a warm start, e.g.
    from a neighbouring target, or a landing re-solve's). ``cluster``: score the
    SPDY and evolutionary searches' candidates on a pool of Ray actors (`spdy.cluster`), same result.
    """
    check_target(target)
    fingerprint = model_fingerprint(bundle.model)  # the dense model's: every search restores it when done
    db.check_model(fingerprint)
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    evaluation = evaluation or evaluators(bundle, stitcher)
    evaluation.attach(stitcher.apply)
    calibration, validation, heldout = evaluation

    def checkpoint(seed: int) -> Path | None:
        if work is None:
            return None
        # the budget is left out: a rerun with a larger budget resumes the search where the smaller one stopped it
        key = {k: v for k, v in asdict(settings).items() if k not in ("budget", "restarts")} | {"seed": seed}
        return work / f"search-{settings.method}-{digest(table.solver_view(), db.manifest.get('identity', db.directory.name), target, key, start)}.json"

    seeds = range(settings.seed, settings.seed + settings.restarts)
    method = settings.method
    scale, pool = ExitStack(), None
    try:
        if method in ("spdy", "evo") and cluster is not None:
            pool = scale.enter_context(connect(cluster)).pool(calibration, stitcher)
            scale.callback(pool.close)
        if method == "spdy":
            names = () if start is not None else settings.anchors
            anchors = _anchors(names, bundle, table, target, units, db, stitcher)
            starts = [p.options for name, p in anchors.items() if name in names]
            if "uniform" in names and (short := baselines.uniform_short_of(table, target)) is not None:
                starts.insert(0, short)  # a coarse grid's uniform level can overshoot far: the DP brings the one short of it up
            profile = pooled([SpdySearch(table, target, calibration,
                                         SpdyConfig(random_starts=settings.random_starts, tries=settings.tries, seed=seed, tie=settings.tie),
                                         checkpoint(seed), progress, bundle.fingerprint, settings.budget, start, pool, starts).run()
                              for seed in seeds])
            profile = with_baselines(profile, anchors, calibration)
        elif method == "evo":
            profile = pooled([EvolutionSearch(table, target, calibration, len(bundle.calibration),
                                              EvoConfig(generations=settings.generations, offspring=settings.offspring, seed=seed),
                                              checkpoint(seed), progress, bundle.fingerprint, settings.budget, pool).run()
                              for seed in seeds])
        else:
            started = time.perf_counter()
            profile = _baseline(method, bundle, table, target, units, db, stitcher)
            profile.calibration_loss = calibration(profile.options)
            profile.evaluations = 1
            profile.meta["seconds"] = round(time.perf_counter() - started, 2)
        if validation is not None:
            profile = pick_on_validation(profile, table, validation)
        profile.meta.pop("finalists", None)
        if heldout is not None:
            profile.heldout_loss = heldout(profile.options)
    finally:
        stitcher.restore()
        scale.close()
    profile.meta.update(model=bundle.name, model_fingerprint=fingerprint, loss=bundle.objective, database=str(db.directory), pruner=db.pruner.get("name"))
    return profile


def _anchors(names: Sequence[str], bundle: ModelBundle, table: TimingTable, target: float, units: Mapping[str, Unit], db: Database,
             stitcher: Stitcher) -> dict[str, Profile]:
    """The profiles of the baselines ``names`` and uniform at ``target``: SPDY starts from those named (`fit_coefficients`
    finds the DP profile meeting the target nearest each) and never returns one that scores worse (`with_baselines`).
    A baseline that does not apply (one ranking single weights on whole structures, or no single level meeting the
    target) is left out."""
    profiles = {}
    for name in dict.fromkeys(["uniform", *names]):
        if name in WEIGHT_BASELINES and isinstance(db, StructuredDatabase):
            continue
        try:
            profiles[name] = _baseline(name, bundle, table, target, units, db, stitcher)
        except InputError:
            continue
    return profiles


def _baseline(method: str, bundle: ModelBundle, table: TimingTable, target: float, units: Mapping[str, Unit], db: Database,
              stitcher: Stitcher) -> Profile:
    weights = {u: stitcher.dense[u] for u in table.units}
    if method == "uniform":
        return baselines.uniform(table, target)
    if method == "global-magnitude":
        return baselines.global_magnitude(table, target, weights)
    if method == "dp-errors":
        squared = {u: {k: e ** 2 for k, e in errs.items()} for u, errs in db.relative_errors().items() if u in table.times}
        return baselines.dp_errors(table, target, squared)
    # OWL scores weights by |W_ij| * ||x_j||: the input norms come from the dense model's pass over the database's data
    stitcher.restore()
    stats = capture(bundle.model, {u: units[u] for u in table.units}, bundle.statistics)
    norms = {u: (s.hessian_sum.diagonal()).sqrt() for u, s in stats.items()}
    return baselines.owl(table, target, weights, norms)


def heldout_quality(bundle: ModelBundle, stitcher: Stitcher, profiles: Mapping[str, Profile],
                    dense: Sequence[torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Each profile's held-out quality in the model's own terms (`spdy.quality`) against ``dense`` (the dense
    model's held-out outputs, computed here when not given); none without held-out data."""
    if not bundle.heldout:
        return {}
    stitcher.restore()
    dense = dense if dense is not None else outputs(bundle.dense_reference, bundle.heldout)
    result = {}
    try:
        for method, profile in profiles.items():
            stitcher.apply(profile.options)
            result[method] = quality(bundle.model, bundle.heldout, dense, bundle.loss, bundle.heldout_labels)
    finally:
        stitcher.restore()
    return result


def apply(units: Mapping[str, Unit], profile: Profile, db: Database | None = None) -> None:
    """Put the profile's pruned weights into the model for good (database weights, else magnitude masks)."""
    from spdy.runtime import magnitude_mask

    with torch.no_grad():
        for name, key in profile.options.items():
            if key == DENSE:
                continue
            dense = weight_matrix(units[name])
            set_weight_matrix(units[name], db.weight(name, key) if db is not None else dense * magnitude_mask(dense, key))


def export_profile(bundle: ModelBundle, units: Mapping[str, Unit], profile: Profile, db: Database, formats: Mapping[str, str],
                   directory: Path) -> Path:
    """Export the profile's pruned model: a structured one physically smaller (the bundle's model untouched),
    else the database weights applied to the bundle's model in place (`apply`); with ``model.onnx`` traced on
    the timing batch where it can be."""
    from spdy.runtime.deploy import export

    if db.pattern == STRUCTURED:
        from spdy.verify_structured import smaller_model

        small, kept = smaller_model(bundle.model, units, profile.options, db)
        return export(small, bundle.name, profile, {}, directory, tokenizer=bundle.tokenizer, structure=kept, example=timing_batch(bundle))
    apply(units, profile, db)
    return export(bundle.model, bundle.name, profile, formats, directory, tokenizer=bundle.tokenizer, example=timing_batch(bundle),
                  structure=(bundle.meta.get("shrink") or {}).get("structure"))


def default_target(table: TimingTable) -> float:
    """A target this engine reaches on this model with room to spare: 60% of the way to the maximum.

    A table whose maximum is within timing noise of 1x has no target worth pruning for: say so."""
    best = table.max_speedup()
    if best < 1.02:
        raise InputError(f"the maximum attainable speedup on this timing table is {best:.3f}x (every unit at its fastest option): "
                         "within timing noise of the dense model, so there is no default target; prune more layers "
                         "(--include), another engine (--engine), or re-time on a quieter machine")
    return max(round(1 + 0.6 * (best - 1), 3), 1.01)


class StageLog:
    """What each stage did and how long it took, kept across reruns in ``run.json``.

    ``stages`` keeps the latest invocation's record of every stage ever run here (a stage run
    once per target sums its runs); ``last`` lists the stages this invocation really ran (cached
    ones are absent).
    """

    def __init__(self, path: Path):
        self.path = path
        previous = json.loads(path.read_text()) if path.is_file() else {}
        self.stages: dict = previous.get("stages", {})
        self.last: list[str] = []

    def record(self, stage: str, seconds: float, **info: Any) -> None:
        if stage in self.last:  # a curve runs a stage once per target: keep this invocation's total
            earlier = self.stages[stage]
            seconds, info = seconds + earlier["seconds"], {**info, "runs": earlier.get("runs", 1) + 1}
        else:
            self.last.append(stage)
        self.stages[stage] = {"seconds": round(seconds, 2), **info}
        text = json.dumps({"stages": self.stages, "last": self.last}, indent=1, default=str)
        replace_atomically(self.path, lambda tmp: tmp.write_text(text))  # a killed run leaves a readable run.json


def timed(log: StageLog, stage: str, fn: Callable[[], Any], **info: Any) -> Any:
    started = time.perf_counter()
    result = fn()
    log.record(stage, time.perf_counter() - started, **info)
    return result


# engines whose tables `calibrate` fits to the deployed runtime (DeepSparse: structured tables only)
CALIBRATED_ENGINES = ("torch-cpu", "cuda-2:4", "cuda")
CALIBRATION_SHARES = (0.25, 0.5, 0.75, 0.95)  # of the way from 1x to the table's maximum
CALIBRATION_ROUNDS = 10


def calibrate(bundle: ModelBundle, units: Mapping[str, Unit], table: TimingTable, table_path: Path,
              say: Callable[[str], None] = lambda text: None, engine: str = "torch-cpu") -> tuple[TimingTable, Path]:
    """The table fitted to the deployed runtime (`TimingTable.calibrated`), cached beside it.

    The profiles measured are the DP's (SPDY prior) at targets spread over the table's range,
    pruned with magnitude masks (speed depends on how many weights remain, not which), run in
    the formats the table measured with every fusion ``convert`` applies; structured blocks
    resized, the first structures kept (`spdy.verify_structured.sized_speedup`, on torch or on
    DeepSparse, whose per-layer analysis overstates what the blocks' share of a real run is).
    """
    from spdy.verification import verify
    from spdy.verify_structured import sized_speedup

    structured = any("block" in u.extra for u in units.values())
    path = table_path.with_name(table_path.stem + "-calibrated.json")
    if path.is_file():
        return TimingTable.load(path), path
    best = table.max_speedup()
    points = []
    profiles = [Profile(solve(table, 1 + share * (best - 1)).profile) for share in CALIBRATION_SHARES]
    if table.dense_formats():  # unpruned layers run faster than torch's: that profile is a point of its own
        profiles.insert(0, Profile({u: DENSE for u in table.units}))
    for profile in profiles:  # no target: nothing to meet, only a point to measure
        if structured:
            measured = sized_speedup(bundle.model, units, profile.options, timing_batch(bundle), CALIBRATION_ROUNDS, table.meta.get("threads"),
                                     engine)
        else:
            measured = verify(bundle.model, units, profile, timing_batch(bundle), table, rounds=CALIBRATION_ROUNDS,
                              generation=False, baseline=bundle.reference).measured_speedup
        points.append((profile.options, measured))
        say(f"      calibration: predicted {table.predicted_speedup(profile.options):.3f}x, measured {measured:.3f}x")
    try:
        calibrated = table.calibrated(points)
    except InputError as e:  # measurements too noisy to fit (tiny models, a loaded machine): plan on the table as timed
        say(f"      calibration skipped: {e}")
        calibrated = TimingTable(table.times, table.base, table.fixed, dict(table.meta, calibration={"skipped": str(e)}), table.shapes, table.dense_blocks)
    calibrated.save(path)
    return calibrated, path


LANDING = (0.97, 1.08)  # measured / target accepted as landed; outside it the profile is re-solved
MAX_RESOLVES = 3
MIN_TABLE_TARGET = 1.001  # the solver needs a target above 1


def _next_table_target(rounds: Sequence[Mapping[str, float]], target: float) -> float:
    """What to ask the table for next. Once measured rounds fall on both sides of ``target``, interpolate
    between the closest pair (the runtime's response is monotone but noisy, and a factor from the last
    round alone overshoots back and forth); before that, scale by the last round's predicted / measured."""
    below = [r for r in rounds if r["measured"] < target]
    above = [r for r in rounds if r["measured"] > target]
    if below and above:
        low = max(below, key=lambda r: r["measured"])
        high = min(above, key=lambda r: r["measured"])
        if high["target_for_table"] > low["target_for_table"]:
            share = (target - low["measured"]) / (high["measured"] - low["measured"])
            return low["target_for_table"] + share * (high["target_for_table"] - low["target_for_table"])
    last = rounds[-1]
    return target * last["predicted"] / last["measured"]


def land(profile: Profile, target: float, max_speedup: float, measure: Callable[[Profile], dict],
         resolve: Callable[[Profile, float], Profile], say: Callable[[str], None] = lambda text: None,
         ) -> tuple[Profile, dict, list[dict]]:
    """Close the loop between the timing table and the runtime: measure the profile; while the
    measured speedup misses ``target`` or overshoots it (outside ``LANDING``), ask the table for
    what the rounds so far say lands on it (`_next_table_target`) and measure again, at most
    ``MAX_RESOLVES`` times. A measurement outside the band is taken again and pooled with the first
    before anything is re-solved: on a noisy machine one run of rounds can miss by 10% on its own.

    The table predicts time layer by layer; the deployed runtime fuses and overlaps, so its
    speedup can differ from the prediction by a factor. A miss breaks the promise; an overshoot
    prunes more than the target needs and gives accuracy away. Returns the profile to keep (the
    met round with the least overshoot, else the fastest round), its measurement, and every round.
    """
    from spdy.verification import pooled

    rounds: list[dict] = []
    candidates: list[tuple[Profile, dict]] = []
    table_target = profile.meta.get("table_target", target)
    for attempt in range(MAX_RESOLVES + 1):
        result = measure(profile)
        if not LANDING[0] <= result["measured_speedup"] / target <= LANDING[1] and result.get("ratios"):
            say(f"measured {result['measured_speedup']:.3f}x for a {target:g}x target: measuring it again before re-solving")
            result = pooled(result, measure(profile))
        measured, predicted = result["measured_speedup"], profile.predicted_speedup or table_target
        rounds.append({"target_for_table": table_target, "predicted": predicted, "measured": measured, "met": result["met"]})
        candidates.append((profile, result))
        ratio = measured / target
        if LANDING[0] <= ratio <= LANDING[1] or attempt == MAX_RESOLVES:
            break
        wanted = min(max(_next_table_target(rounds, target), MIN_TABLE_TARGET), max_speedup)
        if abs(wanted - table_target) < 1e-3 * table_target:
            break  # the table cannot be asked for anything else
        say(f"measured {measured:.3f}x for a {target:g}x target ({ratio:.2f}x of it): asking the table for {wanted:.3f}x instead")
        try:
            resolved = resolve(profile, wanted)
        except InputError as e:  # e.g. a baseline whose own maximum is below what the table can do
            say(f"kept the profile measured so far: {e}")
            break
        if resolved.options == profile.options:  # a coarse grid (uniform's levels) gives the same profile: nothing new to measure
            say(f"the table gives the same profile for {wanted:.3f}x: kept it")
            break
        profile, table_target = resolved, wanted
    met = [(p, r) for p, r in candidates if r["met"]]
    chosen = min(met, key=lambda c: c[1]["measured_speedup"]) if met else max(candidates, key=lambda c: c[1]["measured_speedup"])
    return chosen[0], chosen[1], rounds


AUTO_POWERS = (0.1, 0.2, 0.35, 0.5, 0.7)  # --targets auto: the maximum speedup to these powers (denser where models stay usable)
FIRST_SHARE = 0.4  # on a curve, the share of --search-budget for the full search at the middle target; the warm-started rest share the others
# of a target's search budget, for each landing re-solve: a short search from the coefficients found, since at the new table
# target the DP's profile for them is held out 1-10% worse than what such a search finds (bench/bench_resolve.py)
RESOLVE_SHARE = 0.25
CURVE_ROUNDS = 10  # verify rounds of a curve's points (at most --rounds), over dense torch only; the exported one: --rounds, engine dense too


def auto_targets(table: TimingTable) -> list[float]:
    """Targets spread from mild to most of what this engine can do on this model."""
    default_target(table)  # the same refusal when nothing is worth pruning for
    return sorted({max(round(table.max_speedup() ** p, 3), 1.01) for p in AUTO_POWERS})


def choose(points: Mapping[float, Mapping[str, dict]], targets: Sequence[float], cfg: "RunConfig", loss: str) -> tuple[float, dict]:
    """The target whose ``cfg.method`` profile to export: the only one, or on a curve the fastest measured
    one whose held-out quality loss stays within ``cfg.max_loss`` (default per family), else the mildest."""
    limit = cfg.max_loss if cfg.max_loss is not None else default_max_loss(loss)
    what = quality_loss_name(loss)
    ours = [(t, points[t][cfg.method]) for t in targets]
    scored = [(t, p) for t, p in ours if "quality_loss" in p]
    within = [(t, p) for t, p in scored if p["quality_loss"] <= limit]
    choice = {"max_loss": limit, "quality_loss_is": what}
    if len(targets) == 1:
        t, p = ours[0]
        if "quality_loss" in p:
            choice.update(within=p["quality_loss"] <= limit, quality_loss=p["quality_loss"])
            choice["why"] = (f"the target asked for; its {what} is {p['quality_loss']:.3g}, "
                             + ("within" if choice["within"] else f"BEYOND the {limit:g} a deployable model keeps (--max-loss)"))
        else:
            choice["why"] = "the target asked for"
        return t, choice
    if within:
        t, p = max(within, key=lambda tp: tp[1]["verify"]["measured_speedup"])
        faster = [(u, q) for u, q in scored if q["verify"]["measured_speedup"] > p["verify"]["measured_speedup"]]
        why = f"the fastest {cfg.method} profile whose {what} stays within {limit:g} ({p['quality_loss']:.3g})"
        if faster:
            u, q = min(faster, key=lambda tp: tp[1]["verify"]["measured_speedup"])
            why += f"; the next faster one ({q['verify']['measured_speedup']:.3f}x at {u:g}x) would lose {q['quality_loss']:.3g}"
        return t, {**choice, "target": t, "within": True, "quality_loss": p["quality_loss"], "why": why}
    t, p = ours[0]
    return t, {**choice, "target": t, "within": False, "quality_loss": p.get("quality_loss"),
               "why": f"no {cfg.method} profile keeps its {what} within {limit:g} (the mildest, {t:g}x, loses "
                      f"{p.get('quality_loss', float('nan')):.3g}): exported the mildest; ask for lower --targets or a larger --max-loss"}


def curve_point(target: float, method: str, point: Mapping[str, Any]) -> dict:
    """One point of the speed/quality curve, for the summary and `spdy export --target`."""
    profile, result = point["profile"], point["verify"]
    return {"target": target, "method": method, "measured_speedup": result["measured_speedup"], "measured_spread": result["measured_spread"],
            "met": result["met"], "rounds": result["rounds"], "predicted_speedup": profile.predicted_speedup,
            "calibration_loss": profile.calibration_loss, "validation_loss": profile.validation_loss, "heldout_loss": profile.heldout_loss,
            "quality": point.get("quality"), "quality_loss": point.get("quality_loss"), "profile_file": point["file"],
            "formats": result.get("formats", {})}


WEIGHT_BASELINES = ("global-magnitude", "owl")  # baselines that rank single weights: no meaning for whole structures


@dataclass
class RunConfig:
    """Everything ``spdy run`` takes: the flags of the CLI and the keys of a ``--config`` TOML file."""

    model: str = "minilm"
    target: float | None = None
    targets: str | list[float] | None = None  # "auto" (the default without --target) or speedups: one search per target, a curve
    max_loss: float | None = None  # held-out quality loss a curve's exported profile may have (default per family, `spdy.quality`)
    engine: str = "torch-cpu"
    pruner: str = "obs"
    pattern: str = "unstructured"
    shrink: float | None = None  # mixed: shrink with structured options to this speedup first, then prune with ``pattern``
    levels: list[float] | None = None
    method: str = "spdy"
    baselines: tuple[str, ...] = ("uniform", "global-magnitude", "dp-errors")
    samples: int = 64
    heldout: int = 32
    validation: int = VALIDATION
    database_samples: int = 64  # drawn apart from the calibration samples (0: the database is built on those)
    workload: str | None = None  # e.g. prefill:8x128, decode:1@512 (default per family: causal LMs decode)
    search_loss: str | None = None  # the model's own loss, or a richer signal its family offers (e.g. token-cosine)
    batch_size: int = 8
    seq_len: int = 128
    include: list[str] | None = None
    exclude: list[str] | None = None
    work_dir: str = "spdy-work"
    seed: int = 0
    random_starts: int = 100
    tries: int = 100
    generations: int = 50
    offspring: int = 16
    search_budget: str | float | None = DEFAULT_SEARCH_BUDGET
    tie: str = "none"
    anchors: str | tuple[str, ...] = ANCHORS
    restarts: int = 1
    rounds: int = 30
    threads: int | None = None
    gap: bool = False
    gap_epochs: int = 100
    gap_lr: float = 1e-5
    calibrate: bool = True
    cluster: str | None = None  # "ray" or "ray:ADDRESS": database and searches on Ray (`spdy.cluster`)

    def __post_init__(self) -> None:
        if self.cluster is not None:
            parse_cluster(self.cluster)
        for method in (self.method, *self.baselines):
            if method not in METHODS:
                raise InputError(f"method {method!r}: choose one of {', '.join(METHODS)}")
        if self.target is not None:
            check_target(self.target, "--target")
        if self.target is not None and self.targets is not None:
            raise InputError("give --target (one profile) or --targets (a curve), not both")
        if isinstance(self.targets, str) and self.targets != "auto":
            try:
                self.targets = [float(t) for t in self.targets.split(",") if t.strip()]
            except ValueError:
                raise InputError(f"--targets {self.targets!r}: use auto or comma-separated speedups, e.g. 1.25,1.5,2,3") from None
        if isinstance(self.targets, list):
            if not self.targets:
                raise InputError("--targets: no speedup given; use auto or e.g. 1.25,1.5,2,3")
            for t in self.targets:
                check_target(t, "--targets")
            self.targets = sorted(set(self.targets))
        if self.max_loss is not None and not 0 <= self.max_loss < float("inf"):
            raise InputError(f"--max-loss {self.max_loss!r}: need a finite number >= 0 (e.g. 0.05 for 1 - mean cosine)")
        parse_budget(self.search_budget)
        self.anchors = self.settings(self.method).anchors  # checked, and a tuple from here on
        if self.shrink is not None:
            self._check_shrink()
        timing_engine(self.engine, self.pattern)
        if self.pattern == STRUCTURED:
            if self.method in WEIGHT_BASELINES:
                raise InputError(f"--method {self.method} ranks single weights; with --pattern {STRUCTURED} use spdy, evo, uniform or dp-errors")
            if self.gap:
                raise InputError(f"--gap fine-tunes under fixed masks; it does not apply to --pattern {STRUCTURED} yet")
            if self.pruner not in ("obs", "magnitude"):
                raise InputError(f"--pruner {self.pruner}: --pattern {STRUCTURED} has the pruners obs (structured OBS) and magnitude")

    def _check_shrink(self) -> None:
        check_target(self.shrink, "--shrink")
        if self.pattern == STRUCTURED:
            raise InputError(f"--shrink S shrinks the model with structured options first, then prunes it with --pattern: give an "
                             f"unstructured, N:M or block pattern, not {STRUCTURED} (or drop --shrink for a structured profile alone)")
        if self.engine != "torch-cpu":
            raise InputError(f"--shrink: the smaller model is timed against the original on torch-cpu; --engine {self.engine} is not supported")
        if self.target is not None and self.target <= self.shrink:
            raise InputError(f"--shrink {self.shrink:g} must be below --target {self.target:g}: the pruning after the shrink makes up the rest")
        for flag, given in (("--search-loss", self.search_loss), ("--gap", self.gap)):
            if given:
                raise InputError(f"{flag} does not combine with --shrink yet: the pruned smaller model is compared with the original by output")

    def target_list(self, table: TimingTable, heldout: bool) -> list[float]:
        """The targets to search: --target's, --targets', or (the default) a curve spread over the table's range;
        a curve needs held-out data to choose its exported point, so without any the default is one target."""
        if self.target is not None:
            return [self.target]
        if not heldout:
            if self.targets is None:
                return [default_target(table)]
            if self.targets == "auto" or len(self.targets) > 1:
                raise InputError(f"--targets {self.targets if self.targets == 'auto' else ','.join(map(str, self.targets))} needs "
                                 "held-out data to choose the profile to export by its quality; give one --target")
        return self.targets if isinstance(self.targets, list) else auto_targets(table)

    def settings(self, method: str) -> SearchSettings:
        return SearchSettings(method, self.seed, self.random_starts, self.tries, self.generations, self.offspring,
                              parse_budget(self.search_budget), self.tie, self.anchors, self.restarts)

    @property
    def methods(self) -> list[str]:
        """The chosen method first, then the baselines it is compared against (structured: not those that rank single weights)."""
        baselines = [m for m in self.baselines if m != self.method and not (self.pattern == STRUCTURED and m in WEIGHT_BASELINES)]
        return [self.method] + baselines

    def command_line(self) -> str:
        """The ``spdy run`` invocation that reproduces this configuration (defaults left out)."""
        flags = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "model" or value == f.default or value is None:
                continue
            if f.name == "anchors" and not value:
                value = "none"
            elif isinstance(value, (list, tuple)):
                value = " ".join(map(str, value)) if f.name in ("include", "exclude") else ",".join(map(str, value))
            flags.append(f"--{f.name.replace('_', '-')} {value}")
        return " ".join(["spdy run", self.model, *flags])


def load_bundle(model: str, samples: int = 64, heldout: int = 32, seq_len: int = 128, batch_size: int = 8,
                include: Sequence[str] | None = None, exclude: Sequence[str] = (), validation: int = 0,
                database: int = 0, workload: str | None = None, pattern: str = "unstructured") -> tuple[ModelBundle, dict[str, Unit]]:
    """The model with its data and the units to prune; bad names or patterns raise `InputError`.
    ``workload`` (e.g. ``decode:1@512``) replaces the family's default (`spdy.models.workload`).
    ``pattern="structured"``: the units are the model's attention and feed-forward blocks (`spdy.blocks`)."""
    try:
        bundle = load_model(model, samples=samples, heldout=heldout, seq_len=seq_len, batch_size=batch_size, validation=validation,
                            database=database)
        if workload is not None:
            bundle.workload = Workload.parse(workload)
        if pattern == STRUCTURED:
            from spdy.blocks import block_units

            if bundle.workload is not None and bundle.workload.kind == "decode":
                # a block timed alone on a captured decode step would grow its KV cache on every call
                raise InputError(f"--pattern {STRUCTURED} times whole blocks on whole sequences: give {bundle.name} "
                                 f"--workload prefill:BATCHxSEQ (e.g. prefill:4x128), not {bundle.workload}")
            units = block_units(bundle.model, include, exclude or ())
        else:
            units = prunable_units(bundle, include, exclude or ())
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    bundle.check()
    return bundle, units


def check_same_model(bundle: ModelBundle, db: Database | None = None, profile: Profile | None = None, source: str = "profile") -> None:
    """Refuse a database, or a profile that recorded its model's fingerprint, made from other weights
    than ``bundle``'s (same names and shapes are not enough); profiles without one are accepted."""
    fingerprint = model_fingerprint(bundle.model)
    if db is not None:
        db.check_model(fingerprint)
    recorded = profile.meta.get("model_fingerprint") if profile is not None else None
    if recorded is not None and recorded != fingerprint:
        raise InputError(f"{source} was found for a different model: the weights differ (fingerprint {recorded!r}, this model's "
                         f"{fingerprint!r}); search a profile for this model (spdy search), or pass the model it was made for")


def profile_json(profile: Profile) -> dict:
    return {"method": profile.method, "target": profile.target, "table_target": profile.meta.get("table_target", profile.target),
            "predicted_speedup": profile.predicted_speedup,
            "calibration_loss": profile.calibration_loss, "validation_loss": profile.validation_loss, "heldout_loss": profile.heldout_loss,
            "validation": profile.meta.get("validation"), "picked": profile.meta.get("picked"), "evaluations": profile.evaluations, "profile": profile.sparsities, "options": profile.options,
            "convergence": convergence(profile)}


def convergence(profile: Profile) -> dict | None:
    """A search's best loss over evaluations and seconds (None for a method that does not search)."""
    if not profile.trace:
        return None
    return {"evaluations": [t["evaluations"] for t in profile.trace], "batch_evaluations": [t.get("batch_evaluations") for t in profile.trace],
            "seconds": [t["elapsed"] for t in profile.trace], "loss": [t["loss"] for t in profile.trace],
            "total_evaluations": profile.evaluations, "total_seconds": profile.meta.get("seconds"),
            "batches": profile.meta.get("batches"), "budget": profile.meta.get("budget"),
            "stopped_by_budget": profile.meta.get("stopped_by_budget", False)}


def run(cfg: RunConfig, say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Time, build the database, search with every method, verify each, export the chosen one, write the report.

    Every stage is cached in ``cfg.work_dir`` under a digest of its inputs: a rerun resumes.
    Returns the run's summary (also written to ``summary.json``).
    """
    with connect(cfg.cluster) as cluster:
        shrunk = shrink_first(cfg, say, progress, cluster) if cfg.shrink is not None else None
        return _run(cfg, say, progress, cluster, shrunk)


def shrink_first(cfg: RunConfig, say: Callable[[str], None], progress: bool, cluster: RayCluster | None) -> tuple[ModelBundle, dict[str, Unit]]:
    """A mixed profile's first stage: the structured run to ``cfg.shrink`` over dense torch (cached in WORK/shrink), then the
    smaller model it exported, loaded as a user would (`spdy.load`), with the original kept as the bundle's ``reference``:
    every later speedup, loss and verify is over the original, so ``--target`` means what the user compares with."""
    first = replace(cfg, pattern=STRUCTURED, shrink=None, target=cfg.shrink, targets=None, levels=None, include=None, exclude=None,
                    method=cfg.method if cfg.method not in WEIGHT_BASELINES else "spdy",
                    pruner=cfg.pruner if cfg.pruner in ("obs", "magnitude") else "obs", baselines=(),
                    work_dir=str(Path(cfg.work_dir) / "shrink"))
    _run(first, lambda text: say(f"shrink: {text}"), progress, cluster)
    bundle, units = shrunk_bundle(cfg, Path(first.work_dir))
    say(f"shrink: the smaller model measured {bundle.meta['shrink']['measured_speedup']:.3f}x over dense torch; now pruning it "
        f"with --pattern {cfg.pattern} to {cfg.target or cfg.targets or 'a curve of targets'} over the original")
    return bundle, units


def shrunk_bundle(cfg: RunConfig, shrink_dir: Path) -> tuple[ModelBundle, dict[str, Unit]]:
    """The model and data of ``cfg`` with the smaller model the structured run in ``shrink_dir`` exported as the bundle's
    model (`spdy.load`, as a user loads it), the original as its ``reference``, and the units of the smaller model."""
    from spdy.files import read_json
    from spdy.runtime.deploy import RUNTIME, load

    summary = read_json(shrink_dir / "summary.json", "structured run summary")
    export = shrink_dir / "export"
    bundle, _ = load_bundle(cfg.model, cfg.samples, cfg.heldout, cfg.seq_len, cfg.batch_size, cfg.include, cfg.exclude or (),
                            cfg.validation, cfg.database_samples, cfg.workload, "unstructured")
    original = bundle.model
    bundle.model = load(export, model=copy.deepcopy(original)).eval()
    bundle.reference = original
    chosen = summary["profiles"][summary["method"]]
    bundle.meta["shrink"] = {"work_dir": str(shrink_dir), "export": str(export), "target": cfg.shrink,
                             "measured_speedup": chosen["verify"]["measured_speedup"], "quality": chosen["quality"],
                             "structure": read_json(export / RUNTIME, "export runtime file")["structured"]}
    return bundle, prunable_units(bundle, cfg.include, cfg.exclude or ())


def over_reference(bundle: ModelBundle, table: TimingTable, table_path: Path, rounds: int = CALIBRATION_ROUNDS * 2) -> tuple[TimingTable, Path]:
    """The table of a shrunk model rebased onto its original (`TimingTable.rebased`): the two run alternately on the
    timing batch, unpruned, and the median ratio scales ``base`` (cached beside the table)."""
    from spdy.verify_structured import speedup_of

    path = table_path.with_name(table_path.stem + "-over-original.json")
    if path.is_file():
        return TimingTable.load(path), path
    ratio = speedup_of(bundle.reference, bundle.model, timing_batch(bundle), rounds, table.meta.get("threads"))
    rebased = table.rebased(ratio, f"the original {bundle.name}")
    rebased.save(path)
    return rebased, path


def _run(cfg: RunConfig, say: Callable[[str], None], progress: bool, cluster: RayCluster | None,
         loaded: tuple[ModelBundle, dict[str, Unit]] | None = None) -> dict:
    from spdy.database import Stitcher
    from spdy.report import write_report
    from spdy import verification
    from spdy.verification import VerifyResult, verify

    get_backend(timing_engine(cfg.engine, cfg.pattern))  # an engine that is not installed stops here, before minutes of loading
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = StageLog(work / "run.json")
    levels = cfg.levels

    bundle, units = loaded or timed(log, "load", lambda: load_bundle(cfg.model, cfg.samples, cfg.heldout, cfg.seq_len, cfg.batch_size,
                                                                     cfg.include, cfg.exclude or (), cfg.validation, cfg.database_samples,
                                                                     cfg.workload, cfg.pattern))
    structured = cfg.pattern == STRUCTURED
    bundle.search_on(cfg.search_loss)
    say(f"[1/6] model {bundle.name}: {len(units)} prunable units, {len(bundle.calibration)} calibration, {len(bundle.validation)} "
        f"validation, {len(bundle.database)} database and {len(bundle.heldout)} held-out batches, search loss {bundle.objective}")
    measure_table = lambda: timings(bundle, units, work, cfg.pattern, levels, cfg.engine, progress, cfg.threads)
    if timing_path(bundle, units, work, cfg.pattern, levels, cfg.engine, cfg.threads).is_file():
        table, table_path = measure_table()
    else:
        table, table_path = timed(log, "timing", measure_table)
    say(f"[2/6] timings ({cfg.engine}): dense {table.base * 1e3:.2f} ms, fixed {table.fixed * 1e3:.2f} ms; "
        f"maximum attainable speedup {table.max_speedup():.3f}x  [{table_path}]")
    if bundle.reference is not None:
        table, table_path = timed(log, "rebase", lambda: over_reference(bundle, table, table_path))
        say(f"      over the original model: the smaller one runs {table.reference_speedup:.3f}x faster unpruned; maximum attainable "
            f"speedup {table.max_speedup():.3f}x")
    if cfg.calibrate and (cfg.engine in CALIBRATED_ENGINES or structured and cfg.engine == "deepsparse") and table.max_speedup() > 1.02:
        table, table_path = timed(log, "calibration", lambda: calibrate(bundle, units, table, table_path, say, cfg.engine))
        fit = table.meta["calibration"]
        if "scale" in fit:
            say(f"      calibrated to the deployed runtime: fixed {fit['fixed_before'] * 1e3:.2f} -> {fit['fixed'] * 1e3:.2f} ms, "
                f"unit times x{fit['scale']:.3f}; largest error {fit['max_error_before']:.1%} -> {fit['max_error_after']:.1%}; "
                f"maximum attainable speedup {table.max_speedup():.3f}x")
    targets = cfg.target_list(table, bool(bundle.heldout))
    if max(targets) > table.max_speedup():
        raise InfeasibleTarget(max(targets), table.max_speedup())
    curve = len(targets) > 1
    if curve:
        say(f"      targets {', '.join(f'{t:g}x' for t in targets)}: a profile per target, measured; the fastest that keeps "
            f"held-out quality is exported")
    else:
        say(f"      target {targets[0]:g}x" + ("" if cfg.target is not None else " (no held-out data for a curve: 60% of the way to the maximum)"))
    db = timed(log, "database", lambda: database(bundle, units, work, cfg.pruner, cfg.pattern, levels, progress, cluster))
    say(f"[3/6] database ({cfg.pruner}, {cfg.pattern}): {db.directory}")
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    evaluation = evaluators(bundle, stitcher)
    dense_heldout = outputs(bundle.dense_reference, bundle.heldout)  # the reference of every target's held-out quality
    batch = timing_batch(bundle)

    def measure_profile(method: str, profile: Profile, target: float, rounds: int, full: bool = True) -> dict:
        """Verified on the workload; not ``full`` (a curve's landing rounds): over dense torch only, no timed generate."""
        key = digest(profile.options, target, str(table_path), cfg.engine, cfg.threads, rounds, full, runtime_fingerprint(),
                     Path(verification.__file__).read_text())
        path = work / f"verify-{method}-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if structured:
            from spdy.verify_structured import verify_structured

            result = timed(log, f"verify:{method}", lambda: verify_structured(bundle.model, units, profile, batch, table, db, rounds,
                                                                             engine=cfg.engine))
        else:
            result = timed(log, f"verify:{method}", lambda: verify(bundle.model, units, profile, batch, table, weights=db.weight,
                                                                  rounds=rounds, engine=cfg.engine, engine_dense=full, generation=full,
                                                                  baseline=bundle.reference))
        write_json(path, result.to_json())
        return result.to_json()

    def search(method: str, target: float, table_target: float, start: Sequence[float] | None = None,
               resolving: bool = False) -> tuple[Profile, Path]:
        settings = cfg.settings(method)
        if settings.budget is not None:
            share = 1.0
            if curve:
                share = (1 / len(targets) if method != "spdy"
                         else FIRST_SHARE if start is None else (1 - FIRST_SHARE) / (len(targets) - 1))
            settings = replace(settings, budget=settings.budget * share * (RESOLVE_SHARE if resolving else 1.0))
        path = work / f"profile-{method}-{digest(str(table_path), str(db.directory), target, vars(settings), table_target, start)}.json"
        if path.is_file():
            return Profile.load(path), path
        new = timed(log, f"{'resolve' if resolving else 'search'}:{method}",
                    lambda: find_profile(bundle, units, table, db, table_target, settings, work, progress, evaluation, start=start,
                                         cluster=cluster))
        new.target = target
        new.meta["table_target"] = table_target
        if resolving:
            new.meta["resolved"] = True  # a landing re-solve: a short search from the coefficients the first one found
        new.save(path)
        return new, path

    points: dict[float, dict[str, dict]] = {}  # target -> method -> what was found, measured and kept
    plans: dict[float, float] = {}  # target -> what the table was first asked for
    learned = None  # the SPDY coefficients found at the middle target: the other targets' searches start from them
    for target in sorted(targets, key=lambda t: t != targets[len(targets) // 2]):
        # where the calibration profiles say the runtime lands on the target (the table's line bends)
        plan = plans[target] = min(max(table.planning_target(target), MIN_TABLE_TARGET), table.max_speedup())
        if abs(plan - target) > 1e-3 * target:
            say(f"      {target:g}x: the table is asked for {plan:.3f}x (the calibration profiles put the runtime's {target:g}x there)")
        at = points[target] = {}
        for method in cfg.methods:
            found, path = search(method, target, plan, start=learned if method == "spdy" and curve else None)
            if method == "spdy" and learned is None:
                learned = found.meta.get("coefficients")
            say(f"[4/6] {target:g}x {method}: predicted {found.predicted_speedup:.3f}x, calibration loss {found.calibration_loss:.5g}"
                + (f", validation {found.validation_loss:.5g}" if found.validation_loss is not None else "")
                + (f", held-out {found.heldout_loss:.5g}" if found.heldout_loss is not None else "") + f" ({found.evaluations} evaluations)"
                + (f"; the {found.meta['baseline']} profile scored better than any the search found, so it is the pick"
                   if found.meta.get("baseline") else ""))
            learned_here = found.meta.get("coefficients") if method == "spdy" else None
            files = {id(found): path}

            def resolve(p: Profile, table_target: float, m: str = method, t: float = target, c=learned_here) -> Profile:
                new, where = search(m, t, table_target, start=c, resolving=c is not None)
                files[id(new)] = where
                return new

            kept, result, rounds = land(found, target, table.max_speedup(),
                                        lambda p, m=method, t=target: (measure_profile(m, p, t, min(CURVE_ROUNDS, cfg.rounds), full=False)
                                                                       if curve else measure_profile(m, p, t, cfg.rounds)),
                                        resolve, say=lambda text, m=method, t=target: say(f"      {t:g}x {m}: {text}"))
            at[method] = {"profile": kept, "searched": found, "verify": result, "rounds": rounds, "file": str(files[id(kept)])}
        for method, metrics in heldout_quality(bundle, stitcher, {m: v["profile"] for m, v in at.items()}, dense_heldout).items():
            at[method]["quality"] = metrics
            at[method]["quality_loss"] = quality_loss(metrics, bundle.loss)
    target, choice = choose(points, targets, cfg, bundle.loss)
    if curve:
        say(f"      chose {target:g}x: {choice['why']}")
    chosen_point = points[target][cfg.method]
    if curve:  # the exported profile is measured in full, against the engine's dense run too; the curve keeps what chose it
        chosen_point["exported_verify"] = measure_profile(cfg.method, chosen_point["profile"], target, cfg.rounds)
    main = chosen_point.get("exported_verify", chosen_point["verify"])
    profiles = {m: v["profile"] for m, v in points[target].items()}
    verified = VerifyResult(**main)
    rounds_note = f" after {len(chosen_point['rounds'])} rounds" if len(chosen_point["rounds"]) > 1 else ""
    say(f"[5/6] verified {cfg.method}: measured {verified.speedups()} (spread {main['measured_spread']:.3f}) "
        f"for predicted {profiles[cfg.method].predicted_speedup:.3f}x, target {target:g}x: {'MET' if main['met'] else 'NOT MET'}{rounds_note}")
    for note in (verified.under_prediction(), verified.over_delivery()):
        if note:
            say(f"      note: {note}")
    if "quality" in chosen_point:
        say("      held-out quality: " + ", ".join(f"{k} {v:.4g}" for k, v in chosen_point["quality"].items()))
    if not choice.get("within", True):
        say(f"      WARNING: exported {target:g}x, {choice['why']}")
    chosen = profiles[cfg.method]
    if not structured:
        apply(units, chosen, db)
    gap = None
    if cfg.gap:
        from spdy.recovery.nm import finish_with_gap

        gap_dir = work / f"gap-{digest(chosen.options, cfg.gap_epochs, cfg.gap_lr, cfg.seed)}"
        gap = timed(log, "gap", lambda: finish_with_gap(bundle, units, stitcher.dense, epochs=cfg.gap_epochs, lr=cfg.gap_lr,
                                                         seed=cfg.seed, work_dir=gap_dir, progress=progress))
        say(f"      gAP: held-out loss {gap['heldout_before_gap']:.5g} -> {gap['heldout_after_gap']:.5g}")
    export_dir = timed(log, "export", lambda: export_profile(bundle, units, chosen, db, main.get("formats", {}), work / "export"))
    if curve:
        say(f"      any other point of the curve: spdy export {work} --target T [--method M]")
    stitcher.restore()  # dense units again (with gAP the other parameters stay fine-tuned; the run ends here)
    command = cfg.command_line()
    summary = {
        "model": bundle.name, "engine": cfg.engine, "pruner": cfg.pruner, "pattern": cfg.pattern, "loss": bundle.loss,
        "shrink": bundle.meta.get("shrink"),
        "search_loss": bundle.objective, "method": cfg.method, "target": target, "targets": targets, "choice": choice,
        "planned_table_target": plans[target], "timings": str(table_path),
        "database": str(db.directory), "export": str(export_dir),
        "profiles": {m: {**profile_json(v["profile"]), "seconds": v["searched"].meta.get("seconds"), "convergence": convergence(v["searched"]),
                         "verify": v.get("exported_verify", v["verify"]), "rounds": v["rounds"], "quality": v.get("quality"), "file": v["file"]}
                     for m, v in points[target].items()},
        "curve": [curve_point(t, m, v) for t in targets for m, v in points[t].items()],
        "gap": gap, "stages": log.stages, "config": asdict(cfg),
        "commands": [f'make run ARGS="{command[len("spdy run "):]}"', command, f"spdy report {work}"],
    }
    write_json(work / "summary.json", summary)
    md, html_path = timed(log, "report", lambda: write_report(work))
    say(f"[6/6] report: {md} and {html_path}; pruned model exported to {export_dir}")
    return summary


def export_point(work_dir: str | Path, target: float, method: str | None = None, output: str | Path | None = None) -> tuple[Path, dict]:
    """Export the profile a run measured at ``target`` with ``method`` (the run's own by default) from its
    cached stages: no timing, database, search or verify runs again."""
    from spdy.database import Database
    from spdy.files import read_json

    work = Path(work_dir)
    if not (work / "summary.json").is_file():
        raise InputError(f"{work}: no summary.json; run `spdy run --work-dir {work}` first")
    summary = read_json(work / "summary.json", "run summary")
    if "curve" not in summary or "config" not in summary:
        raise InputError(f"{work / 'summary.json'} was written by an older spdy that kept no curve; rerun `spdy run --work-dir {work}`")
    method = method or summary["method"]
    points = [p for p in summary["curve"] if p["method"] == method and abs(p["target"] - target) <= 1e-6 * target]
    if not points:
        measured = sorted({p["target"] for p in summary["curve"] if p["method"] == method})
        raise InputError(f"--target {target:g} --method {method}: this run measured {method} at "
                         f"{', '.join(f'{t:g}' for t in measured) or 'no target'} (methods: {', '.join(sorted({p['method'] for p in summary['curve']}))})")
    point = points[0]
    cfg = RunConfig(**summary["config"])
    if cfg.shrink is not None:  # the profile prunes the smaller model the run's structured stage exported
        bundle, units = shrunk_bundle(cfg, work / "shrink")
    else:
        bundle, units = load_bundle(cfg.model, cfg.samples, cfg.heldout, cfg.seq_len, cfg.batch_size, cfg.include, cfg.exclude or (),
                                    pattern=cfg.pattern)
    db = Database.open(work / Path(summary["database"]).name)  # every stage lives in the work directory, wherever it moved
    check_same_model(bundle, db)
    profile = Profile.load(work / Path(point["profile_file"]).name)
    directory = Path(output) if output else work / f"export-{target:g}x-{method}"
    return export_profile(bundle, units, profile, db, point["formats"], directory), point
