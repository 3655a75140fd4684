"""Exact dynamic programming: the least total error under a time budget.

Given per-unit options with times ``t[l][s]`` and errors ``e[l][s]``, choose one option
per unit minimising ``sum e`` subject to ``sum t <= budget``. Time is discretised into
buckets, as in the paper, with two changes from the reference:

* each unit's fastest time is subtracted first, so the buckets resolve only the *slack*
  above the fastest possible model rather than the whole budget;
* times are rounded *up* to buckets, so the un-rounded total never exceeds the budget
  (the reference rounded to nearest and could overshoot by half a bucket per unit).

Options dominated by a faster option with no more error are dropped before the DP.
A run of units may also take one joint option together (`Group`: a fused layer left dense
and unfused); the DP then jumps over the run, so that choice is exact too.
This module sees numbers only; it knows nothing of engines or weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from spdy.errors import InputError
from spdy.levels import DENSE, Option
from spdy.timing.table import TimingTable

DEFAULT_BUCKETS = 10_000


class InfeasibleTarget(InputError):
    """No profile reaches the target; carries the largest speedup the table allows."""

    def __init__(self, target: float, max_speedup: float):
        self.target, self.max_speedup = target, max_speedup
        super().__init__(
            f"target speedup {target:g}x is infeasible on this timing table: "
            f"maximum attainable speedup is {max_speedup:.4f}x (every unit at its fastest option)"
        )


@dataclass
class Choice:
    """The DP's answer in numbers: an option index per unit (-1 for the units of a group taken whole)."""

    indices: list[int]
    time: float
    error: float


@dataclass(frozen=True)
class Group:
    """Units ``start:stop`` (consecutive) that may instead take one joint option of ``time`` and ``error``
    together (a block the runtime runs otherwise when all its units are at one option)."""

    start: int
    stop: int
    time: float
    error: float = 0.0


def prior(n: int) -> np.ndarray:
    """SPDY's per-level error prior ``(i / (n - 1))^2`` for n sorted options (dense = 0)."""
    return (np.arange(n) / max(n - 1, 1)) ** 2


def _pareto(tb: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Indices of options not dominated by one at most as slow with less or equal error."""
    order = np.lexsort((e, tb))
    best = np.minimum.accumulate(e[order])
    keep = np.ones(len(order), bool)
    keep[1:] = e[order][1:] < best[:-1]
    return order[keep & np.isfinite(e[order])]


@functools.cache
def _rows_kernel():
    """The DP's inner loops, compiled once (and cached on disk) by numba."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def rows_kernel(tb: np.ndarray, e: np.ndarray, offsets: np.ndarray, buckets: int,
                    group_start: np.ndarray, group_stop: np.ndarray, group_tb: np.ndarray, group_e: np.ndarray) -> np.ndarray:
        units = len(offsets) - 1
        rows = np.full((units + 1, buckets + 1), np.inf)
        rows[0, 0] = 0.0
        reach = np.zeros(units + 1, np.int64)
        for layer in range(units):
            # Separate buffers let LLVM vectorise: it cannot prove two rows of one array disjoint.
            prev = rows[layer].copy()
            cur = np.full(buckets + 1, np.inf)
            widest = 0
            for k in range(offsets[layer], offsets[layer + 1]):
                t, err = tb[k], e[k]
                hi = min(buckets, reach[layer] + t) + 1
                out, src = cur[t:hi], prev[: hi - t]
                for b in range(hi - t):
                    x = src[b] + err
                    out[b] = x if x < out[b] else out[b]
                widest = max(widest, t)
            reach[layer + 1] = min(buckets, reach[layer] + widest)
            for g in range(len(group_stop)):  # a group ending here may instead take its one joint option
                t, start = group_tb[g], group_start[g]
                if group_stop[g] != layer + 1 or t > buckets:
                    continue
                hi = min(buckets, reach[start] + t) + 1
                for b in range(hi - t):
                    x = rows[start, b] + group_e[g]
                    cur[b + t] = x if x < cur[b + t] else cur[b + t]
                reach[layer + 1] = max(reach[layer + 1], hi - 1)
            rows[layer + 1] = cur
        return rows

    return rows_kernel


def _dp(errs: list[np.ndarray], buckets: int, groups: Sequence[Group], tbs: list[np.ndarray], group_tbs: Sequence[int]) -> list[int]:
    """Min-plus DP over buckets; rows[l][b] = least error of units 0..l using exactly b buckets.

    Only the value rows are stored; the choice at each unit is recovered while tracing
    back, which keeps the inner loop a plain vectorisable min. A unit of a group taken whole is -1.
    """
    candidates = [[int(s) for s in _pareto(tb, e) if tb[s] <= buckets] for tb, e in zip(tbs, errs)]
    offsets = np.cumsum([0] + [len(c) for c in candidates])
    flat_tb = np.array([tb[s] for tb, c in zip(tbs, candidates) for s in c], dtype=np.int64)
    flat_e = np.array([e[s] for e, c in zip(errs, candidates) for s in c], dtype=np.float64)
    rows = _rows_kernel()(flat_tb, flat_e, offsets, buckets, np.array([g.start for g in groups], dtype=np.int64),
                          np.array([g.stop for g in groups], dtype=np.int64), np.array(group_tbs, dtype=np.int64),
                          np.array([g.error for g in groups], dtype=np.float64))
    ending = {g.stop: (g, int(t)) for g, t in zip(groups, group_tbs)}
    end = int(np.argmin(rows[-1]))
    picks = [-1] * len(tbs)
    layer = len(tbs) - 1
    while layer >= 0:
        target = rows[layer + 1, end]
        group, t = ending.get(layer + 1, (None, 0))
        if group is not None and t <= end and rows[group.start, end - t] + group.error == target:
            end -= t
            layer = group.start - 1
            continue
        tb, e, prev = tbs[layer], errs[layer], rows[layer]
        s = next(s for s in candidates[layer] if tb[s] <= end and prev[end - int(tb[s])] + e[s] == target)
        picks[layer] = s
        end -= int(tb[s])
        layer -= 1
    return picks


def solve_arrays(times: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float, buckets: int = DEFAULT_BUCKETS,
                 groups: Sequence[Group] = ()) -> Choice:
    """Minimise ``sum errors`` with ``sum times <= budget``; options with inf time are unavailable.

    Times above each unit's fastest are rounded *up* to buckets spanning the slack, so
    the returned choice never exceeds the un-rounded budget; it is optimal up to that
    rounding (exactly optimal when times are multiples of ``slack / buckets``).
    ``groups``: disjoint runs of consecutive units, each of which may take its joint option
    instead of one option per unit (a joint time below its units' fastest counts as that sum).
    Raises ``ValueError`` when even the fastest options exceed the budget.
    """
    if buckets < 1 or buckets > 10_000_000:
        raise InputError(f"buckets must be in [1, 1e7], got {buckets}")
    times = [np.asarray(t, float) for t in times]
    errors = [np.asarray(e, float) for e in errors]
    if len(times) != len(errors) or any(t.shape != e.shape for t, e in zip(times, errors)):
        raise InputError("times and errors must have one array per unit, of equal lengths")
    if any(np.isnan(e).any() for e in errors):
        raise InputError("errors contain NaN")
    _check_groups(groups, len(times))
    fastest = np.array([t.min() for t in times])
    # a joint time below its units' fastest counts as that sum: the buckets measure time above the fastest
    groups = [replace(g, time=max(g.time, float(fastest[g.start:g.stop].sum()))) for g in groups]
    slack = budget - fastest.sum()
    if not np.isfinite(slack) or slack < 0:
        raise InputError(f"infeasible: the fastest options take {fastest.sum():.6g}, budget is {budget:.6g}")
    # Unavailable options get error +inf so the DP never picks them.
    errs = [np.where(np.isfinite(t), e, np.inf) for t, e in zip(times, errors)]
    if slack == 0.0:
        picks = [int(np.argmin(np.where(t == f, e, np.inf))) for t, f, e in zip(times, fastest, errs)]
    else:
        picks = _dp(errs, buckets, groups, *_bucketed(times, fastest, slack, buckets, groups))
        while _total(times, picks, groups) > budget:
            # Float rounding let an exact multiple of the bucket width tip over; shrink by a hair.
            slack *= 1 - 1e-9
            picks = _dp(errs, buckets, groups, *_bucketed(times, fastest, slack, buckets, groups))
    error = sum(e[p] for e, p in zip(errors, picks) if p >= 0) + sum(g.error for g in _taken(groups, picks))
    return Choice(picks, _total(times, picks, groups), float(error))


def _check_groups(groups: Sequence[Group], units: int) -> None:
    previous = 0
    for g in sorted(groups, key=lambda g: g.start):
        if not (previous <= g.start < g.stop <= units) or not np.isfinite(g.time) or not np.isfinite(g.error):
            raise InputError(f"groups must be disjoint runs of units within 0..{units} with finite time and error, got {g}")
        previous = g.stop


def _bucketed(times: list[np.ndarray], fastest: np.ndarray, slack: float, buckets: int, groups: Sequence[Group]) -> tuple[list[np.ndarray], list[int]]:
    """Bucket counts above each unit's fastest time, rounded up (exact multiples stay exact), and each group's."""
    width = slack / buckets
    units = [np.ceil(np.minimum((t - f) / width * (1 - 1e-12), buckets + 1.0)) for t, f in zip(times, fastest)]
    joint = [int(np.ceil(min((g.time - fastest[g.start:g.stop].sum()) / width * (1 - 1e-12), buckets + 1.0))) for g in groups]
    return units, joint


def _taken(groups: Sequence[Group], picks: list[int]) -> list[Group]:
    return [g for g in groups if picks[g.start] < 0]


def _total(times: list[np.ndarray], picks: list[int], groups: Sequence[Group] = ()) -> float:
    taken = _taken(groups, picks)
    return float(sum(t[p] for t, p in zip(times, picks) if p >= 0) + sum(g.time for g in taken))


@dataclass
class Solution:
    """A solved profile: one option key per unit, with its predicted time and speedup."""

    profile: dict[str, str]
    target: float
    budget: float
    predicted_time: float
    predicted_speedup: float
    max_speedup: float
    total_error: float
    errors: dict[str, float] = field(default_factory=dict)

    def sparsities(self) -> dict[str, float]:
        return {u: Option.parse(k).sparsity for u, k in self.profile.items()}


def prior_errors(table: TimingTable) -> dict[str, dict[str, float]]:
    """The SPDY prior for every unit: ``(i/(n-1))^2`` over its options sorted by sparsity."""
    return {u: dict(zip(ks, prior(len(ks)).tolist())) for u, ks in ((u, table.options(u)) for u in table.units)}


def scaled_errors(table: TimingTable, coefficients: Sequence[float]) -> dict[str, dict[str, float]]:
    """``c_l * prior`` per unit: the error model the SPDY search optimises over."""
    base = prior_errors(table)
    return {u: {k: c * v for k, v in base[u].items()} for u, c in zip(table.units, coefficients)}


def _grouped_order(table: TimingTable) -> list[str]:
    """The table's units with each dense block's units next to each other (the DP's groups are runs)."""
    block_of = {u: n for n, b in table.dense_blocks.items() for u in b["units"]}
    order: list[str] = []
    for unit in table.units:
        if unit not in block_of:
            order.append(unit)
        elif unit not in order:
            order += table.dense_blocks[block_of[unit]]["units"]
    return order


def solve(table: TimingTable, target: float, errors: Mapping[str, Mapping[str, float]] | None = None, buckets: int = DEFAULT_BUCKETS) -> Solution:
    """The least-error profile whose predicted speedup on ``table`` is at least ``target``.

    ``errors[unit][option_key]``; defaults to the SPDY prior. Options a unit has no error
    for are not used. Raises :class:`InfeasibleTarget` with the largest attainable speedup.
    """
    errors = prior_errors(table) if errors is None else errors
    budget = table.budget(target)
    max_speedup = table.max_speedup()
    if table.min_time() > table.base / target:
        raise InfeasibleTarget(target, max_speedup)
    order = _grouped_order(table)
    keys, times, errs = [], [], []
    for unit in order:
        if unit not in errors:
            raise InputError(f"no errors given for unit {unit!r}")
        options = [k for k in table.options(unit) if k in errors[unit]]
        if not options:
            raise InputError(f"unit {unit!r}: none of its timed options {table.options(unit)[:4]}... has an error")
        keys.append(options)
        times.append(np.array([table.times[unit][k] for k in options]))
        errs.append(np.array([float(errors[unit][k]) for k in options]))
    position = {u: i for i, u in enumerate(order)}
    groups = []
    for block in table.dense_blocks.values():
        first = min(position[u] for u in block["units"])
        if all(DENSE in errors[u] for u in block["units"]):
            groups.append(Group(first, first + len(block["units"]), block["time"], sum(float(errors[u][DENSE]) for u in block["units"])))
    try:
        choice = solve_arrays(times, errs, budget, buckets, groups)
    except ValueError:
        # Only reachable when the options with errors exclude every unit's fastest one.
        fastest = table.fixed + sum(t.min() for t in times)
        raise InfeasibleTarget(target, table.base / fastest) from None
    chosen = {u: ks[i] if i >= 0 else DENSE for u, ks, i in zip(order, keys, choice.indices)}
    profile = {u: chosen[u] for u in table.units}
    predicted = table.predicted_time(profile)
    return Solution(
        profile=profile,
        target=target,
        budget=budget,
        predicted_time=predicted,
        predicted_speedup=table.base / predicted,
        max_speedup=max_speedup,
        total_error=choice.error,
        errors={u: float(errors[u][k]) for u, k in profile.items()},
    )
