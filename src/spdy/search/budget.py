"""Wall-time budgets for the searches: ``--search-budget 300``, ``300s``, ``5m``, ``1h`` or ``none``.

A budget bounds how long a search runs; the time a checkpointed search already spent counts
against it, so a resumed search stops where an uninterrupted one would have. Where a budget
cuts a search depends on the machine's speed: only an unbudgeted search is deterministic per seed.
"""

from __future__ import annotations

import math
import re
import time

from spdy.errors import InputError

UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
# the default job (MiniLM, 36 units, 8 calibration batches) spends about 4 minutes outside the search on
# 2 cores; 3 minutes of search keeps the whole run under 8
DEFAULT_SEARCH_BUDGET = "3m"
VALID = "seconds or a duration such as 300, 300s, 5m, 1.5h, or 'none' for no limit"


def parse_budget(value: str | float | int | None, flag: str = "--search-budget") -> float | None:
    """Seconds of a budget, or None for no limit; anything else is an `InputError` naming ``flag``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, bool):
        raise InputError(f"{flag} {value!r}: expected {VALID}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", value.lower())
        if not match:
            raise InputError(f"{flag} {value!r}: expected {VALID}")
        seconds = float(match.group(1)) * UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{flag} {value!r}: the budget must be a positive, finite time ({VALID})")
    return seconds


class Clock:
    """Seconds a search has run, including what an earlier, interrupted run of it spent."""

    def __init__(self, budget: float | None, spent: float = 0.0):
        self.budget = budget
        self.started = time.perf_counter() - spent

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out(self) -> bool:
        """True once the budget is spent (never without one)."""
        return self.budget is not None and self.elapsed >= self.budget
