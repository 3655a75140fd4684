"""The profiles SPDY must beat, each meeting the same target on the same timing table.

* uniform: one sparsity for every unit, the least that meets the target;
* global magnitude: one weight-magnitude threshold across all units;
* dp-errors: the exact DP on measured per-unit reconstruction errors, with no search;
* OWL: per-unit sparsity from the unit's outlier ratio (Yin et al., 2023): units with
  more outlier weights (large ``|W| * ||x||``) are pruned less.

Per-unit sparsities that fall between grid levels are rounded *up* to the next timed
level, so the table's prediction is for exactly what gets pruned.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from spdy.errors import InputError
from spdy.search.dp import solve
from spdy.levels import DENSE, Option
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable


def _profile(table: TimingTable, target: float, options: dict[str, str], method: str, **meta) -> Profile:
    time = table.predicted_time(options)
    return Profile(options=options, target=target, predicted_time=time, predicted_speedup=table.base / time, method=method, meta=meta)


def _meets(table: TimingTable, target: float, options: Mapping[str, str]) -> bool:
    return table.predicted_time(options) <= table.base / target


def _snap(table: TimingTable, unit: str, sparsity: float) -> str:
    """The unit's least timed option (same pattern family) with at least ``sparsity``."""
    keys = table.options(unit)
    for key in keys:
        if Option.parse(key).sparsity >= sparsity - 1e-9:
            return key
    return keys[-1]


def _first_meeting(table: TimingTable, target: float, candidates: Iterable[dict[str, str]], what: str) -> dict[str, str]:
    """The first candidate (in increasing aggressiveness) that meets the target."""
    fastest = None
    for options in candidates:
        if _meets(table, target, options):
            return options
        speedup = table.predicted_speedup(options)
        fastest = speedup if fastest is None else max(fastest, speedup)
    raise InputError(f"no {what} profile reaches {target:g}x on this table: the fastest gives {fastest:.4f}x "
                     f"(the table's maximum, with every unit at its fastest option, is {table.max_speedup():.4f}x)")


def _uniform_levels(table: TimingTable) -> Iterable[dict[str, str]]:
    """Every unit at one sparsity level, for each level of the table, the least first."""
    levels = sorted({Option.parse(k).sparsity for u in table.units for k in table.options(u)})
    return ({u: _snap(table, u, s) for u in table.units} for s in levels)


def uniform(table: TimingTable, target: float) -> Profile:
    """The least single sparsity level that meets the target (denser units cannot opt out)."""
    return _profile(table, target, _first_meeting(table, target, _uniform_levels(table), "uniform"), "uniform")


def uniform_short_of(table: TimingTable, target: float) -> dict[str, str] | None:
    """The last single level that falls short of the target (None if the first meets it). On a coarse grid the
    level that meets it may overshoot by far (SmolLM2's structured blocks: 1.50x for 1.27x asked); a profile
    near this one that prunes a little more where it costs least is the better allocation to start a search from."""
    short = None
    for options in _uniform_levels(table):
        if _meets(table, target, options):
            return short
        short = options
    return short


def global_magnitude(table: TimingTable, target: float, weights: Mapping[str, torch.Tensor], steps: int = 2000) -> Profile:
    """One magnitude threshold over all units, raised until the target is met."""
    magnitudes = {u: weights[u].detach().abs().flatten().float().sort().values for u in table.units}
    pooled = torch.cat(list(magnitudes.values()))
    sample = pooled[torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    thresholds = torch.quantile(sample, torch.linspace(0, 1, steps + 1)[1:-1])
    # fraction of each unit's weights below every threshold at once
    below = {u: (torch.searchsorted(m, thresholds) / len(m)).tolist() for u, m in magnitudes.items()}

    def candidates():
        for i in range(len(thresholds)):
            yield {u: _snap(table, u, fractions[i]) for u, fractions in below.items()}

    return _profile(table, target, _first_meeting(table, target, candidates(), "global magnitude"), "global-magnitude")


def dp_errors(table: TimingTable, target: float, errors: Mapping[str, Mapping[str, float]]) -> Profile:
    """The DP on per-unit errors as measured (e.g. squared relative reconstruction errors)."""
    solution = solve(table, target, errors)
    return _profile(table, target, solution.profile, "dp-errors")


def outlier_ratios(weights: Mapping[str, torch.Tensor], input_norms: Mapping[str, torch.Tensor], m: float = 5.0) -> dict[str, float]:
    """Share of a unit's scores ``|W_ij| * ||x_j||`` above ``m`` times their mean (OWL's D)."""
    ratios = {}
    for unit, w in weights.items():
        score = w.detach().abs().float() * input_norms[unit].float().reshape(1, -1)
        ratios[unit] = float((score > m * score.mean()).float().mean())
    return ratios


def owl(table: TimingTable, target: float, weights: Mapping[str, torch.Tensor], input_norms: Mapping[str, torch.Tensor],
        lam: float = 0.08, m: float = 5.0) -> Profile:
    """OWL allocation: sparsity ``s + lam * (1 - 2 * normalised outlier ratio)``, s raised until the target is met."""
    ratios = outlier_ratios({u: weights[u] for u in table.units}, input_norms, m)
    d = np.array([ratios[u] for u in table.units])
    spread = d.max() - d.min()
    offsets = lam * (1 - 2 * (d - d.min()) / spread) if spread > 0 else np.zeros_like(d)

    def candidates():
        for s in np.arange(0.0, 1.0, 0.002):
            yield {u: (_snap(table, u, s + o) if s + o > 0 else DENSE) for u, o in zip(table.units, offsets)}

    chosen = _first_meeting(table, target, candidates(), "OWL")
    return _profile(table, target, chosen, "owl", outlier_ratios=ratios, lam=lam, m=m)
