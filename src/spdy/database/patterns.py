"""Which weights a pattern zeroes, given per-weight saliencies (low = cheap to remove).

A pattern prunes *tiles* of an (out, in) weight matrix:

* ``unstructured``: 1x1 tiles;
* ``RxC`` blocks: R rows x C input columns, whole tiles zeroed together; a tile's score
  is the sum of its weights' saliencies. When the matrix is not a multiple of RxC, the
  last row/column of tiles is partial (*padding rule*: the grid is ``ceil(out/R) x
  ceil(in/C)``, a partial tile counts as one tile and scores only its real weights);
* ``N:M``: N of every M consecutive weights along the input dimension, in every row;
  the input size must be a multiple of M.

Exact sparsity is a count of tiles: ``round(s * tiles)`` (N:M: exactly N/M of the weights).
Masks are boolean with ``True`` = pruned; nested levels pass the previous level's tile
mask as ``forced`` so zeros stay zeros.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spdy.errors import InputError
from spdy.levels import UNSTRUCTURED, block_shape, validate_pattern

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: tile shape, or N:M groups."""

    name: str
    tile: tuple[int, int] = (1, 1)
    nm: tuple[int, int] | None = None

    @classmethod
    def parse(cls, name: str) -> "Pattern":
        validate_pattern(name)
        if m := _NM.match(name):
            return cls(name, (1, 1), (int(m.group(1)), int(m.group(2))))
        return cls(name, block_shape(name) if name != UNSTRUCTURED else (1, 1))

    def grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Tiles per (row, column) of a weight of ``shape``."""
        return math.ceil(shape[0] / self.tile[0]), math.ceil(shape[1] / self.tile[1])

    def check(self, shape: tuple[int, int], unit: str = "") -> None:
        if self.nm and shape[1] % self.nm[1]:
            raise InputError(f"unit {unit!r}: input size {shape[1]} is not a multiple of {self.nm[1]}, so pattern {self.name} does not apply; exclude the unit")

    def count(self, shape: tuple[int, int], sparsity: float) -> int:
        """Tiles to prune in the whole matrix for ``sparsity`` (N:M: its fixed count; dense: 0)."""
        if sparsity == 0.0:
            return 0
        if self.nm:
            n, m = self.nm
            return shape[0] * (shape[1] // m) * n
        rows, cols = self.grid(shape)
        return round(sparsity * rows * cols)

    def column_block(self, size: int) -> int:
        """The nearest column-block width >= ``size`` that no tile or group straddles."""
        step = self.nm[1] if self.nm else self.tile[1]
        return math.ceil(size / step) * step

    def pool(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-tile score: the sum of its (real) weights' saliencies."""
        r, c = self.tile
        if (r, c) == (1, 1):
            return scores
        rows, cols = self.grid(tuple(scores.shape))
        padded = F.pad(scores, (0, cols * c - scores.shape[1], 0, rows * r - scores.shape[0]))
        return padded.reshape(rows, r, cols, c).sum(dim=(1, 3))

    def expand(self, tiles: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Weight-level mask of a tile mask, cut to ``shape``."""
        r, c = self.tile
        if (r, c) == (1, 1):
            return tiles
        return tiles.repeat_interleave(r, 0).repeat_interleave(c, 1)[: shape[0], : shape[1]]

    def select(self, scores: torch.Tensor, count: int, forced: torch.Tensor | None = None) -> torch.Tensor:
        """Tile mask pruning ``forced`` plus the lowest-scoring tiles, ``count`` in all.

        ``scores`` are per weight; N:M ignores ``count`` and ``forced`` (one level only).
        """
        if self.nm:
            n, m = self.nm
            groups = scores.reshape(scores.shape[0], -1, m)
            lowest = groups.topk(n, dim=2, largest=False).indices
            return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(scores.shape)
        tile_scores = self.pool(scores).clone()
        if forced is not None:
            if int(forced.sum()) > count:
                raise InputError(f"{int(forced.sum())} tiles already pruned, more than the {count} asked for")
            tile_scores[forced] = -math.inf
        flat = torch.zeros(tile_scores.numel(), dtype=torch.bool)
        flat[tile_scores.flatten().topk(count, largest=False).indices] = True
        return flat.reshape(tile_scores.shape)


def quota(total: int, done: int, share: int, forced_here: int, forced_after: int, cap_here: int, cap_after: int) -> int:
    """Tiles to prune in one column block so that the whole matrix ends exactly at ``total``.

    ``share`` is the block's proportional target; it is clamped so that already-pruned
    (forced) tiles here and later still fit, and so that the later blocks can still
    reach the total. Invariants: ``done + forced_remaining <= total`` and
    ``total - done <= capacity_remaining`` (both hold initially and are kept).
    """
    low = max(forced_here, total - done - cap_after)
    high = min(cap_here, total - done - forced_after)
    return min(max(share, low), high)
