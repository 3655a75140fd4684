"""AdaPrune: magnitude mask, then Adam on the layer's relative output error with the mask fixed.

This is the reference implementation's database pruner, kept for comparison with OBS.
The loss per batch of input rows ``x`` is ``||W_p x - W x||^2 / ||W x||^2`` with ``W``
the dense weight, so every level is fitted to the dense layer's outputs.

Hyperparameters follow the paper (Adam, lr 1e-3, 10 passes) translated from images to
rows: the reference used 1024 samples in batches of 32; a token (or conv position) is a
row here, so we keep ``samples`` random input rows per unit (default 4096) and step on
batches of ``batch`` rows (default 128): 10 passes give 320 steps, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spdy.database.capture import UnitStats
from spdy.database.patterns import Pattern
from spdy.database.pruners import Pruner, magnitude_mask
from spdy.errors import InputError


@dataclass
class AdaPrune(Pruner):
    name: ClassVar[str] = "adaprune"
    lr: float = 1e-3
    samples: int = 4096
    batch: int = 128
    passes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.samples < 1 or self.batch < 1 or self.passes < 0:
            raise InputError(f"adaprune needs lr > 0, samples >= 1, batch >= 1, passes >= 0; got {self.params()}")

    @property
    def rows(self) -> int:
        return self.samples

    def prepare(self, W: torch.Tensor, stats: UnitStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if stats.rows is None:
            raise InputError("adaprune needs input rows: capture with rows > 0")
        X = stats.rows
        return X, W, (X @ W.t()).square().sum(1)

    def step(self, ctx: tuple[torch.Tensor, torch.Tensor, torch.Tensor], W: torch.Tensor, prev: torch.Tensor | None, pattern: Pattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        X, dense, target_norms = ctx
        tiles = magnitude_mask(W, prev, pattern, sparsity)
        keep = ~pattern.expand(tiles, tuple(W.shape))
        weight = (W * keep).requires_grad_()
        optimizer = torch.optim.Adam([weight], lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.enable_grad():
            for _ in range(self.passes):
                for idx in torch.randperm(X.shape[0], generator=generator).split(self.batch):
                    delta = X[idx] @ (weight * keep - dense).t()
                    loss = delta.square().sum() / target_norms[idx].sum().clamp(min=1e-12)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        return (weight * keep).detach(), tiles
