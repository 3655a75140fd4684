"""Sparsity grids and the option keys that name a unit's choices.

Every unit offers *options*. An option is a pruning pattern at a sparsity level and is
named by a stable string key, so tables, databases and profiles written by different runs
(or by the reference code) refer to the same choice:

* ``"0.0000"``            dense (shared by every pattern)
* ``"0.9000"``            unstructured, 90% of the weights zero
* ``"4x1@0.9000"``        blocks of 4 rows x 1 column, 90% of the blocks zero
* ``"2:4@0.5000"``        N:M (2 of every 4 consecutive weights zero)
* ``"heads@0.2500"``      structured: a quarter of a block's attention heads removed
* ``"neurons@1.0000"``    structured: every feed-forward neuron removed (the block is gone)
* ``"channels@0.5000"``    structured: half of a convolution's output channels removed

Sparsities are rounded to 4 decimals in keys, as in the reference tables. A structured
key's sparsity is the fraction of the block's structures removed; `kept_structures` turns
it back into a count. Only heads and neurons reach 1.0: removing a whole block leaves its
residual connection, while a layer with no weight left is no layer, and torch cannot run a
convolution without channels.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from spdy.errors import InputError

DENSE = "0.0000"
UNSTRUCTURED = "unstructured"
STRUCTURED = "structured"  # the --pattern that prunes whole heads, neurons and channels
STRUCTURES = ("heads", "neurons", "channels")  # the patterns of structured options, one per kind of block
REMOVABLE = ("heads", "neurons")  # structures a block can lose every one of (the block is gone)

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^(\d+)x(\d+)$")


def geometric_levels(min_sparsity: float = 0.4, max_sparsity: float = 0.99, steps: int = 41) -> list[float]:
    """The SPDY grid: each step removes the same fraction of the remaining weights.

    Density falls geometrically from ``1 - min_sparsity`` to ``1 - max_sparsity``; the
    default gives the paper's 41 levels 0.4000, 0.4584, ..., 0.9900 (dense not included).
    """
    if not 0.0 < min_sparsity < max_sparsity < 1.0:
        raise InputError(f"need 0 < min_sparsity < max_sparsity < 1, got {min_sparsity} and {max_sparsity}")
    if steps < 2:
        raise InputError(f"steps must be >= 2, got {steps}")
    d0, d1 = 1.0 - min_sparsity, 1.0 - max_sparsity
    return [round(1.0 - d0 * (d1 / d0) ** (k / (steps - 1)), 4) for k in range(steps)]


def spdy_grid(min_sparsity: float = 0.4, max_sparsity: float = 0.99, steps: int = 41) -> list[float]:
    """Dense plus the geometric levels: the 42 options of the paper by default."""
    return [0.0] + geometric_levels(min_sparsity, max_sparsity, steps)


@dataclass(frozen=True, order=True)
class Option:
    """One choice for a unit: a pattern at a sparsity. Dense is ``Option(0.0)``."""

    sparsity: float
    pattern: str = UNSTRUCTURED

    def __post_init__(self) -> None:
        validate_pattern(self.pattern)
        top_ok = self.pattern in REMOVABLE and self.sparsity == 1.0
        if not (0.0 <= self.sparsity < 1.0 or top_ok) or np.isnan(self.sparsity):
            raise InputError(f"sparsity must be in [0, 1) (structured heads/neurons: [0, 1], channels: [0, 1)), got {self.sparsity} for {self.pattern}")
        if self.sparsity == 0.0 and self.pattern != UNSTRUCTURED:
            object.__setattr__(self, "pattern", UNSTRUCTURED)

    @property
    def key(self) -> str:
        level = f"{self.sparsity:.4f}"
        if self.pattern == UNSTRUCTURED or self.sparsity == 0.0:
            return level
        return f"{self.pattern}@{level}"

    @property
    def is_dense(self) -> bool:
        return self.sparsity == 0.0

    @classmethod
    def parse(cls, key: str) -> "Option":
        """Inverse of :attr:`key` that also reads other spellings ("0.9", "0.90"); raises ``InputError``
        naming the key when it is not an option."""
        if not isinstance(key, str):
            raise InputError(f"option key {key!r}: expected a string like '0.9000' or '4x1@0.9000', not {type(key).__name__}")
        return _parse(key)

    def __str__(self) -> str:
        return self.key


@functools.lru_cache(maxsize=65536)
def _parse(key: str) -> Option:
    pattern, _, level = key.rpartition("@")
    try:
        sparsity = float(level)
    except ValueError:
        raise InputError(f"option key {key!r}: expected '<sparsity>' or '<pattern>@<sparsity>', e.g. '0.9000' or '4x1@0.9000'") from None
    return Option(sparsity, pattern or UNSTRUCTURED)


def level_key(sparsity: float) -> str:
    """The 4-decimal key of an unstructured level."""
    return Option(float(sparsity)).key


def validate_pattern(pattern: str) -> str:
    """Accept ``unstructured``, ``N:M`` (N < M), ``RxC`` blocks or a structure; raise a clear error otherwise."""
    if pattern == UNSTRUCTURED or pattern in STRUCTURES:
        return pattern
    if m := _NM.match(pattern):
        n, mm = int(m.group(1)), int(m.group(2))
        if 0 < n < mm:
            return pattern
    elif m := _BLOCK.match(pattern):
        if int(m.group(1)) > 0 and int(m.group(2)) > 0:
            return pattern
    raise InputError(f"unknown pattern {pattern!r}: use 'unstructured', 'N:M' like '2:4', blocks 'RxC' like '4x1' or '16x16', "
                     f"or '{STRUCTURED}' (whole heads, neurons and conv channels)")


def structured_options(structure: str, count: int, step: int = 1) -> list[Option]:
    """Dense plus ``structure`` with ``count`` down to 0 kept (channels: down to ``step``) in steps of ``step``
    (nested by construction)."""
    if structure not in STRUCTURES:
        raise InputError(f"unknown structure {structure!r}: use one of {', '.join(STRUCTURES)}")
    if count < 1 or step < 1:
        raise InputError(f"{structure}: need at least one structure and a step >= 1, got {count} and {step}")
    kept = sorted({*range(count - step, 0, -step), *((0,) if structure in REMOVABLE else ())}, reverse=True)
    return [Option(0.0)] + [Option(round(1.0 - k / count, 4), structure) for k in kept]


def kept_structures(option: Option, count: int, step: int = 1) -> int:
    """How many of ``count`` structures an option keeps, on the grid of ``step`` it was made on."""
    if option.pattern not in STRUCTURES and not option.is_dense:
        raise InputError(f"option {option.key!r} is not structured (heads@S, neurons@S or channels@S)")
    kept = round((1.0 - option.sparsity) * count / step) * step
    return min(kept, count)


def nm_sparsity(pattern: str) -> float:
    """The fixed sparsity of an N:M pattern (N zeros in every M): 2:4 -> 0.5."""
    m = _NM.match(pattern)
    if not m:
        raise InputError(f"{pattern!r} is not an N:M pattern")
    return int(m.group(1)) / int(m.group(2))


def block_shape(pattern: str) -> tuple[int, int]:
    """(rows, cols) of a block pattern; unstructured is 1x1."""
    if pattern == UNSTRUCTURED:
        return (1, 1)
    m = _BLOCK.match(pattern)
    if not m:
        raise InputError(f"{pattern!r} is not a block pattern")
    return int(m.group(1)), int(m.group(2))


def options_for(pattern: str = UNSTRUCTURED, levels: list[float] | None = None) -> list[Option]:
    """Dense plus ``pattern`` at each level (N:M patterns have exactly one level)."""
    validate_pattern(pattern)
    if _NM.match(pattern):
        return [Option(0.0), Option(nm_sparsity(pattern), pattern)]
    levels = geometric_levels() if levels is None else levels
    return [Option(0.0)] + [Option(float(s), pattern) for s in sorted(set(levels)) if s > 0.0]
