"""The database on disk: ``manifest.json`` plus one safetensors file per unit.

Each unit file holds every option of the unit (dense included) as an (out, in) matrix
named by its option key. Files are read lazily through ``safetensors.safe_open``
(memory-mapped), so memory stays bounded by what is asked for. The manifest records what
built the database (model, pruner, pattern, options, calibration), and per unit its
file, sha256, relative output errors, and the size and mtime the file had when its
checksum was last verified. A unit file is checked on its first read: missing or of
another size fails loudly with its unit's name; it is re-hashed only when its mtime
differs from the verified one or is not older than the manifest (a change within the
file system's timestamp granularity would otherwise go unseen), so resuming or opening
a large database does not read every file twice.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from spdy.levels import Option
from spdy.errors import InputError
from spdy.files import read_json, write_json

FORMAT = "spdy.database/1"
MANIFEST = "manifest.json"


class DatabaseError(InputError):
    """A database directory that is missing, corrupt or does not fit the request."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_stamp(path: Path) -> dict[str, int]:
    """What a file looked like when its checksum was verified: a different stamp means re-hash."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def unit_filename(unit: str) -> str:
    """A safe, unique file name for a unit: its name, plus a hash if characters were replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", unit)
    if safe != unit or not safe.strip("."):
        safe = f"{safe}-{hashlib.sha1(unit.encode()).hexdigest()[:8]}"
    return f"units/{safe}.safetensors"


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace the manifest atomically: a crash leaves the old one or the new one."""
    write_json(directory / MANIFEST, manifest)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise DatabaseError(f"{directory} is not a database: {MANIFEST} is missing (build one with `spdy database`)")
    try:
        manifest = read_json(path, "database manifest")
    except ValueError as e:
        raise DatabaseError(str(e)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatabaseError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} is not {FORMAT!r}")
    return manifest


class Database:
    """Read side of a database directory."""

    def __init__(self, directory: str | os.PathLike, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self._files: dict[str, Any] = {}
        manifest_path = self.directory / MANIFEST
        # Stamps are trusted only for files older than the manifest that recorded them.
        self._manifest_ns = manifest_path.stat().st_mtime_ns if manifest_path.is_file() else 0
        self._verified: dict[str, dict[str, int]] = {}  # unit -> stamp hashed by this object

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Database":
        """The database in ``directory``; a structured one (`spdy.database.structured`) reads as its own class."""
        manifest = read_manifest(Path(directory))
        if cls is Database and manifest.get("pattern") == "structured":
            from spdy.database.structured import StructuredDatabase

            return StructuredDatabase(directory, manifest)
        return cls(directory, manifest)

    def check_model(self, fingerprint: str) -> None:
        """Refuse a database built from other weights (``model_fingerprint``): layer names and shapes
        can agree while every pruned weight belongs to another model."""
        built = self.manifest.get("model")
        if built != fingerprint:
            raise DatabaseError(
                f"{self.directory} holds a database built from a different model: the weights differ (fingerprint "
                f"{built!r}, this model's {fingerprint!r}), even where layer names and shapes agree; build a database "
                f"for this model (spdy database MODEL -o NEW_DIR), or delete this one to rebuild it here")

    @property
    def units(self) -> list[str]:
        """Units whose file is complete, in build order."""
        return list(self.manifest["units"])

    @property
    def pattern(self) -> str:
        return self.manifest["pattern"]

    @property
    def pruner(self) -> dict:
        return self.manifest["pruner"]

    def _entry(self, unit: str) -> dict:
        try:
            return self.manifest["units"][unit]
        except KeyError:
            raise DatabaseError(f"unit {unit!r} is not in the database {self.directory} (it has {len(self.units)} units, e.g. {self.units[:3]})") from None

    def options(self, unit: str) -> list[str]:
        """Option keys of a unit, dense first, by increasing sparsity."""
        return list(self._entry(unit)["relative_error"])

    def path(self, unit: str) -> Path:
        return self.directory / self._entry(unit)["file"]

    def problem(self, unit: str) -> str | None:
        """Why a unit's file cannot be used, or None when it is intact (its verified stamp is
        updated in the manifest held in memory; `build_database` writes it)."""
        entry, path = self._entry(unit), self.path(unit)
        if not path.is_file():
            return f"unit {unit!r}: file {path} is missing"
        stamp = file_stamp(path)
        if "size" in entry and stamp["size"] != entry["size"]:
            return f"unit {unit!r}: file {path} is corrupt ({stamp['size']} bytes, the manifest says {entry['size']}: truncated or overwritten)"
        if self._verified.get(unit) == stamp or (stamp["mtime_ns"] == entry.get("mtime_ns") and stamp["mtime_ns"] < self._manifest_ns):
            return None
        if file_sha256(path) != entry["sha256"]:
            return f"unit {unit!r}: file {path} is corrupt (sha256 differs from the manifest)"
        entry.update(stamp)
        self._verified[unit] = stamp
        return None

    def check(self) -> dict[str, str]:
        """Every unit with a missing or corrupt file, and why; empty when all are intact."""
        return {unit: p for unit in self.units if (p := self.problem(unit))}

    def _file(self, unit: str) -> Any:
        if unit not in self._files:
            if p := self.problem(unit):
                raise DatabaseError(f"{p}; run the build again on {self.directory} to recompute the bad units")
            self._files[unit] = safe_open(str(self.path(unit)), framework="pt")
        return self._files[unit]

    def weight(self, unit: str, key: str) -> torch.Tensor:
        """The (out, in) weight of ``unit`` at option ``key`` (checksum verified on first read)."""
        f = self._file(unit)
        if key not in self._entry(unit)["relative_error"]:
            raise DatabaseError(f"unit {unit!r} has no option {key!r}; it has {self.options(unit)[:4]}...{self.options(unit)[-1:]}")
        return f.get_tensor(key)

    def relative_errors(self) -> dict[str, dict[str, float]]:
        """``||W_p X - W X|| / ||W X||`` per unit and option, on the calibration inputs."""
        return {unit: dict(entry["relative_error"]) for unit, entry in self.manifest["units"].items()}

    def summary(self) -> dict:
        """The ``--json`` contract: entry count and mean relative error per sparsity."""
        by_level: dict[str, list[float]] = {}
        for errors in self.relative_errors().values():
            for key, value in errors.items():
                by_level.setdefault(f"{Option.parse(key).sparsity:.4f}", []).append(value)
        return {
            "entries": sum(len(v) for v in by_level.values()),
            "relative_error": {level: sum(v) / len(v) for level, v in sorted(by_level.items())},
        }
