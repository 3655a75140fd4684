"""Closed-form second-order (OBS) pruning with reconstruction, as in SparseGPT.

The layer-wise loss ``||W_p X - W X||^2`` has Hessian ``H = X X^T`` (per output row).
Removing weight ``w_q`` of a row and optimally updating the row's remaining weights
costs ``w_q^2 / [H^-1]_qq`` and changes them by ``-w_q / [H^-1]_qq * H^-1[:, q]``.
SparseGPT makes this cheap for all rows at once by pruning columns left to right: with
``U`` the upper Cholesky factor of ``H^-1``, the inverse Hessian of the columns still to
come is read off row ``i`` of ``U``, so each column's error is pushed onto the later
columns with one rank-1 update. Masks are chosen per block of columns (128) by
``w^2 / U_ii^2``, after earlier blocks' updates, and errors are pushed to later blocks
in one matrix product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from spdy.database.capture import UnitStats
from spdy.database.patterns import Pattern, quota
from spdy.database.pruners import Pruner


@dataclass
class OBS(Pruner):
    """``damp``: fraction of the mean Hessian diagonal added for stability; ``block``: columns per mask block."""

    name: ClassVar[str] = "obs"
    damp: float = 0.01
    block: int = 128

    def __post_init__(self) -> None:
        if not self.damp > 0 or self.block < 1:
            raise ValueError(f"obs needs damp > 0 and block >= 1, got damp={self.damp}, block={self.block}")

    def prepare(self, W: torch.Tensor, stats: UnitStats) -> torch.Tensor:
        """``U``: upper Cholesky factor of the dampened inverse Hessian (float32)."""
        H = stats.hessian.clone()
        dead = H.diagonal() == 0  # inputs that are always zero: any weight there is free
        H[dead, dead] = 1.0
        H.diagonal().add_(self.damp * H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(H)
        if info:
            raise ValueError(f"the Hessian is not positive definite even with damp={self.damp}; use a larger damp")
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()

    def step(self, U: torch.Tensor, W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        W = W.clone()
        cols = W.shape[1]
        total = pattern.count(tuple(W.shape), sparsity)
        grid_rows, grid_cols = pattern.grid(tuple(W.shape))
        tiles = torch.zeros(grid_rows, grid_cols, dtype=torch.bool)
        forced = prev if prev is not None else tiles.clone()
        forced_per_col = forced.sum(0)
        width, tile_cols = pattern.column_block(self.block), pattern.tile[1]
        done = 0
        for i1 in range(0, cols, width):
            i2 = min(i1 + width, cols)
            t1, t2 = i1 // tile_cols, math.ceil(i2 / tile_cols)
            W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]

            # choose this block's mask on the weights as updated so far
            scores = W1.square() / U1.diagonal().square()
            here = quota(
                total, done, round(total * t2 / grid_cols) - done,
                int(forced_per_col[t1:t2].sum()), int(forced_per_col[t2:].sum()),
                grid_rows * (t2 - t1), grid_rows * (grid_cols - t2),
            )
            tiles[:, t1:t2] = pattern.select(scores, here, forced[:, t1:t2])
            done += here
            mask = pattern.expand(tiles[:, t1:t2], tuple(W1.shape))

            # prune column by column, pushing each column's error onto the block's later columns
            errors = torch.zeros_like(W1)
            for i in range(i2 - i1):
                q = W1[:, i].masked_fill(mask[:, i], 0.0)
                errors[:, i] = (W1[:, i] - q) / U1[i, i]
                W1[:, i:] -= errors[:, i : i + 1] * U1[i : i + 1, i:]
                W1[:, i] = q

            # then the whole block's error onto every later column at once
            W[:, i1:i2] = W1
            W[:, i2:] -= errors @ U[i1:i2, i2:]
        return W, tiles
