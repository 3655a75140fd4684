"""`TimingTable`: how long each prunable unit takes at each option on one engine.

The predicted time of a profile (unit -> option) is ``fixed + sum of the chosen unit
times``; ``fixed`` is the time of everything the solver does not choose for, so it must
include the dense time of units left out of the solver (the reference code's files forgot
this, which made its "2x" ResNet18 profile 1.6x in reality).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from spdy.levels import DENSE, Option
from spdy.errors import InputError
from spdy.files import write_json

FORMAT = "spdy.timings/1"


class TimingFormatError(InputError):
    """A timing file is malformed; the message names the file, the place and what was expected."""

    def __init__(self, path: str | os.PathLike | None, where: str, message: str):
        self.path, self.where = path, where
        prefix = f"{path}" if path else "<timing table>"
        super().__init__(f"{prefix}: {where}: {message}" if where else f"{prefix}: {message}")


def _check_time(value: object, path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TimingFormatError(path, where, f"expected a time in seconds (a number), got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise TimingFormatError(path, where, f"expected a finite time >= 0 seconds, got {value!r}")
    return value


def check_target(target: float, flag: str = "target") -> float:
    """A speedup target: a finite number above 1 (1 is the dense model itself; below 1, a slowdown)."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not (target > 1 and math.isfinite(target)):
        raise InputError(f"{flag} {target!r}: a target speedup must be greater than 1 (a finite number, e.g. 1.5)")
    return float(target)


@dataclass
class TimingTable:
    """Per-unit, per-option times in seconds, with the dense model time and the fixed rest.

    ``times[unit][option_key]``; every unit must offer the dense option ``"0.0000"``.
    ``meta`` records how the times were measured (engine, CPU, threads, versions, date);
    ``shapes[unit]`` the unit's weight and input shapes where known.

    ``dense_blocks[name] = {"units": [...], "time": seconds}``: units the runtime fuses into one
    block once they are all in the kernel format (their times are measured so), which it leaves
    to torch when they are all at the dense option, in ``time`` instead of the sum of their dense
    options. Recorded only where that is faster (e.g. where the CPU's BLAS beats the kernel on a
    dense matrix), so a profile may keep whole blocks dense and unfused.
    """

    times: dict[str, dict[str, float]]
    base: float
    fixed: float
    meta: dict = field(default_factory=dict)
    shapes: dict[str, dict] = field(default_factory=dict)
    dense_blocks: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sorted: dict[str, list[str]] = {}
        self.validate()

    # -- construction -----------------------------------------------------------------
    def validate(self, path: str | os.PathLike | None = None) -> None:
        self.base = _check_time(self.base, path, "base")
        self.fixed = _check_time(self.fixed, path, "fixed")
        if self.base <= 0:
            raise TimingFormatError(path, "base", "the dense model time must be > 0")
        if not self.times:
            raise TimingFormatError(path, "units", "the table has no units")
        for unit, options in self.times.items():
            if DENSE not in options:
                raise TimingFormatError(path, f"unit {unit!r}", f"missing the dense option {DENSE!r}; options found: {sorted(options)}")
            for key, t in list(options.items()):
                try:
                    Option.parse(key)
                except ValueError as e:
                    raise TimingFormatError(path, f"unit {unit!r}", str(e)) from None
                options[key] = _check_time(t, path, f"unit {unit!r} option {key!r}")
        for unit in self.shapes:
            if unit not in self.times:
                raise TimingFormatError(path, "shapes", f"unknown unit {unit!r}; units are {self.units[:5]}...")
        seen: set[str] = set()
        for name, block in self.dense_blocks.items():
            where = f"dense_blocks {name!r}"
            if not isinstance(block, dict) or not isinstance(block.get("units"), list) or not block["units"]:
                raise TimingFormatError(path, where, "expected {'units': [unit, ...], 'time': seconds}")
            unknown = [u for u in block["units"] if u not in self.times]
            if unknown:
                raise TimingFormatError(path, where, f"unknown units {unknown[:3]}; units are {self.units[:3]}...")
            if seen & set(block["units"]):
                raise TimingFormatError(path, where, f"units {sorted(seen & set(block['units']))[:3]} are in another block too")
            seen |= set(block["units"])
            block["time"] = _check_time(block.get("time"), path, f"{where} time")

    @property
    def units(self) -> list[str]:
        return list(self.times)

    def options(self, unit: str) -> list[str]:
        """The unit's option keys, dense first, then by pattern and sparsity."""
        options = self._unit(unit)
        cached = self._sorted.get(unit)
        if cached is None or len(cached) != len(options):
            cached = self._sorted[unit] = sorted(options, key=Option.parse)
        return list(cached)

    def _unit(self, unit: str) -> dict[str, float]:
        try:
            return self.times[unit]
        except KeyError:
            raise InputError(f"unknown unit {unit!r}; the table has {len(self.times)} units, e.g. {self.units[:3]}") from None

    # -- predictions ------------------------------------------------------------------
    def dense_time(self, unit: str) -> float:
        return self._unit(unit)[DENSE]

    def unpruned_time(self, unit: str) -> float:
        """The unit's time in the unpruned model (torch dense), which ``base`` holds; the dense option
        may run faster (e.g. in the kernel format). Tables that did not record it: the dense option's."""
        scale = (self.meta.get("calibration") or {}).get("scale", 1.0)
        recorded = (self.meta.get("unpruned") or {}).get(unit)
        return self.dense_time(unit) if recorded is None else recorded * scale

    def dense_formats(self) -> dict[str, str]:
        """Units whose dense option runs in another format than the unpruned model's (e.g. the kernel)."""
        return {u: f[DENSE] for u, f in (self.meta.get("formats") or {}).items() if f.get(DENSE, "dense") != "dense"}

    def min_time(self) -> float:
        """The fastest the model can be made: every unit at its fastest option (a dense block, if faster still)."""
        fastest = {u: min(o.values()) for u, o in self.times.items()}
        saved = sum(max(0.0, sum(fastest[u] for u in b["units"]) - b["time"]) for b in self.dense_blocks.values())
        return self.fixed + sum(fastest.values()) - saved

    def blocks_left_dense(self, profile: Mapping[str, str]) -> list[str]:
        """The dense blocks whose units the profile all keeps at the dense option: torch runs them unfused."""
        return [name for name, b in self.dense_blocks.items() if all(profile.get(u, DENSE) == DENSE for u in b["units"])]

    def formats(self, profile: Mapping[str, str]) -> dict[str, str] | None:
        """The runtime format of every unit at its chosen option, as the table measured it (torch's
        ``dense`` in a block left dense), or None where the table recorded none for some option."""
        from spdy.runtime.formats import FORMATS

        recorded = self.meta.get("formats") or {}
        formats = {}
        for unit, key in profile.items():
            fmt = recorded.get(unit, {}).get(key)
            if fmt not in FORMATS:
                return None
            formats[unit] = fmt
        for name in self.blocks_left_dense(profile):
            formats.update({u: "dense" for u in self.dense_blocks[name]["units"] if u in formats})
        return formats

    def max_speedup(self) -> float:
        return self.base / self.min_time()

    @property
    def reference_speedup(self) -> float:
        """The unpruned model's speedup over ``base``'s model: 1, unless this model was shrunk from that one (`rebased`)."""
        return float((self.meta.get("reference") or {}).get("speedup", 1.0))

    def rebased(self, speedup: float, reference: str) -> "TimingTable":
        """A copy whose speedups are over ``reference``, the larger model this one was shrunk from, which runs
        ``speedup`` x slower than this one unpruned: targets and predictions then mean what a user compares with."""
        if not (math.isfinite(speedup) and speedup > 0):
            raise InputError(f"rebasing a timing table needs a finite positive speedup over {reference}, got {speedup!r}")
        meta = dict(self.meta, reference={"model": reference, "speedup": float(speedup), "base_before": self.base})
        return TimingTable({u: dict(o) for u, o in self.times.items()}, self.base * speedup, self.fixed, meta, dict(self.shapes),
                           {n: dict(b) for n, b in self.dense_blocks.items()})

    def budget(self, target: float) -> float:
        """Time the solver's units may use for a ``target`` speedup: ``base / target - fixed``."""
        return self.base / check_target(target) - self.fixed

    def predicted_time(self, profile: Mapping[str, str]) -> float:
        """``fixed`` + the chosen option's time of every unit (units not named stay dense)."""
        unknown = set(profile) - set(self.times)
        if unknown:
            raise InputError(f"profile names units the timing table lacks: {sorted(unknown)[:5]}")
        total = self.fixed
        for unit, options in self.times.items():
            key = profile.get(unit, DENSE)
            if key not in options:
                raise InputError(f"unit {unit!r} has no timed option {key!r}; it has {self.options(unit)}")
            total += options[key]
        for name in self.blocks_left_dense(profile):
            block = self.dense_blocks[name]
            total += block["time"] - sum(self.times[u][DENSE] for u in block["units"])
        return total

    def predicted_speedup(self, profile: Mapping[str, str]) -> float:
        return self.base / self.predicted_time(profile)

    def matrix(self) -> tuple[list[str], list[list[str]], np.ndarray]:
        """Units, each unit's option keys, and an (units x max options) array of times (inf pads)."""
        keys = [self.options(u) for u in self.units]
        width = max(len(k) for k in keys)
        arr = np.full((len(keys), width), np.inf)
        for i, (u, ks) in enumerate(zip(self.units, keys)):
            arr[i, : len(ks)] = [self.times[u][k] for k in ks]
        return self.units, keys, arr

    def calibrated(self, points: Sequence[tuple[Mapping[str, str], float]]) -> "TimingTable":
        """A copy that predicts the deployed runtime, fitted to ``points``: profiles with the speedup
        measured for them over this table's dense model.

        The table times units one by one; the runtime fuses neighbours and folds work that the
        table counts in ``fixed``, so a profile runs faster (or slower) than the sum predicts. The
        least-squares line ``time = a + b * sum of the profile's unit times`` becomes the copy's
        ``fixed = a`` and every unit time scaled by ``b``, unless that line's largest relative error
        on the points exceeds the table's own (then the table's line is kept); ``meta["calibration"]``
        keeps the points and the largest relative error before and after.
        """
        if len(points) < 2:
            raise InputError(f"calibration needs at least 2 measured profiles, got {len(points)}")
        x = np.array([self.predicted_time(p) - self.fixed for p, _ in points])
        speedups = np.array([s for _, s in points], dtype=float)
        if not np.all(np.isfinite(speedups) & (speedups > 0)):
            raise InputError(f"calibration: measured speedups must be finite and positive, got {speedups.tolist()}")
        y = self.base / speedups
        if np.ptp(x) < 1e-3 * x.max():
            raise InputError("calibration needs profiles of different predicted times")
        scale, fixed = np.polyfit(x, y, 1)
        if fixed < 0:  # a line through the origin: time cannot be negative with every unit at zero
            scale, fixed = float(x @ y / (x @ x)), 0.0
        if scale <= 0:
            pairs = ", ".join(f"{a * 1e3:.3f} -> {b * 1e3:.3f} ms" for a, b in zip(x, y))
            raise InputError(f"calibration: measured times do not grow with the table's unit times ({pairs}); re-time")
        before = np.abs((self.fixed + x) / y - 1)
        after = np.abs((fixed + scale * x) / y - 1)
        if after.max() > before.max():  # least squares on times can trade the worst point for the rest: keep the table's line
            scale, fixed, after = 1.0, self.fixed, before
        times = {u: {k: t * scale for k, t in o.items()} for u, o in self.times.items()}
        blocks = {n: dict(b, time=b["time"] * scale) for n, b in self.dense_blocks.items()}
        calibration = {"fixed_before": self.fixed, "fixed": float(fixed), "scale": float(scale),
                       "max_error_before": float(before.max()), "max_error_after": float(after.max()),
                       "points": [{"unit_time": float(a), "measured_time": float(b)} for a, b in zip(x, y)]}
        return TimingTable(times, self.base, float(fixed), dict(self.meta, calibration=calibration), dict(self.shapes), blocks)

    def planning_target(self, target: float) -> float:
        """The speedup to ask this calibrated table for so the deployed runtime lands on ``target``.

        The fitted line of `calibrated` is one compromise over its profiles; fusion makes the
        real curve bend (it pays only once whole blocks run in the kernel format), so the line
        misses most at low targets. Here the measured/predicted ratio is interpolated between
        the calibration profiles and the dense model (exact by definition; left out when dense
        options run in another format, whose all-dense profile calibration measures) at the predicted
        time that solves ``predicted * ratio = base / target``. Without calibration points it
        is ``target``.
        """
        fit = self.meta.get("calibration") or {}
        if "points" not in fit or "scale" not in fit:
            return target
        points = [(self.fixed + fit["scale"] * p["unit_time"], p["measured_time"]) for p in fit["points"]]
        if not self.dense_formats():  # the unpruned model, exact by definition, is a profile of this table only then
            points.append((self.fixed + sum(self.unpruned_time(u) for u in self.units), self.base / self.reference_speedup))
        predicted, measured = zip(*points)
        order = np.argsort(predicted)
        xs, ratios = np.array(predicted)[order], (np.array(measured) / np.array(predicted))[order]
        wanted = self.base / target
        grid = np.linspace(xs[0] * 0.5, xs[-1] * 1.5, 4001)
        landed = grid * np.interp(grid, xs, ratios)
        if np.any(np.diff(landed) <= 0):  # not monotone: the points are noise, not a curve
            return target
        return float(self.base / np.interp(wanted, landed, grid))

    # -- editing ----------------------------------------------------------------------
    def exclude(self, names: Iterable[str]) -> "TimingTable":
        """A copy where the named units leave the solver: their dense time moves into ``fixed``."""
        names = list(names)
        missing = [n for n in names if n not in self.times]
        if missing:
            raise InputError(f"cannot exclude unknown units {missing}; units are e.g. {self.units[:5]}")
        kept = {u: dict(o) for u, o in self.times.items() if u not in names}
        if not kept:
            raise InputError("excluding these units leaves no unit to prune")
        fixed = self.fixed + sum(self.unpruned_time(n) for n in names)
        meta = dict(self.meta, excluded=sorted(set(self.meta.get("excluded", [])) | set(names)))
        shapes = {u: s for u, s in self.shapes.items() if u in kept}
        # an excluded unit runs as torch runs it, dense: its block is never fused, so its dense options no longer apply
        blocks = {n: dict(b) for n, b in self.dense_blocks.items() if not set(b["units"]) & set(names)}
        return TimingTable(kept, self.base, fixed, meta, shapes, blocks)

    # -- persistence ------------------------------------------------------------------
    def solver_view(self) -> object:
        """What the solver and the searches see of the table (JSON-able), for checkpoint keys."""
        data = self.to_dict()
        return {"units": data["units"], "dense_blocks": self.dense_blocks} if self.dense_blocks else data["units"]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "base": self.base,
            "fixed": self.fixed,
            "meta": self.meta,
            "units": {u: {"times": {k: self.times[u][k] for k in self.options(u)}, **({"shape": self.shapes[u]} if u in self.shapes else {})} for u in self.units},
            **({"dense_blocks": self.dense_blocks} if self.dense_blocks else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (a killed write never leaves half a table)."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: object, path: str | os.PathLike | None = None) -> "TimingTable":
        if not isinstance(data, dict):
            raise TimingFormatError(path, "", "expected a JSON object")
        if data.get("format") != FORMAT:
            raise TimingFormatError(path, "format", f"expected {FORMAT!r}, got {data.get('format')!r}")
        for key in ("base", "fixed", "units"):
            if key not in data:
                raise TimingFormatError(path, key, "missing")
        units = data["units"]
        if not isinstance(units, dict):
            raise TimingFormatError(path, "units", "expected an object unit -> {times: {option: seconds}}")
        times, shapes = {}, {}
        for unit, entry in units.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("times"), dict):
                raise TimingFormatError(path, f"unit {unit!r}", "expected {'times': {option: seconds}}")
            times[unit] = dict(entry["times"])
            if "shape" in entry:
                shapes[unit] = entry["shape"]
        table = cls.__new__(cls)
        table.times, table.base, table.fixed = times, data["base"], data["fixed"]
        table.meta, table.shapes = dict(data.get("meta") or {}), shapes
        blocks = data.get("dense_blocks") or {}
        if not isinstance(blocks, dict):
            raise TimingFormatError(path, "dense_blocks", "expected an object name -> {'units': [...], 'time': seconds}")
        table.dense_blocks = {n: dict(b) if isinstance(b, dict) else b for n, b in blocks.items()}
        table._sorted = {}
        table.validate(path)
        return table

    @classmethod
    def load(cls, path: str | os.PathLike, exclude: Iterable[str] = ()) -> "TimingTable":
        """Read our JSON or the reference text format (detected by content)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"timing table {path} does not exist")
        text = path.read_text()
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise TimingFormatError(path, f"line {e.lineno}", f"invalid JSON ({e.msg}); the file may be truncated") from None
            table = cls.from_dict(data, path)
            return table.exclude(exclude) if exclude else table
        from spdy.timing.reference import parse_reference

        return parse_reference(text, path, exclude=exclude)
