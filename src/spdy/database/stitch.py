"""Assemble a profile (unit -> option key) into the model in place, and undo it bit-exactly.

Weights are copied into the existing parameter tensors, never reallocated, so optimizers,
hooks and compiled graphs that hold them stay valid. The dense weights are snapshotted
once; restoring copies the snapshot back. A :class:`Stitcher` remembers which option each
unit currently holds and copies only the units that change, which makes the search's
many successive candidate evaluations cheap.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from spdy.database.store import Database, DatabaseError
from spdy.levels import DENSE
from spdy.units import Unit, set_weight_matrix, weight_matrix


class Stitcher:
    """Applies profiles from ``db`` to ``units``; units absent from a profile are dense."""

    def __init__(self, units: Mapping[str, Unit], db: Database):
        missing = [name for name in units if name not in db.manifest["units"]]
        if missing:
            raise DatabaseError(f"{len(missing)} units are not in the database {db.directory}, e.g. {missing[:3]}; build it for these units")
        for name, unit in units.items():
            if list(unit.weight_shape) != db.manifest["units"][name]["shape"]:
                raise DatabaseError(f"unit {name!r}: model weight is {list(unit.weight_shape)} but the database has {db.manifest['units'][name]['shape']}")
        self.units, self.db = dict(units), db
        self.dense = {name: weight_matrix(unit).detach().clone() for name, unit in self.units.items()}
        self.current = {name: DENSE for name in self.units}

    def apply(self, profile: Mapping[str, str]) -> None:
        """Make the model hold ``profile``; copies only units whose option changes."""
        unknown = [name for name in profile if name not in self.units]
        if unknown:
            raise DatabaseError(f"profile names units that are not being stitched, e.g. {unknown[:3]}")
        with torch.no_grad():
            for name, unit in self.units.items():
                key = profile.get(name, DENSE)
                if key == self.current[name]:
                    continue
                set_weight_matrix(unit, self.dense[name] if key == DENSE else self.db.weight(name, key))
                self.current[name] = key

    def restore(self) -> None:
        """Put the dense weights back, bit-exactly."""
        self.apply({})

    @contextmanager
    def __call__(self, profile: Mapping[str, str]) -> Iterator[None]:
        """Hold ``profile`` inside the ``with`` block; dense again afterwards, even on error."""
        self.apply(profile)
        try:
            yield
        finally:
            self.restore()


@contextmanager
def stitch(units: Mapping[str, Unit], db: Database, profile: Mapping[str, str]) -> Iterator[Stitcher]:
    """One-off: the model holds ``profile`` inside the block and is dense again after it."""
    stitcher = Stitcher(units, db)
    stitcher.apply(profile)
    try:
        yield stitcher
    finally:
        stitcher.restore()
