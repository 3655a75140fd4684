"""The whole method as functions: model -> timings -> database -> profile -> pruned model -> verified.

This is the only module that wires the stages together (the CLI is a thin layer over it).
Each stage's result is cached in a work directory under a name derived from a hash of the
stage's inputs, so a rerun skips what is done, resumes what was interrupted (timing,
database and search checkpoint themselves), and recomputes only what a changed input
affects.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from spdy import baselines
from spdy.database import Database, Stitcher, build_database, capture
from spdy.evaluate import Evaluator
from spdy.evolution import EvoConfig, EvolutionSearch
from spdy.levels import DENSE, Option, options_for, spdy_grid
from spdy.models import ModelBundle
from spdy.profile import METHODS, Profile
from spdy.spdy_search import SpdyConfig, SpdySearch
from spdy.timing import measure
from spdy.timing.table import TimingTable
from spdy.units import Unit, find_units, set_weight_matrix, weight_matrix

def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def runtime_fingerprint() -> str:
    """A digest of the runtime's source. Measurements of the pruned model are cached under it, so
    they are taken again once the code that runs the model has changed."""
    from spdy import runtime

    return digest(*[(f.name, f.read_text()) for f in sorted(Path(runtime.__file__).parent.glob("*.py"))])


def prunable_units(bundle: ModelBundle, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> dict[str, Unit]:
    """The bundle's default units unless ``include`` says otherwise."""
    return find_units(bundle.model, include or bundle.include, exclude)


def timing_batch(bundle: ModelBundle) -> Any:
    """The batch the model is timed and verified on: the first calibration batch (deployment shape)."""
    return bundle.calibration[0]


def options_of(pattern: str, levels: Sequence[float] | None) -> list[Option]:
    return options_for(pattern, list(levels) if levels is not None else spdy_grid()[1:])


def timing_path(bundle: ModelBundle, units: Mapping[str, Unit], work: Path, pattern: str = "unstructured",
                levels: Sequence[float] | None = None, engine: str = "torch-cpu", threads: int | None = None) -> Path:
    """Where the timing table for these inputs is cached."""
    keys = [o.key for o in options_of(pattern, levels)]
    batch = timing_batch(bundle)
    shape = {k: list(v.shape) for k, v in batch.items()} if isinstance(batch, dict) else list(getattr(batch, "shape", []))
    return work / f"timings-{digest(bundle.name, sorted(units), keys, engine, shape, threads)}.json"


def timings(bundle: ModelBundle, units: Mapping[str, Unit], work: Path, pattern: str = "unstructured",
            levels: Sequence[float] | None = None, engine: str = "torch-cpu", progress: bool = True,
            threads: int | None = None) -> tuple[TimingTable, Path]:
    """Measure (or load the cached) timing table of ``units`` on ``engine`` (``threads``: default all cores)."""
    path = timing_path(bundle, units, work, pattern, levels, engine, threads)
    if path.is_file():
        return TimingTable.load(path), path
    keys = [o.key for o in options_of(pattern, levels)]
    return measure_to(path, bundle, units, keys, engine, progress, threads), path


def measure_to(path: Path, bundle: ModelBundle, units: Mapping[str, Unit], keys: Sequence[str], engine: str = "torch-cpu",
               progress: bool = True, threads: int | None = None) -> TimingTable:
    """Measure on the deployment batch, checkpointing beside ``path`` (a rerun resumes), then save to ``path``."""
    checkpoint = path.with_suffix(".checkpoint.json")
    table = measure(bundle.model, units, timing_batch(bundle), options=list(keys), backend=engine,
                    checkpoint=checkpoint, progress=progress, **({"threads": threads} if threads else {}))
    table.save(path)
    checkpoint.unlink(missing_ok=True)
    return table


def database(bundle: ModelBundle, units: Mapping[str, Unit], work: Path, pruner: str = "obs", pattern: str = "unstructured",
             levels: Sequence[float] | None = None, progress: bool = True) -> Database:
    """Build (or resume, or reuse) the pruned-weight database for ``units``."""
    options = options_of(pattern, levels)
    directory = work / f"database-{digest(bundle.fingerprint, sorted(units), pruner, [o.key for o in options])}"
    return build_database(bundle.model, dict(units), bundle.calibration, options, directory, pruner=pruner, progress=progress)


@dataclass
class SearchSettings:
    method: str = "spdy"
    seed: int = 0
    random_starts: int = 100
    tries: int = 100
    generations: int = 50
    offspring: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")


def evaluators(bundle: ModelBundle, stitcher: Stitcher) -> tuple[Evaluator, Evaluator | None]:
    """Calibration and held-out evaluators; built while the model is dense (they cache dense outputs)."""
    stitcher.restore()
    calibration = Evaluator(bundle.model, bundle.calibration, bundle.loss, stitcher.apply, bundle.calibration_labels)
    heldout = Evaluator(bundle.model, bundle.heldout, bundle.loss, stitcher.apply, bundle.heldout_labels) if bundle.heldout else None
    return calibration, heldout


def search(bundle: ModelBundle, units: Mapping[str, Unit], table: TimingTable, db: Database, target: float,
           settings: SearchSettings = SearchSettings(), work: Path | None = None, progress: bool = True,
           evaluation: tuple[Evaluator, Evaluator | None] | None = None) -> Profile:
    """Find a profile with ``settings.method`` that meets ``target`` on ``table``; loss on calibration and held-out data."""
    stitcher = Stitcher({u: units[u] for u in table.units}, db)
    calibration, heldout = evaluation or evaluators(bundle, stitcher)
    calibration.apply = stitcher.apply
    if heldout is not None:
        heldout.apply = stitcher.apply
    checkpoint = None
    if work is not None:
        checkpoint = work / f"search-{settings.method}-{digest(table.to_dict()['units'], db.manifest.get('identity', db.directory.name), target, asdict(settings))}.json"
    method = settings.method
    try:
        if method == "spdy":
            cfg = SpdyConfig(random_starts=settings.random_starts, tries=settings.tries, seed=settings.seed)
            profile = SpdySearch(table, target, calibration, cfg, checkpoint, progress, bundle.fingerprint).run()
        elif method == "evo":
            cfg = EvoConfig(generations=settings.generations, offspring=settings.offspring, seed=settings.seed)
            profile = EvolutionSearch(table, target, calibration, len(bundle.calibration), cfg, checkpoint, progress, bundle.fingerprint).run()
        else:
            started = time.perf_counter()
            profile = _baseline(method, bundle, table, target, units, db, stitcher)
            profile.calibration_loss = calibration(profile.options)
            profile.evaluations = 1
            profile.meta["seconds"] = round(time.perf_counter() - started, 2)
        if heldout is not None:
            profile.heldout_loss = heldout(profile.options)
    finally:
        stitcher.restore()
    profile.meta.update(model=bundle.name, loss=bundle.loss, database=str(db.directory), pruner=db.pruner.get("name"))
    return profile


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
    # OWL scores weights by |W_ij| * ||x_j||: the input norms come from the dense model's calibration pass
    stitcher.restore()
    stats = capture(bundle.model, {u: units[u] for u in table.units}, bundle.calibration)
    norms = {u: (s.hessian_sum.diagonal()).sqrt() for u, s in stats.items()}
    return baselines.owl(table, target, weights, norms)


def apply(units: Mapping[str, Unit], profile: Profile, db: Database | None = None) -> None:
    """Put the profile's pruned weights into the model for good (database weights, else magnitude masks)."""
    from spdy.runtime import magnitude_mask

    with torch.no_grad():
        for name, key in profile.options.items():
            if key == DENSE:
                continue
            dense = weight_matrix(units[name])
            set_weight_matrix(units[name], db.weight(name, key) if db is not None else dense * magnitude_mask(dense, key))


def default_target(table: TimingTable) -> float:
    """A target this engine reaches on this model with room to spare: 60% of the way to the maximum."""
    return round(1 + 0.6 * (table.max_speedup() - 1), 2)


class StageLog:
    """What each stage did and how long it took, kept across reruns in ``run.json``.

    ``stages`` keeps the latest record of every stage ever run here; ``last`` lists the
    stages this invocation really ran (cached ones are absent).
    """

    def __init__(self, path: Path):
        self.path = path
        previous = json.loads(path.read_text()) if path.is_file() else {}
        self.stages: dict = previous.get("stages", {})
        self.last: list[str] = []

    def record(self, stage: str, seconds: float, **info: Any) -> None:
        self.stages[stage] = {"seconds": round(seconds, 2), **info}
        self.last.append(stage)
        self.path.write_text(json.dumps({"stages": self.stages, "last": self.last}, indent=1, default=str))


def timed(log: StageLog, stage: str, fn: Callable[[], Any], **info: Any) -> Any:
    started = time.perf_counter()
    result = fn()
    log.record(stage, time.perf_counter() - started, **info)
    return result
