"""The pruner interface and the magnitude baseline.

A pruner turns one unit's dense (out, in) weight into every requested level at once.
Levels are nested: level k+1 starts from level k's *result* and keeps its mask (zeros
stay zeros), adding just enough tiles to hit its exact count. Subclasses supply
``prepare`` (once per unit, e.g. a factorised Hessian) and ``step`` (one level).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import torch

from spdy.database.capture import UnitStats
from spdy.database.patterns import Pattern
from spdy.errors import InputError
from spdy.levels import Option


def single_pattern(options: list[Option]) -> Pattern:
    """The one pattern of a set of options (dense aside); a database holds one pattern."""
    patterns = sorted({o.pattern for o in options if not o.is_dense})
    if len(patterns) > 1:
        raise InputError(f"options mix patterns {patterns}; build one database per pattern")
    return Pattern.parse(patterns[0] if patterns else "unstructured")


def magnitude_mask(W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """Tile mask of the smallest-magnitude tiles, ``prev`` included."""
    return pattern.select(W.square(), pattern.count(tuple(W.shape), sparsity), prev)


class Pruner:
    """Prunes one unit to all levels; subclasses are dataclasses of their hyperparameters."""

    name: ClassVar[str]

    @property
    def rows(self) -> int:
        """Input rows per unit this pruner needs besides the Hessian (0: none)."""
        return 0

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def prepare(self, W: torch.Tensor, stats: UnitStats) -> Any:
        return None

    def step(self, ctx: Any, W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Prune ``W`` (the previous level's result) further; return (weights, tile mask)."""
        raise NotImplementedError

    def levels(self, W: torch.Tensor, stats: UnitStats, options: list[Option], unit: str = "") -> Iterator[tuple[Option, torch.Tensor]]:
        """Yield (option, pruned float32 weight) in increasing sparsity, dense first."""
        pattern = single_pattern(options)
        pattern.check(tuple(W.shape), unit)
        dense = W.detach().float()
        ctx = self.prepare(dense, stats)
        current, prev = dense, None
        for option in sorted(set(options)):
            if option.is_dense:
                yield option, dense.clone()
                continue
            current, prev = self.step(ctx, current, prev, pattern, option.sparsity)
            yield option, current

    def prune(self, W: torch.Tensor, stats: UnitStats, options: list[Option]) -> dict[str, torch.Tensor]:
        """All levels of one unit, by option key."""
        return {option.key: w for option, w in self.levels(W, stats, options)}


@dataclasses.dataclass
class Magnitude(Pruner):
    """Zero the smallest weights; no reconstruction. The baseline."""

    name: ClassVar[str] = "magnitude"

    def step(self, ctx: Any, W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        tiles = magnitude_mask(W, prev, pattern, sparsity)
        return W.masked_fill(pattern.expand(tiles, tuple(W.shape)), 0.0), tiles
