"""spdy: prune neural networks to a target speedup measured on a real inference engine.

The stages, in the order data flows (heavy modules load on first use):

    measure -> build_database -> search (or solve) -> apply / convert -> verify
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "measure": "spdy.timing",
    "TimingTable": "spdy.timing.table",
    "build_database": "spdy.database",
    "Database": "spdy.database",
    "solve": "spdy.search.dp",
    "InfeasibleTarget": "spdy.search.dp",
    "find_profile": "spdy.pipeline",
    "apply": "spdy.pipeline",
    "prunable_units": "spdy.pipeline",
    "SearchSettings": "spdy.pipeline",
    "verify": "spdy.verification",
    "convert": "spdy.runtime",
    "load": "spdy.runtime.deploy",
    "export": "spdy.runtime.deploy",
    "Profile": "spdy.search.profile",
    "Option": "spdy.levels",
    "options_for": "spdy.levels",
    "spdy_grid": "spdy.levels",
    "load_model": "spdy.models",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'spdy' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
