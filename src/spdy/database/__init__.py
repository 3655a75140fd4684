"""The layer-wise pruned-weight database: every unit pruned to every option, stitched on demand.

Build with :func:`build_database`, read with :meth:`Database.open`, assemble a profile
into the model with :func:`stitch` or a reusable :class:`Stitcher`.
"""

from spdy.database.adaprune import AdaPrune
from spdy.database.build import PRUNERS, build_database, make_pruner, model_fingerprint, relative_error
from spdy.database.capture import UnitStats, capture
from spdy.database.obs import OBS
from spdy.database.patterns import Pattern
from spdy.database.pruners import Magnitude, Pruner
from spdy.database.stitch import Stitcher, stitch
from spdy.database.store import Database, DatabaseError
from spdy.database.structured import StructuredDatabase, build_structured_database

__all__ = [
    "AdaPrune", "Database", "DatabaseError", "Magnitude", "OBS", "PRUNERS", "Pattern", "Pruner",
    "Stitcher", "StructuredDatabase", "UnitStats", "build_database", "build_structured_database", "capture", "make_pruner", "model_fingerprint",
    "relative_error", "stitch",
]
