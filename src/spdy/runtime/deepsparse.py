"""Run models on DeepSparse: what a profile timed on the ``deepsparse`` backend deploys to.

A table timed on DeepSparse promises DeepSparse's speedup, so its profile is checked there:
the dense model and the pruned copy (zeros in its weights, which DeepSparse finds and skips
by itself) are exported to ONNX as the timing backend exports them, compiled into one engine
each, and run alternately on the same numpy inputs. The pruned engine's output is checked
against the masked dense torch model (fp32 both, sums in another order).

Needs ``deepsparse==1.8.0`` (its own environment: ``make .venv-ds/.installed``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spdy.runtime.timer import time_alternating
from spdy.runtime.onnx import export_onnx, import_deepsparse


class DeepSparseModel:
    """A torch model exported to ONNX and compiled by DeepSparse for one batch shape."""

    def __init__(self, model: nn.Module, batch: Any, threads: int, path: Path):
        deepsparse = import_deepsparse()
        self.inputs = export_onnx(model, batch, path)
        self.engine = deepsparse.Engine(model=str(path), batch_size=int(self.inputs[0].shape[0]), num_cores=threads)

    def __call__(self) -> list[np.ndarray]:
        """The engine's outputs on the exported batch."""
        return self.engine.run(self.inputs)


@dataclass
class EngineComparison:
    """Per-call seconds of the dense and pruned engines, alternated round by round, and the
    pruned engine's relative max error against the masked torch model."""

    dense: list[float]
    pruned: list[float]
    output_error: float


def compare(dense: nn.Module, pruned: nn.Module, batch: Any, reference: torch.Tensor, threads: int, rounds: int) -> EngineComparison:
    """Compile ``dense`` and ``pruned`` on DeepSparse with ``threads`` cores and time them alternately on ``batch``.

    ``reference``: the first output tensor of the masked torch model on ``batch``.
    """
    with tempfile.TemporaryDirectory(prefix="spdy-deepsparse-verify-") as tmp:  # the engines may read their files while they live
        dense_engine = DeepSparseModel(dense, batch, threads, Path(tmp) / "dense.onnx")
        pruned_engine = DeepSparseModel(pruned, batch, threads, Path(tmp) / "pruned.onnx")
        out = torch.from_numpy(np.asarray(pruned_engine()[0]))
        expected = reference.detach().float().reshape(out.shape)
        error = float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        samples = time_alternating({"dense": dense_engine, "pruned": pruned_engine}, rounds)
    return EngineComparison(samples["dense"], samples["pruned"], error)
