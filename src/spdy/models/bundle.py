"""What every model loader returns: the model, its calibration and held-out data, and its loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from spdy.models.data import fingerprint_batches


@dataclass
class ModelBundle:
    name: str
    model: nn.Module
    calibration: list
    heldout: list
    loss: str  # "cosine" | "kl" | "next-token" | "mse"
    include: list[str] | None = None
    meta: dict = field(default_factory=dict)
    calibration_labels: list | None = None  # one tensor per batch, for the "ce" loss
    heldout_labels: list | None = None
    tokenizer: Any = None  # text models: what made the batches, for tools that re-tokenize or decode

    @property
    def fingerprint(self) -> str:
        """Identifies model weights + calibration data, for cache keys."""
        return f"{self.name}:{fingerprint_batches(self.calibration)}"
