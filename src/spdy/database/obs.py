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

The sweep only corrects columns to the *right* of each pruned weight. With the mask fixed,
the best remaining weights solve a least-squares problem per row, ``P H P w = P H w_dense``
(``P`` the row's mask); ``refine`` iterations of Jacobi-preconditioned conjugate gradients,
batched over rows, get close to it for one (out, in) x (in, in) product each (sparse:
the directions are zero off the mask, see `obs_kernels`). On MiniLM
this cuts the error by a fifth at 70-90% sparsity, below AdaPrune's; a row keeps its
swept weights if CG did not lower its error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from spdy.database.capture import UnitStats
from spdy.database.obs_kernels import MaskedRows, prune_block
from spdy.database.patterns import Pattern, quota
from spdy.database.pruners import Pruner
from spdy.errors import InputError


@dataclass
class OBS(Pruner):
    """``damp``: fraction of the mean Hessian diagonal added for stability; ``block``: columns
    per mask block; ``refine``: conjugate-gradient iterations after the sweep (0: plain SparseGPT)."""

    name: ClassVar[str] = "obs"
    damp: float = 0.01
    block: int = 128
    refine: int = 10

    def __post_init__(self) -> None:
        if not self.damp > 0 or self.block < 1 or self.refine < 0:
            raise InputError(f"obs needs damp > 0, block >= 1 and refine >= 0, got {self.params()}")

    def prepare(self, W: torch.Tensor, stats: UnitStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dampened Hessian, ``U`` (upper Cholesky factor of its inverse) and the dense weight, float32."""
        H = stats.hessian.clone()
        dead = H.diagonal() == 0  # inputs that are always zero: any weight there is free
        H[dead, dead] = 1.0
        H.diagonal().add_(self.damp * H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(H)
        if info:
            raise InputError(f"the Hessian is not positive definite even with damp={self.damp}; use a larger damp")
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        return H.float(), U.float(), W

    def step(self, ctx: tuple[torch.Tensor, torch.Tensor, torch.Tensor], W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        H, U, dense = ctx
        tiles = torch.zeros(pattern.grid(tuple(W.shape)), dtype=torch.bool)
        W = self.sweep(U, W, prev, pattern, sparsity, tiles)
        keep = ~pattern.expand(tiles, tuple(W.shape))
        return self.least_squares(H, dense, W, keep), tiles

    def sweep(self, U: torch.Tensor, W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float, tiles: torch.Tensor) -> torch.Tensor:
        """SparseGPT's pass over the columns; fills ``tiles`` with the chosen mask."""
        W = W.clone()
        cols = W.shape[1]
        total = pattern.count(tuple(W.shape), sparsity)
        grid_rows, grid_cols = tiles.shape
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

            errors = prune_block(W1, U1, mask)  # column by column, each column's error onto the block's later ones

            # then the whole block's error onto every later column at once
            W[:, i1:i2] = W1
            W[:, i2:] -= errors @ U[i1:i2, i2:]
        return W

    def least_squares(self, H: torch.Tensor, dense: torch.Tensor, W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Minimise each row's ``(w - w_dense) H (w - w_dense)^T`` on its mask by preconditioned CG, from ``W``."""
        if not self.refine:
            return W

        product = MaskedRows(keep, H)
        drop = -keep.to(H.dtype)  # r = -G on the mask, 0 off it
        inverse_diag = 1.0 / H.diagonal()
        X = W.clone()
        G = (X - dense) @ H  # each row's error gradient, kept up to date instead of recomputed
        before = (G * (X - dense)).sum(1, keepdim=True)
        r = G * drop
        z = r * inverse_diag
        p, rz = z, (r * z).sum(1, keepdim=True)
        for _ in range(self.refine):
            Hp = product(p)  # whole rows, for G; p is zero off the mask
            alpha = rz / (p * Hp).sum(1, keepdim=True).clamp(min=1e-30)
            X.addcmul_(alpha, p)
            G.addcmul_(alpha, Hp)
            torch.mul(G, drop, out=r)
            z = r * inverse_diag
            rz, previous = (r * z).sum(1, keepdim=True), rz
            p.mul_(rz / previous.clamp(min=1e-30)).add_(z)
        after = (G * (X - dense)).sum(1, keepdim=True)
        return torch.where(after < before, X, W)
