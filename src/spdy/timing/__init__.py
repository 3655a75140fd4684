"""Timing tables and how to measure them.

`measure` drives any backend (:mod:`spdy.timing.backend`): every unit at every option, a
JSON checkpoint after each unit so a killed run resumes where it stopped, units of equal
signature measured once, and ``base``/``fixed`` from the same run. Heavy imports (torch)
happen inside `measure`, so reading a table stays light.
"""

from __future__ import annotations

import os
import statistics
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from spdy.errors import InputError
from spdy.files import read_json, write_json

if TYPE_CHECKING:
    from torch import nn

    from spdy.runtime.timer import Stat
    from spdy.timing.backend import Backend
    from spdy.timing.table import TimingTable
    from spdy.units import Unit

CHECKPOINT_FORMAT = "spdy.timing-checkpoint/1"
BASE_AGREEMENT = 1.2  # the model's time before and after the units differing by more than this: measured a third time
NOISE_FLOOR = 0.03  # units summing to at most this share more than the model: noise, fixed taken as 0
# Keys of a backend's meta that must agree for checkpointed entries to be reused.
_IDENTITY = ("backend", "cpu", "threads", "torch", "formats_tried", "whole_blocks")


class FixedTimeError(InputError):
    """The units timed alone add up to more than the whole model: the table would be wrong."""


def _option_keys(units: Sequence[str], options: Mapping[str, Sequence[str]] | Sequence[str] | None, levels: Sequence[float] | None, pattern: str) -> dict[str, list[str]]:
    from spdy.levels import DENSE, Option, options_for

    if options is None:
        keys = [o.key for o in options_for(pattern, list(levels) if levels is not None else None)]
        return {u: keys for u in units}
    if isinstance(options, Mapping):
        missing = [u for u in units if u not in options]
        if missing:
            raise InputError(f"options given per unit, but not for {missing[:5]}")
        per_unit = {u: list(options[u]) for u in units}
    else:
        per_unit = {u: list(options) for u in units}
    for unit, keys in per_unit.items():
        for k in keys:
            Option.parse(k)
        if DENSE not in keys:
            keys.insert(0, DENSE)
    return per_unit


def _load_checkpoint(path: Path, identity: dict) -> dict:
    if not path.is_file():
        return {"format": CHECKPOINT_FORMAT, "identity": identity, "entries": {}}
    data = read_json(path, "timing checkpoint (delete it to start over)")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"timing checkpoint {path}: not a {CHECKPOINT_FORMAT} file; delete it or choose another path")
    differs = {k: (data["identity"].get(k), identity.get(k)) for k in _IDENTITY if data["identity"].get(k) != identity.get(k)}
    if differs:
        raise InputError(f"timing checkpoint {path} was measured differently ({differs}, as checkpoint vs now); delete it or choose another path")
    return data


def _save_checkpoint(path: Path, data: dict) -> None:
    write_json(path, data)


def _measure_units(
    engine: "Backend",
    model: "nn.Module",
    units: "dict[str, Unit]",
    batch: Any,
    wanted: dict[str, list[str]],
    entries: dict[str, dict],
    path: Path | None,
    state: dict,
    progress: bool,
    dedupe: bool,
    on_unit: Callable[[str], None] | None,
) -> "tuple[Stat, Stat, Stat | None]":
    """The measuring loop: model time, every unit (checkpointed), model time again."""
    import torch
    from spdy.progress import progress_bar

    with torch.no_grad():
        before = engine.model_time(model, batch)
    by_signature = {e["signature"]: n for n, e in entries.items() if e.get("signature") is not None and "shared_from" not in e}
    bar = progress_bar(units.items(), desc=f"timing ({engine.name})", unit="unit", disable=not progress)
    for name, unit in bar:
        bar.set_postfix_str(name[-40:], refresh=False)
        entry = entries.get(name)
        missing = [k for k in wanted[name] if entry is None or k not in entry["times"]]
        if not missing:
            continue
        signature = engine.signature(unit) if dedupe else None
        source = by_signature.get(signature) if signature is not None else None
        if source is not None and all(k in entries[source]["times"] for k in wanted[name]):
            src = entries[source]
            entries[name] = {"signature": signature, "shared_from": source, **{f: dict(src[f]) for f in ("times", "formats", "spread")},
                             **({"unpruned": src["unpruned"]} if "unpruned" in src else {})}
        else:
            measured = engine.unit_times(unit, missing)
            entry = entries.setdefault(name, {"signature": signature, "times": {}, "formats": {}, "spread": {}})
            entry.pop("shared_from", None)
            for field_name in ("times", "formats", "spread"):
                entry[field_name].update(getattr(measured, field_name))
            if measured.unpruned is not None:
                entry["unpruned"] = measured.unpruned
            if signature is not None:
                by_signature[signature] = name
        if path:
            _save_checkpoint(path, state)
        if on_unit is not None:
            on_unit(name)
    with torch.no_grad():
        after = engine.model_time(model, batch)
        # the model ran at two speeds before and after the units: another job's load or a cold start hit one of
        # them; a third measurement decides which (the median of three)
        again = engine.model_time(model, batch) if max(before.median, after.median) > BASE_AGREEMENT * min(before.median, after.median) else None
    return before, after, again


def measure(
    model: "nn.Module",
    units: "Mapping[str, Unit]",
    batch: Any,
    options: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    pattern: str = "unstructured",
    backend: "str | Backend" = "torch-cpu",
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    dedupe: bool = True,
    on_unit: Callable[[str], None] | None = None,
    **backend_options: Any,
) -> "TimingTable":
    """Time every unit at every option on ``backend`` and return a `TimingTable`.

    ``options``: option keys for all units, or per unit; default ``pattern`` at ``levels``
    (default the 42-option SPDY grid). ``checkpoint``: a JSON file written after each unit
    and read on start, so an interrupted run resumes without re-measuring what it has.
    ``on_unit(name)`` is called after each unit is checkpointed. ``backend_options`` go to
    the backend (torch-cpu: ``threads``, ``formats``, ``rounds``, ...).

    ``base`` is the dense model's median time (measured before and after the units, pooled; a
    third time when those two disagree by more than ``BASE_AGREEMENT``)
    and ``fixed = base - sum of dense unit times``; a ``fixed`` below ``-NOISE_FLOOR * base``
    has the units timed once more (a disturbed machine inflates them), and raises `FixedTimeError`
    if it stays there (the checkpoint is kept, so re-running re-measures ``base`` only); one
    within it is noise around zero and becomes 0 with a warning.
    """
    from spdy.levels import DENSE
    from spdy.timing.backend import get_backend
    from spdy.timing.table import TimingTable
    from spdy.units import capture_shapes, unsupported_layers

    units = dict(units)
    if not units:
        raise InputError("measure: no units to time")
    if not isinstance(backend, str) and backend_options:
        raise TypeError(f"measure: backend options {sorted(backend_options)} apply only when the backend is given by name")
    engine = get_backend(backend, **backend_options) if isinstance(backend, str) else backend
    if any(u.input_shape is None for u in units.values()):
        capture_shapes(model, units, batch)
    wanted = _option_keys(list(units), options, levels, pattern)
    meta = engine.meta()
    path = Path(checkpoint) if checkpoint is not None else None
    state = _load_checkpoint(path, meta) if path else {"entries": {}}
    entries: dict[str, dict] = state["entries"]
    model.eval()
    engine.prepare(model, units, batch)
    try:
        for attempt in range(2):
            before, after, again = _measure_units(engine, model, units, batch, wanted, entries, path, state, progress, dedupe, on_unit)
            base = statistics.median([before.median, after.median] + ([again.median] if again is not None else []))
            times, unpruned = _unit_table(units, entries, wanted)
            dense_blocks = _dense_blocks(engine, units, times, state, path)
            deployed = engine.deployed_fixed(model, batch, {n: (times[n][DENSE], entries[n]["formats"].get(DENSE, "dense")) for n in units}, base)
            dense_sum = sum(unpruned.values())
            if attempt or deployed is not None or dense_sum <= (1 + NOISE_FLOOR) * base:
                break
            # the units add up to more than the whole model: something slowed the machine while they were timed; once more
            warnings.warn(f"the units timed alone add up to {dense_sum / base - 1:.1%} more than the whole model: timing them again",
                          RuntimeWarning, stacklevel=2)
            entries.clear()
    finally:
        engine.finish()
    fixed = base - dense_sum if deployed is None else deployed["fixed"]
    if deployed is not None and fixed < 0:
        # the deployed model ran faster than its units timed alone: noise, or units sharing the cache better in the
        # model than alone; nothing runs outside them at this precision, and calibration fits the rest
        warnings.warn(f"the units' dense options add up to {-fixed * 1e3:.2f} ms more than the deployed model at them; "
                      f"the time outside the units is taken as 0", RuntimeWarning, stacklevel=2)
        fixed = 0.0
    if -NOISE_FLOOR * base <= fixed < 0:
        # a model whose time is all in its units (e.g. convs and Linears with ReLUs between): the
        # shortfall is timing noise, and a fixed cost of zero is the truth within it
        warnings.warn(f"the units timed alone add up to {-fixed / base:.1%} more than the whole model ({base * 1e3:.2f} ms): "
                      f"within timing noise; the time outside the units is taken as 0", RuntimeWarning, stacklevel=2)
        fixed = 0.0
    if fixed < 0:
        raise FixedTimeError(
            f"the {len(units)} units timed alone take {dense_sum * 1e3:.2f} ms dense, more than the whole model "
            f"({base * 1e3:.2f} ms; before/after {before.median * 1e3:.2f}/{after.median * 1e3:.2f} ms): noise or caching "
            f"effects on this machine. Re-run with more repeats (rounds/model_rounds) on a quieter machine"
            + (f"; the unit times are kept in {path}" if path else "")
        )
    meta.update(
        {
            "base_before": before.median,
            "base_after": after.median,
            **({"base_again": again.median} if again is not None else {}),
            "base_spread": max(before.spread, after.spread),
            "batch_shapes": _batch_shapes(batch),
            "options": {"pattern": pattern, "levels": list(levels) if levels is not None else None},
            "formats": {n: {k: entries[n]["formats"][k] for k in wanted[n] if k in entries[n]["formats"]} for n in units},
            "spread": {n: {k: entries[n]["spread"][k] for k in wanted[n] if k in entries[n]["spread"]} for n in units},
            "shared": {n: entries[n]["shared_from"] for n in units if "shared_from" in entries[n]},
            "unpruned": unpruned,
            # Their time is part of ``fixed``: they run dense in every profile.
            "kept_dense": unsupported_layers(model),
            **({"deployed_fixed": deployed} if deployed is not None else {}),
        }
    )
    shapes = {n: u.describe() for n, u in units.items()}
    return TimingTable(times, base, fixed, meta, shapes, dense_blocks)


def _dense_blocks(engine: "Backend", units: "Mapping[str, Unit]", times: dict, state: dict, path: Path | None) -> dict[str, dict]:
    """The engine's fused blocks that run faster left dense in torch than fused at their units' dense options
    (where the CPU's BLAS beats the kernel on a dense matrix): the table's ``dense_blocks``. Checkpointed."""
    from spdy.levels import DENSE

    measured = state.setdefault("unfused_blocks", {})
    blocks = {}
    for name, members in engine.fused_blocks().items():
        if not set(members) <= set(units):
            continue
        if name not in measured:
            measured[name] = engine.unfused_time(name)
            if path:
                _save_checkpoint(path, state)
        if measured[name] < sum(times[u][DENSE] for u in members):
            blocks[name] = {"units": list(members), "time": measured[name]}
    return blocks


def _unit_table(units: "Mapping[str, Unit]", entries: dict[str, dict], wanted: dict[str, list[str]]) -> tuple[dict, dict]:
    """Each unit's option times, and its time in the unpruned model (torch dense: what ``base`` holds,
    whatever the dense option runs in); an option that runs dense costs exactly that (consistent across resumes)."""
    from spdy.levels import DENSE

    times, unpruned = {}, {}
    for name in units:
        entry = entries[name]
        unpruned[name] = entry.get("unpruned", entry["times"][DENSE])
        times[name] = {k: unpruned[name] if entry["formats"].get(k) == "dense" else entry["times"][k] for k in wanted[name]}
    return times, unpruned


def _batch_shapes(batch: Any) -> Any:
    if hasattr(batch, "shapes"):
        return batch.shapes()
    if hasattr(batch, "shape"):
        return list(batch.shape)
    if isinstance(batch, Mapping):
        return {k: _batch_shapes(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_batch_shapes(v) for v in batch]
    return repr(type(batch).__name__)


__all__ = ["FixedTimeError", "measure"]
