"""What every model loader returns: the model, its calibration and held-out data, and its loss."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator

import torch
from torch import nn

from spdy.errors import InputError
from spdy.models.data import fingerprint_batches
from spdy.models.workload import Workload, workload_batch
from spdy.units import call_model

SAMPLED = 4096  # elements of each tensor the weight fingerprint reads


def model_fingerprint(model: nn.Module) -> str:
    """A cheap, run-stable hash of every parameter and buffer: names, shapes, dtypes and an evenly
    strided sample of each tensor's values (whole tensors up to ``SAMPLED`` elements). Two models
    of the same shapes but other weights (another seed, fine-tuned, pruned) differ in it."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED)][:SAMPLED].contiguous()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(place, tensor) for every tensor in a batch or model output: a tensor, a dict or a sequence."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}[{i}]")


def _non_finite(value: Any, where: str) -> str | None:
    """Where ``value`` first holds NaN or inf, and how much of it; None when all is finite."""
    for place, t in _tensors(value, where):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"{place} holds {bad} NaN or inf value{'s' if bad > 1 else ''} (of {t.numel()})"
    return None


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
    # batches from the calibration source, disjoint from the calibration batches: the search picks its final profile on them
    validation: list = field(default_factory=list)
    validation_labels: list | None = None
    # batches the database's statistics (Hessians) come from, disjoint from the calibration batches: a reconstruction
    # fits the data it was solved on, so a search scored on that same data is told pruned layers are better than they are
    database: list = field(default_factory=list)
    # richer signals than the output the family offers the search: loss name -> what it compares (e.g. a pooled
    # encoder's per-token states, "token-cosine"); ``search_loss`` picks one, None: the output with ``loss``
    signals: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    search_loss: str | None = None
    # what the deployed model is timed and verified on (None: the first calibration batch); causal LMs decode
    workload: Workload | None = None
    # the model pruned versions are compared with, in speed and in output, when not ``model`` itself: the original
    # that ``model`` was shrunk from (`spdy.pipeline.shrink_first`)
    reference: nn.Module | None = None

    @property
    def dense_reference(self) -> nn.Module:
        """The dense model every speedup and loss is over: ``reference``, else ``model``."""
        return self.model if self.reference is None else self.reference

    @cached_property
    def timing_batch(self) -> Any:
        """The batch that runs the workload (built once: a decode step fills its KV cache)."""
        return workload_batch(self, self.workload)

    @property
    def objective(self) -> str:
        """The loss the search minimises."""
        return self.search_loss or self.loss

    @property
    def search_output(self) -> Callable[[Any], Any] | None:
        """What the search compares with the dense model: a signal's, or (None) the model's output."""
        return self.signals.get(self.search_loss) if self.search_loss else None

    def search_on(self, loss: str | None) -> None:
        """Search on ``loss``: the model's own, one of its ``signals``, or None (the model's own)."""
        if loss not in (None, self.loss, *self.signals):
            raise InputError(f"--search-loss {loss!r}: {self.name} offers {', '.join([self.loss, *self.signals])}")
        self.search_loss = None if loss == self.loss else loss

    @property
    def statistics(self) -> list:
        """What the database and the input-norm baselines are computed on: the database batches, else the calibration ones."""
        return self.database or self.calibration

    @property
    def fingerprint(self) -> str:
        """Identifies model weights + calibration and database data, for cache keys."""
        return f"{self.name}:{model_fingerprint(self.model)}:{fingerprint_batches(self.calibration + self.database)}"

    @torch.no_grad()
    def check(self) -> None:
        """Refuse NaN or inf in the data (and labels) of either split, and a dense model whose output on
        the calibration data is already non-finite: every loss would be NaN, so every search would
        silently return its starting point and every database error would read 0."""
        splits = (("calibration", self.calibration, self.calibration_labels), ("validation", self.validation, self.validation_labels),
                  ("database", self.database, None), ("heldout", self.heldout, self.heldout_labels))
        for split, batches, labels in splits:
            for i, batch in enumerate(batches):
                label = labels[i] if labels is not None and i < len(labels) else None
                if problem := _non_finite(batch, "input") or _non_finite(label, "labels"):
                    raise InputError(f"{self.name}: {split} batch {i} (of {len(batches)}): {problem}; clean or drop that data")
        for i, batch in enumerate(self.calibration):
            if problem := _non_finite(call_model(self.model, batch), "output"):
                raise InputError(f"{self.name}: the dense model's output on calibration batch {i} (of {len(self.calibration)}) is "
                                 f"already non-finite: {problem}; fix the model's weights (or its dtype's range) before pruning it")
