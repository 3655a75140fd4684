"""Importer for the SPDY authors' text timing format.

Layout: a line ``base`` then the dense model time; a line ``prunable`` then the sum of
the dense times of all layers; then per layer its name followed by lines
``<seconds> <sparsity>``. The file's ``prunable`` figure is kept only as metadata: we
recompute ``fixed = base - sum of the solver units' dense times`` (see SPDY.md, section 2).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from typing import Iterable

from spdy.levels import DENSE, level_key
from spdy.timing.table import TimingFormatError, TimingTable


class TimingFormatWarning(UserWarning):
    """A reference table with a repeated or missing level: imported, with what was kept said."""


def _number(token: str, path, lineno: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise TimingFormatError(path, f"line {lineno}", f"expected {what}, got {token!r}") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise TimingFormatError(path, f"line {lineno}", f"expected {what} (finite, >= 0), got {token!r}")
    return value


def parse_reference(text: str, path: str | os.PathLike | None = None, exclude: Iterable[str] = ()) -> TimingTable:
    """The table in ``text``; a unit listing a level twice or lacking one is kept with a
    `TimingFormatWarning` (the authors' own tables do both), a file ending mid-unit is refused."""
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    header = {}
    for expected, pos in (("base", 0), ("prunable", 2)):
        if len(lines) <= pos + 1:
            raise TimingFormatError(path, "end of file", f"truncated: expected a line {expected!r} followed by a time")
        lineno, word = lines[pos]
        if word != expected:
            raise TimingFormatError(path, f"line {lineno}", f"expected {expected!r}, got {word!r}")
        header[expected] = _number(lines[pos + 1][1], path, lines[pos + 1][0], f"the {expected} time in seconds")

    times: dict[str, dict[str, float]] = {}
    level_line: dict[str, dict[str, int]] = {}  # unit -> level -> the line it was read from
    unit_line: dict[str, int] = {}
    line_count: dict[str, int] = {}
    notes: list[str] = []
    unit = None
    for lineno, line in lines[4:]:
        parts = line.split()
        if len(parts) == 1 and not _is_number(parts[0]):
            unit = parts[0]
            if unit in times:
                raise TimingFormatError(path, f"line {lineno}", f"unit {unit!r} appears twice (first at line {unit_line[unit]})")
            times[unit], level_line[unit], unit_line[unit], line_count[unit] = {}, {}, lineno, 0
            continue
        if unit is None:
            raise TimingFormatError(path, f"line {lineno}", f"expected a layer name after the header, got {line!r}")
        if len(parts) != 2:
            raise TimingFormatError(path, f"line {lineno}", f"expected '<seconds> <sparsity>' for unit {unit!r}, got {line!r}")
        seconds = _number(parts[0], path, lineno, "a time in seconds")
        sparsity = _number(parts[1], path, lineno, "a sparsity in [0, 1)")
        if sparsity >= 1:
            raise TimingFormatError(path, f"line {lineno}", f"expected a sparsity in [0, 1), got {parts[1]!r}")
        key = level_key(sparsity)
        line_count[unit] += 1
        if key in times[unit]:
            # The authors' yolov5 tables list a unit's 0% level twice; the first is its measurement in sequence.
            first = level_line[unit][key]
            notes.append(f"unit {unit!r} lists sparsity {key} twice (lines {first} and {lineno}): kept the first ({times[unit][key]} s, line {first})")
            continue
        times[unit][key], level_line[unit][key] = seconds, lineno

    # Some reference files end with a bare list of the pruned parameters ("<unit>.weight").
    listed = [u for u in times if not times[u]]
    if listed and all(u.endswith(".weight") and times.get(u[: -len(".weight")]) for u in listed):
        for u in listed:
            del times[u]
    if not times:
        raise TimingFormatError(path, "end of file", "truncated: no layers after the header")
    for u, options in times.items():
        if not options:
            raise TimingFormatError(path, f"line {unit_line[u]}", f"unit {u!r} has no '<seconds> <sparsity>' lines: the file looks truncated")
        if DENSE not in options:
            raise TimingFormatError(path, f"line {unit_line[u]}", f"unit {u!r} has no dense (0.0000) time")
    # A file that ends mid-unit: its last unit has fewer lines than units usually have.
    frequency = Counter(line_count[u] for u in times)
    usual = max(n for n, f in frequency.items() if f == max(frequency.values()))
    last = list(times)[-1]
    if line_count[last] < usual:
        end = max(level_line[last].values())
        raise TimingFormatError(path, f"line {unit_line[last]}", f"unit {last!r} ends at line {end} after {line_count[last]} of the "
                                f"{usual} '<seconds> <sparsity>' lines other units have: the file looks truncated")
    grid = set().union(*(o.keys() for o in times.values()))
    for u, options in times.items():
        if lacking := sorted(grid - options.keys()):
            notes.append(f"unit {u!r} (line {unit_line[u]}) has no time for sparsity {', '.join(lacking)}: "
                         f"kept its {len(options)} levels, so the solver has fewer options for it")
    for note in notes:
        warnings.warn(f"{path}: {note}", TimingFormatWarning, stacklevel=2)

    base = header["base"]
    fixed = base - sum(o[DENSE] for o in times.values())
    if fixed < 0:
        raise TimingFormatError(path, "line 2", f"base {base} is smaller than the sum of the layers' dense times ({base - fixed}); the table is inconsistent")
    meta = {"engine": "reference", "source": str(path) if path else None, "prunable_reported": header["prunable"]}
    table = TimingTable(times, base, fixed, meta)
    return table.exclude(exclude) if exclude else table


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False
