"""Candidate evaluation: how much a pruned model's outputs differ from the dense model's.

The search calls an :class:`Evaluator` hundreds of times, so the dense outputs are
computed once and the pruned weights are put in place by an ``apply`` callable (the
database's ``Stitcher.apply``), which copies only the units whose option changed since
the previous candidate; the caller restores the dense model when the search is done.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from spdy.errors import InputError
from spdy.units import call_model

LOSSES = ("cosine", "kl", "next-token", "ce", "mse")
# (output, reference, batch) -> scalar; the reference is the dense model's output for the
# batch, or its labels for "ce", or None for "next-token" (the batch holds the targets).
LossFn = Callable[[torch.Tensor, torch.Tensor | None, Any], torch.Tensor]


def _cosine(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """1 - cosine similarity to the dense embeddings (sentence encoders)."""
    return 1.0 - F.cosine_similarity(out.flatten(1).double(), dense.flatten(1).double(), dim=-1).mean()


def _kl(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """KL(dense || pruned) of the output distributions, per position (label-free)."""
    logp = F.log_softmax(out.double(), dim=-1).flatten(0, -2)
    logq = F.log_softmax(dense.double(), dim=-1).flatten(0, -2)
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean")


def _next_token(out: torch.Tensor, dense: torch.Tensor | None, batch: Any) -> torch.Tensor:
    """Causal LM cross-entropy of each next token (the log of perplexity)."""
    ids = batch["input_ids"]
    labels = ids[:, 1:].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"][:, 1:] == 0] = -100
    return F.cross_entropy(out[:, :-1].flatten(0, 1).double(), labels.flatten(), ignore_index=-100)


def _ce(out: torch.Tensor, labels: torch.Tensor, batch: Any) -> torch.Tensor:
    """Cross-entropy with the batch's labels."""
    return F.cross_entropy(out.double(), labels)


def _mse(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """Squared output error relative to the dense output's energy."""
    return (out.double() - dense.double()).pow(2).sum() / dense.double().pow(2).sum().clamp_min(1e-30)


_BUILTIN: dict[str, LossFn] = {"cosine": _cosine, "kl": _kl, "next-token": _next_token, "ce": _ce, "mse": _mse}


class Evaluator:
    """Scores the model as it currently stands (or with a profile applied) on fixed batches.

    ``loss`` is a built-in name or a callable ``(output, dense_output, batch) -> scalar``;
    ``labels`` (one tensor per batch) are needed by ``"ce"`` only. Non-finite losses become
    ``inf`` with a warning, so a broken candidate never wins; a non-finite dense reference is
    broken input (every candidate would fail) and an ``InputError`` naming the ``split`` batch.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], loss: str | LossFn = "cosine",
                 apply: Callable[[Mapping[str, str]], object] | None = None, labels: Sequence[torch.Tensor] | None = None,
                 split: str = "evaluation"):
        if isinstance(loss, str) and loss not in _BUILTIN:
            raise InputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable")
        if not batches:
            raise InputError("the evaluator needs at least one batch")
        if loss == "ce" and (labels is None or len(labels) != len(batches)):
            raise InputError("loss 'ce' needs labels: one tensor per batch")
        self.model, self.batches, self.loss, self.apply = model, list(batches), loss, apply
        self.fn: LossFn = _BUILTIN[loss] if isinstance(loss, str) else loss
        self.calls = 0
        if loss == "ce":
            self.reference = list(labels)
        elif loss == "next-token":
            self.reference = [None] * len(self.batches)
        else:
            self.reference = [self._forward(b) for b in self.batches]
        for i, reference in enumerate(self.reference):
            if isinstance(reference, torch.Tensor) and reference.is_floating_point() and not bool(torch.isfinite(reference).all()):
                what = "labels" if loss == "ce" else "dense model's output"
                raise InputError(f"the {what} for {split} batch {i} (of {len(self.batches)}) holds NaN or inf: every candidate's "
                                 f"loss would be non-finite; clean the data or fix the model before searching")

    @torch.no_grad()
    def _forward(self, batch: Any) -> torch.Tensor:
        out = call_model(self.model, batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; spdy needs one tensor per batch (wrap the model)")
        return out

    @torch.no_grad()
    def score(self, limit: int | None = None) -> float:
        """Mean loss of the model as it stands over the first ``limit`` batches (all by default)."""
        total, count = 0.0, 0
        for batch, reference in list(zip(self.batches, self.reference))[:limit]:
            total += float(self.fn(self._forward(batch), reference, batch))
            count += 1
        value = total / count
        if not math.isfinite(value):
            warnings.warn(f"candidate loss is {value}: treating it as failed (inf)", RuntimeWarning, stacklevel=2)
            return math.inf
        return value

    def __call__(self, profile: Mapping[str, str], limit: int | None = None) -> float:
        """Put ``profile`` in place with ``apply`` and score it (it stays in place)."""
        if self.apply is None:
            raise InputError("this Evaluator has no apply function; use score() on the model as it stands")
        self.calls += 1
        self.apply(profile)
        return self.score(limit)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Any]) -> None:
    """Re-estimate batch-norm statistics of a pruned model on calibration batches.

    By default pruned models keep the dense model's statistics, as in the paper.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for batch in batches:
            call_model(model, batch)
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
