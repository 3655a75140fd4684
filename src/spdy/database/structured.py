"""The structured database: per block and option, the kept structures and the consumer's updated weight.

Structured OBS (as in ZipLM): the consumer layer's loss ``||W_p X - W X||^2`` has Hessian
``H = X X^T`` over its input columns. Removing a structure (a column group ``S``) and optimally
updating the remaining columns costs ``tr(W_S [H^-1]_SS^-1 W_S^T)`` and changes the weights by
``-W_S [H^-1]_SS^-1 [H^-1]_S:``; afterwards ``H^-1`` of the remaining columns is the Schur
complement. Structures are removed greedily, cheapest first, recomputing every cost after each
removal, so the options are nested (fewer kept is a subset of more kept). The producers' rows
need no update: the consumer no longer reads them. ``magnitude`` is the baseline: the structures
with the smallest consumer-column L2 norm go, nothing is updated.

On disk this is `spdy.database.store`'s layout (manifest, one safetensors file per unit,
resumable, checksummed); a unit file holds per option key the compact consumer weight
(out, kept * width) and ``"<key>/kept"``, the kept structures' indices.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors.torch import save_file

from spdy.blocks import Block, block_of, structure_columns
from spdy.database.build import _start, output_energy, relative_error, _samples
from spdy.database.capture import capture
from spdy.database.store import Database, DatabaseError, file_sha256, file_stamp, unit_filename, write_manifest
from spdy.errors import InputError
from spdy.files import remove_temporaries, replace_atomically
from spdy.levels import DENSE, STRUCTURED
from spdy.models.bundle import model_fingerprint
from spdy.models.data import fingerprint_batches
from spdy.progress import progress_bar
from spdy.units import Unit, weight_matrix

PRUNERS = ("obs", "magnitude")
KEPT = "/kept"


class StructuredDatabase(Database):
    """Reads a structured database; `weight` is the full-size consumer weight (removed columns zero), so
    `spdy.database.Stitcher` assembles profiles into the model as it does unstructured ones."""

    def kept(self, unit: str, key: str) -> torch.Tensor:
        """Indices of the structures option ``key`` keeps, ascending."""
        self.options_check(unit, key)
        return self._file(unit).get_tensor(key + KEPT)

    def compact(self, unit: str, key: str) -> torch.Tensor:
        """The consumer weight with only the kept structures' columns: what the smaller model holds."""
        self.options_check(unit, key)
        return self._file(unit).get_tensor(key)

    def options_check(self, unit: str, key: str) -> None:
        if key not in self._entry(unit)["relative_error"]:
            raise DatabaseError(f"unit {unit!r} has no option {key!r}; it has {self.options(unit)}")

    def weight(self, unit: str, key: str) -> torch.Tensor:
        compact, kept = self.compact(unit, key), self.kept(unit, key)
        width = self._entry(unit)["block"]["width"]
        out, columns = self._entry(unit)["shape"]
        full = torch.zeros(out, columns, dtype=compact.dtype)
        full[:, structure_columns(kept, width)] = compact
        return full


def _spd_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of (a batch of) symmetric positive definite blocks of ``H^-1`` by Cholesky: no LU, whose batched
    CPU path once failed on SmolLM2's 192-column key/value groups ("pivots given to lu_solve") where a rerun did not."""
    return torch.cholesky_inverse(torch.linalg.cholesky(blocks))


def removal_order(W: torch.Tensor, H: torch.Tensor, width: int, pruner: str = "obs", damp: float = 0.01,
                  stops: Sequence[int] = ()) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Remove structures of ``width`` columns of ``W`` (out, in) one by one, cheapest first; yield
    (kept count, kept structure indices, full-size weight) whenever the kept count is in ``stops``."""
    count = W.shape[1] // width
    W = W.double().clone()
    active = torch.ones(count, dtype=torch.bool)
    stops = set(stops)
    if count in stops:
        yield count, torch.arange(count), W.float().clone()
    if pruner == "magnitude":
        norms = W.reshape(W.shape[0], count, width).square().sum(dim=(0, 2))
        for k, s in enumerate(norms.argsort().tolist(), start=1):
            active[s] = False
            W[:, s * width:(s + 1) * width] = 0.0
            if count - k in stops:
                yield count - k, active.nonzero().flatten(), W.float().clone()
        return
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    for k in range(1, count + 1):
        idx = active.nonzero().flatten()
        if width == 1:
            cost = W[:, idx].square().sum(0) / Hinv.diagonal()[idx]
        else:
            cols = structure_columns(idx, width).reshape(-1, width)  # (structures, width)
            blocks = Hinv[cols[:, :, None], cols[:, None, :]]  # (structures, width, width)
            ws = W[:, cols].permute(1, 0, 2)  # (structures, out, width)
            cost = (ws @ _spd_inverse(blocks) * ws).sum(dim=(1, 2))
        s = int(idx[int(cost.argmin())])
        cols = torch.arange(s * width, (s + 1) * width)
        inverse = _spd_inverse(Hinv[cols][:, cols])  # [H^-1]_SS^-1
        W -= W[:, cols] @ inverse @ Hinv[cols]
        Hinv -= Hinv[:, cols] @ inverse @ Hinv[cols]
        W[:, cols] = 0.0
        Hinv[cols, :] = 0.0
        Hinv[:, cols] = 0.0
        Hinv[cols, cols] = 1.0  # removed: keeps later inverses finite, never read again
        active[s] = False
        if count - k in stops:
            yield count - k, active.nonzero().flatten(), W.float().clone()


def _build_unit(directory: Path, name: str, kind: str, block: Block, W: torch.Tensor, H: torch.Tensor, pruner: str, damp: float) -> dict:
    started = time.perf_counter()
    options = {block.kept(o.key): o.key for o in block.options()[1:]}
    energy = output_energy(W, H)
    tensors = {DENSE: W.contiguous(), DENSE + KEPT: torch.arange(block.count)}
    errors = {DENSE: 0.0}
    for kept, structures, pruned in removal_order(W, H, block.width, pruner, damp, stops=list(options)):
        key = options[kept]
        tensors[key] = pruned[:, structure_columns(structures, block.width)].contiguous()
        tensors[key + KEPT] = structures.contiguous()
        errors[key] = relative_error(W, pruned, H, energy)
    filename = unit_filename(name)
    path = directory / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"unit": name}))
    errors = dict(sorted(errors.items(), key=lambda item: float(item[0].rpartition("@")[2])))
    return {"kind": kind, "shape": list(W.shape), "block": block.describe(), "file": filename, "sha256": file_sha256(path),
            **file_stamp(path), "seconds": round(time.perf_counter() - started, 3), "relative_error": errors}


def build_structured_database(model: torch.nn.Module, units: Mapping[str, Unit], calibration: Sequence, out_dir: str | os.PathLike,
                              pruner: str = "obs", damp: float = 0.01, progress: bool = True) -> StructuredDatabase:
    """Every block unit (`spdy.blocks.block_units`) at every option from the dense model's calibration inputs;
    resumes ``out_dir`` when it was built the same way, recomputes missing or corrupt unit files."""
    if pruner not in PRUNERS:
        raise InputError(f"structured pruner {pruner!r}: use one of {', '.join(PRUNERS)}")
    if not damp > 0:
        raise InputError(f"structured obs needs damp > 0, got {damp}")
    blocks = {name: block_of(unit) for name, unit in units.items()}
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    remove_temporaries(directory)
    identity = {"model": model_fingerprint(model), "pruner": {"name": pruner, "params": {"damp": damp} if pruner == "obs" else {}},
                "pattern": STRUCTURED, "options": {n: [o.key for o in b.options()] for n, b in blocks.items()},
                "calibration": {"fingerprint": fingerprint_batches(list(calibration)), "samples": _samples(calibration),
                                "batches": len(calibration)}}
    with torch.no_grad():
        manifest = _start(directory, identity)
        for bad in StructuredDatabase(directory, manifest).check():
            del manifest["units"][bad]
        write_manifest(directory, manifest)
        todo = {n: u for n, u in units.items() if n not in manifest["units"]}
        if todo:
            stats = capture(model, dict(todo), calibration, progress=progress)
            for name, unit in progress_bar(todo.items(), desc=f"structured {pruner} database", unit="block", disable=not progress):
                entry = _build_unit(directory, name, unit.kind, blocks[name], weight_matrix(unit).detach().float(), stats.pop(name).hessian, pruner, damp)
                manifest["units"][name] = entry
                manifest["units"] = {n: manifest["units"][n] for n in units if n in manifest["units"]}
                write_manifest(directory, manifest)
    return StructuredDatabase.open(directory)


__all__ = ["StructuredDatabase", "build_structured_database", "removal_order"]
