"""Build (or resume, or repair) a database: capture once, prune unit by unit, write as we go.

Each finished unit is written to its own file and then recorded in the manifest
atomically, so a killed build loses at most the unit in progress. Building into an
existing directory resumes it: units recorded with an intact file are kept, missing or
corrupt ones are recomputed. A directory built from a different model, pruner, pattern,
option set or calibration data is refused rather than mixed.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from contextlib import closing
from functools import partial
from typing import Callable, Generator, Iterable, Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from spdy.models.data import fingerprint_batches
from spdy.models.bundle import model_fingerprint  # the database depends on every weight, since a unit's inputs do
from spdy.database.adaprune import AdaPrune
from spdy.database.capture import UnitStats, capture
from spdy.database.obs import OBS
from spdy.database.pruners import Magnitude, Pruner, single_pattern
from spdy.database.store import FORMAT, MANIFEST, Database, DatabaseError, file_sha256, file_stamp, read_manifest, unit_filename, write_manifest
from spdy.errors import InputError
from spdy.files import remove_temporaries, replace_atomically
from spdy.progress import progress_bar
from spdy.levels import Option
from spdy.units import Unit, weight_matrix

PRUNERS: dict[str, type[Pruner]] = {"obs": OBS, "adaprune": AdaPrune, "magnitude": Magnitude}


def make_pruner(name: str, **params) -> Pruner:
    """A pruner by name with its hyperparameters; unknown names or parameters are clear errors."""
    if name not in PRUNERS:
        raise InputError(f"unknown pruner {name!r}: use one of {', '.join(PRUNERS)}")
    cls = PRUNERS[name]
    known = [f for f in cls.__dataclass_fields__]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"pruner {name!r} has no parameter {unknown[0]!r}; its parameters are {', '.join(known) or 'none'}")
    return cls(**params)


def output_energy(dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||W X||^2 / n`` from ``H = X X^T / n``: tr(W H W^T), the denominator of `relative_error`."""
    w = dense.double()
    return float(((w @ hessian) * w).sum())


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, energy: float | None = None) -> float:
    """``||W_p X - W X|| / ||W X||`` from ``H = X X^T / n``: sqrt(tr(D H D^T) / tr(W H W^T)).

    ``energy``: `output_energy` of ``dense``, when the caller scores many levels of one weight."""
    d = pruned.double() - dense.double()
    num = float(((d @ hessian) * d).sum())
    den = output_energy(dense, hessian) if energy is None else energy
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _samples(calibration: Sequence) -> int:
    """Sequences (or images) in the calibration batches: the leading size of each batch."""
    total = 0
    for batch in calibration:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        total += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
    return total


def _identity(model: torch.nn.Module, calibration: Sequence, pruner: Pruner, options: list[Option]) -> dict:
    return {
        "model": model_fingerprint(model),
        "pruner": {"name": pruner.name, "params": pruner.params()},
        "pattern": single_pattern(options).name,
        "options": [o.key for o in options],
        "calibration": {"fingerprint": fingerprint_batches(list(calibration)), "samples": _samples(calibration), "batches": len(calibration)},
    }


def _start(directory: Path, identity: dict) -> dict:
    """The existing manifest if it was built the same way, else a fresh one."""
    if not (directory / MANIFEST).exists():
        return {"format": FORMAT, **identity, "units": {}}
    manifest = read_manifest(directory)
    Database(directory, manifest).check_model(identity["model"])
    for field, value in identity.items():
        if manifest.get(field) != value:
            raise DatabaseError(
                f"{directory} holds a database built with a different {field} "
                f"({manifest.get(field)!r}, now {value!r}); use a new directory, or delete this one to rebuild"
            )
    return manifest


def _build_unit(directory: Path, name: str, kind: str, original: torch.Tensor, stats: UnitStats, pruner: Pruner,
                options: list[Option], tick: Callable[[], object] = lambda: None) -> tuple[str, dict]:
    """Prune one unit to every option, write its file atomically, return (name, its manifest entry).

    Takes the unit's weight rather than its module, so it runs wherever the weight and statistics are
    sent (an ``executor``'s worker); ``tick`` follows it level by level."""
    started = time.perf_counter()
    hessian = stats.hessian
    energy = output_energy(original, hessian)
    tensors, errors = {}, {}
    for option, pruned in pruner.levels(original, stats, options, name):
        tensors[option.key] = original.clone().contiguous() if option.is_dense else pruned.to(original.dtype).contiguous()
        errors[option.key] = 0.0 if option.is_dense else relative_error(original, pruned, hessian, energy)
        tick()
    filename = unit_filename(name)
    path = directory / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"unit": name}))
    return name, {
        "kind": kind,
        "shape": list(original.shape),
        "file": filename,
        "sha256": file_sha256(path),
        **file_stamp(path),
        "rows": stats.count,
        "seconds": round(time.perf_counter() - started, 3),
        "relative_error": errors,
    }


def reconstruction_cost(shape: Sequence[int]) -> int:
    """How long a unit's reconstruction takes, up to a constant: OBS is ``rows x columns^2`` (a Hessian of
    ``columns`` squared, row by row). Orders a parallel build: the longest task started last bounds its wall time."""
    rows, columns = shape[0], math.prod(shape[1:])
    return rows * columns * columns


# runs ``fn(*job)`` for every job, yielding each result as it finishes, in any order; a KeyboardInterrupt thrown in makes it
# yield what is still running as it finishes, then raise; closed early, it returns only once no job is running, so none
# writes after the build has stopped (e.g. `spdy.cluster.RayCluster.map_unordered`)
Executor = Callable[[Callable[..., tuple[str, dict]], Iterable[tuple]], Generator[tuple[str, dict], None, None]]


def _finishing(finished: Generator[tuple[str, dict], None, None]) -> Generator[tuple[str, dict], None, None]:
    """What ``finished`` still yields once told of an interrupt (an `Executor` yields its running jobs' results);
    nothing when it is done already (the interrupt arose inside it) or runs nothing in the background."""
    try:
        item = finished.throw(KeyboardInterrupt())
        while True:
            yield item
            item = next(finished)
    except (KeyboardInterrupt, StopIteration):
        return


def build_database(
    model: torch.nn.Module,
    units: dict[str, Unit],
    calibration: Sequence,
    options: Sequence[Option],
    out_dir: str | os.PathLike,
    pruner: str = "obs",
    *,
    progress: bool = True,
    on_unit: Callable[[str], None] | None = None,
    executor: Executor | None = None,
    **pruner_params,
) -> Database:
    """Prune every unit of ``units`` to every option from the dense model's calibration inputs.

    ``options`` must share one pattern; dense is always stored. ``on_unit(name)`` runs after
    each unit is committed (progress reporting, tests). ``executor`` runs the units' reconstructions
    (one job per unit, longest first, e.g. on a Ray cluster whose workers see ``out_dir``); without one they run here,
    one after another. Either way the files are the same, and the manifest is written here as each
    unit finishes. Resumes ``out_dir`` when it holds a
    database built the same way; recomputes units whose file is missing or corrupt.
    """
    algorithm = make_pruner(pruner, **pruner_params)
    options = sorted(set(options) | {Option(0.0)})
    pattern = single_pattern(options)
    for name, unit in units.items():
        pattern.check(unit.weight_shape, name)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    remove_temporaries(directory)  # a killed build's half-written files
    with torch.no_grad():
        manifest = _start(directory, _identity(model, calibration, algorithm, options))
        existing = Database(directory, manifest)
        for bad in existing.check():  # re-hashes only files changed since they were verified
            del manifest["units"][bad]
        write_manifest(directory, manifest)  # with the stamps check() verified
        todo = {name: unit for name, unit in units.items() if name not in manifest["units"]}
        if executor is not None:  # parallel workers: the longest reconstructions first, so none is left to run alone at the end
            todo = dict(sorted(todo.items(), key=lambda item: -reconstruction_cost(item[1].weight_shape)))
        if todo:
            stats = capture(model, todo, calibration, rows=algorithm.rows, progress=progress)
            with progress_bar(total=len(todo) * len(options), desc=f"{algorithm.name} database", unit="level", disable=not progress) as bar:
                # a generator, so each unit's statistics are released as its job starts
                jobs = ((name, unit.kind, weight_matrix(unit).detach(), stats.pop(name)) for name, unit in todo.items())
                build = partial(_build_unit, directory, pruner=algorithm, options=options)
                if executor is None:
                    finished = (build(*job, tick=lambda: bar.update(1)) for job in jobs)
                else:
                    finished = executor(build, jobs)
                rank = {name: i for i, name in enumerate(units)}

                def record(name: str, entry: dict) -> None:
                    manifest["units"][name] = entry
                    if executor is not None:  # finished in any order: recorded in the order a local build has
                        manifest["units"] = dict(sorted(manifest["units"].items(), key=lambda item: rank.get(item[0], -1)))
                        bar.update(len(options))
                    write_manifest(directory, manifest)

                with closing(finished):
                    try:
                        for name, entry in finished:
                            record(name, entry)
                            if on_unit is not None:
                                on_unit(name)
                    except KeyboardInterrupt:  # the units an executor still has running are kept as they finish
                        for name, entry in _finishing(finished):
                            record(name, entry)
                        raise
    return Database.open(directory)
