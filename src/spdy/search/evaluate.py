"""Candidate evaluation: how much a pruned model's outputs differ from the dense model's.

The search calls an :class:`Evaluator` hundreds of times, so the dense outputs are
computed once and the pruned weights are put in place by an ``apply`` callable (the
database's ``Stitcher.apply``), which copies only the units whose option changed since
the previous candidate; the caller restores the dense model when the search is done.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from spdy.errors import InputError
from spdy.units import call_model

LOSSES = ("cosine", "token-cosine", "kl", "next-token", "ce", "mse")
# (output, reference, batch) -> scalar; the reference is the dense model's output for the
# batch, or its labels for "ce", or None for "next-token" (the batch holds the targets).
LossFn = Callable[[torch.Tensor, torch.Tensor | None, Any], torch.Tensor]


def _cosine(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """1 - cosine similarity to the dense embeddings (sentence encoders)."""
    return 1.0 - F.cosine_similarity(out.flatten(1).double(), dense.flatten(1).double(), dim=-1).mean()


def _token_cosine(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """1 - cosine similarity per token of (batch, tokens, features) states, over the tokens the mask keeps."""
    per_token = 1.0 - F.cosine_similarity(out.double(), dense.double(), dim=-1)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """KL(dense || pruned) of the output distributions, per position (label-free)."""
    logp = F.log_softmax(out.double(), dim=-1).flatten(0, -2)
    logq = F.log_softmax(dense.double(), dim=-1).flatten(0, -2)
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean")


def next_token_labels(batch: Any) -> torch.Tensor:
    """Each position's next token, -100 (ignored) where the attention mask hides it."""
    labels = batch["input_ids"][:, 1:].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"][:, 1:] == 0] = -100
    return labels


def _next_token(out: torch.Tensor, dense: torch.Tensor | None, batch: Any) -> torch.Tensor:
    """Causal LM cross-entropy of each next token (the log of perplexity)."""
    return F.cross_entropy(out[:, :-1].flatten(0, 1).double(), next_token_labels(batch).flatten(), ignore_index=-100)


def _ce(out: torch.Tensor, labels: torch.Tensor, batch: Any) -> torch.Tensor:
    """Cross-entropy with the batch's labels."""
    return F.cross_entropy(out.double(), labels)


def _mse(out: torch.Tensor, dense: torch.Tensor, batch: Any) -> torch.Tensor:
    """Squared output error relative to the dense output's energy."""
    return (out.double() - dense.double()).pow(2).sum() / dense.double().pow(2).sum().clamp_min(1e-30)


_BUILTIN: dict[str, LossFn] = {"cosine": _cosine, "token-cosine": _token_cosine, "kl": _kl, "next-token": _next_token, "ce": _ce, "mse": _mse}


class Evaluator:
    """Scores the model as it currently stands (or with a profile applied) on fixed batches.

    ``loss`` is a built-in name or a callable ``(output, dense_output, batch) -> scalar``;
    ``labels`` (one tensor per batch) are needed by ``"ce"`` only. ``forward`` (batch -> tensor)
    is what gets compared, the model's output by default (e.g. a family's per-token states). ``reference_model``: the
    model whose outputs candidates are compared with, when not ``model`` as it stands now (a shrunk model's original,
    same inputs and outputs; compared on outputs only, so no ``forward``). Non-finite losses become
    ``inf`` with a warning, so a broken candidate never wins; a non-finite dense reference is
    broken input (every candidate would fail) and an ``InputError`` naming the ``split`` batch.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], loss: str | LossFn = "cosine",
                 apply: Callable[[Mapping[str, str]], object] | None = None, labels: Sequence[torch.Tensor] | None = None,
                 split: str = "evaluation", forward: Callable[[Any], torch.Tensor] | None = None,
                 reference_model: nn.Module | None = None):
        if isinstance(loss, str) and loss not in _BUILTIN:
            raise InputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable")
        if not batches:
            raise InputError("the evaluator needs at least one batch")
        if loss == "ce" and (labels is None or len(labels) != len(batches)):
            raise InputError("loss 'ce' needs labels: one tensor per batch")
        if reference_model is not None and forward is not None:
            raise InputError("a search signal other than the model's output is compared within one model, not with another (reference_model)")
        self.model, self.batches, self.loss, self.apply = model, list(batches), loss, apply
        self.forward = forward
        self.fn: LossFn = _BUILTIN[loss] if isinstance(loss, str) else loss
        self.calls = 0
        self.passes = 0  # batches run through the model (a pool's actors are asked how much they computed)
        self.stopped: Callable[[], bool] | None = None  # asked between batches: has the caller given up on this call?
        if loss == "ce":
            self.reference = list(labels)
        elif loss == "next-token":
            self.reference = [None] * len(self.batches)
        else:
            self.reference = [self._forward(b, reference_model) for b in self.batches]
        for i, reference in enumerate(self.reference):
            if isinstance(reference, torch.Tensor) and reference.is_floating_point() and not bool(torch.isfinite(reference).all()):
                what = "labels" if loss == "ce" else "dense model's output"
                raise InputError(f"the {what} for {split} batch {i} (of {len(self.batches)}) holds NaN or inf: every candidate's "
                                 f"loss would be non-finite; clean the data or fix the model before searching")

    @torch.no_grad()
    def _forward(self, batch: Any, model: nn.Module | None = None) -> torch.Tensor:
        out = self.forward(batch) if self.forward is not None else call_model(self.model if model is None else model, batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; spdy needs one tensor per batch (wrap the model)")
        return out

    @torch.no_grad()
    def batch_loss(self, index: int) -> float:
        """Loss of the model as it stands on batch ``index`` (may be NaN or inf)."""
        batch = self.batches[index]
        self.passes += 1
        return float(self.fn(self._forward(batch), self.reference[index], batch))

    @torch.no_grad()
    def score(self, limit: int | None = None) -> float:
        """Mean loss of the model as it stands over the first ``limit`` batches (all by default)."""
        losses = [self.batch_loss(i) for i in range(len(self.batches))[:limit]]
        value = sum(losses) / len(losses)
        if not math.isfinite(value):
            warnings.warn(f"candidate loss is {value}: treating it as failed (inf)", RuntimeWarning, stacklevel=2)
            return math.inf
        return value

    def __call__(self, profile: Mapping[str, str], limit: int | None = None) -> float:
        """Put ``profile`` in place with ``apply`` and score it (it stays in place)."""
        self._put(profile)
        return self.score(limit)

    def losses(self, profile: Mapping[str, str], start: int, stop: int) -> list[float]:
        """Put ``profile`` in place and return its loss on batches ``start..stop-1``, stopping after
        the first non-finite one (a broken candidate is not worth more batches). `Stopped` when ``stopped()`` says so."""
        self._put(profile)
        out: list[float] = []
        for i in range(start, min(stop, len(self.batches))):
            if self.stopped is not None and self.stopped():
                raise Stopped
            out.append(self.batch_loss(i))
            if not math.isfinite(out[-1]):
                break
        return out

    def _put(self, profile: Mapping[str, str]) -> None:
        if self.apply is None:
            raise InputError("this Evaluator has no apply function; use score() on the model as it stands")
        self.calls += 1
        self.apply(profile)


class Stopped(Exception):
    """An evaluation its caller gave up on (a `Pool` call whose result will not be read), left between two batches."""


def _warn_if_broken(loss: float) -> None:
    if not math.isfinite(loss):
        warnings.warn(f"candidate loss is {loss}: treating it as failed (inf)", RuntimeWarning, stacklevel=3)


# a search's objective: an Evaluator, a ``profile -> loss`` callable, or ``(profile, batches) -> loss``
Objective = Evaluator | Callable[..., float]


class Pool(Protocol):
    """Copies of the calibration `Evaluator` that score candidates in parallel (e.g. `spdy.cluster.RayCluster.pool`).

    The searches hand it independent candidates (a round's, or the local search's next tries as it
    will draw them) and replay the results in serial order, so a search with a pool returns what it
    returns without one, for the same seed."""

    width: int  # evaluations it runs at once

    def map(self, fn: Callable[[Evaluator, Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(evaluator, item) for item in items]``, each call on one of the pool's evaluators."""
        ...

    def imap(self, fn: Callable[[Evaluator, Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``fn(evaluator, item)`` for each item, yielded in order; an item is taken from ``items`` and sent as soon as an
        evaluator is free, so none waits for the slowest of a round. Calls in flight when the caller stops are stopped
        at their next batch (`Evaluator.stopped`)."""
        ...


def batch_losses(evaluator: Evaluator, request: tuple[Mapping[str, str], int, int]) -> list[float]:
    """`Evaluator.losses` for a ``(profile, start, stop)`` request: what a `Pool` runs for `MultiFidelity.prefetch`."""
    profile, start, stop = request
    return evaluator.losses(profile, start, stop)


class MultiFidelity:
    """Mean loss of a profile on its first ``b`` calibration batches, for growing ``b``, each batch
    computed once: scoring a candidate on 2 batches and later on all 8 costs 8 batch passes, not 10.

    The searches score most candidates on a few batches and only the promising ones on all
    (successive halving, early abandonment); this class makes the low fidelities cheap and the
    upgrade free of repeated work. With an :class:`Evaluator` losses are kept per batch; a
    ``(profile, batches) -> loss`` callable (``staged``) is called per fidelity; a plain
    ``profile -> loss`` callable has one fidelity (all its data). Every loss is remembered
    (different coefficients often give one profile) and, with :meth:`keep_log`, logged.
    """

    def __init__(self, evaluate: Objective, batches: int | None = None, staged: bool = False):
        self.evaluate = evaluate
        self.incremental = isinstance(evaluate, Evaluator)
        self.staged = staged and not self.incremental
        self.batches = len(evaluate.batches) if self.incremental else batches if staged and batches else 1
        self.memo: dict[tuple[str, ...], list[float] | dict[int, float]] = {}
        self.evaluations = 0  # distinct profiles scored at any fidelity
        self.batch_evaluations = 0  # batch passes, the real cost
        self.full_evaluations = 0  # profiles scored on all batches
        self.log: Path | None = None

    def _entry(self, key: tuple[str, ...]) -> list[float] | dict[int, float]:
        if key not in self.memo:
            self.memo[key] = [] if self.incremental else {}
            self.evaluations += 1
        return self.memo[key]

    def _prefix(self, batches: int | None) -> int:
        return self.batches if batches is None else max(1, min(batches, self.batches))

    @staticmethod
    def _missing(known: list[float], b: int) -> bool:
        """Are batches below ``b`` still to compute (none after a non-finite loss)?"""
        return len(known) < b and (not known or math.isfinite(known[-1]))

    def add(self, profile: Mapping[str, str], start: int, losses: Sequence[float]) -> None:
        """Record the per-batch ``losses`` of ``profile`` computed from batch ``start`` on (elsewhere, e.g.
        by a `Pool`), exactly as if `mean` had computed them here: counted, logged, overlap with what is known dropped."""
        key = tuple(profile.values())
        known = self._entry(key)
        new = list(losses)[len(known) - start:]
        if new:
            self._logged(key, len(known), new)
            self.batch_evaluations += len(new)
            known.extend(new)
            _warn_if_broken(new[-1])
            self.full_evaluations += len(known) == self.batches

    def mean(self, profile: Mapping[str, str], batches: int | None = None) -> float:
        """Mean loss on the first ``batches`` batches (all by default); NaN or inf -> inf."""
        b = self._prefix(batches)
        key = tuple(profile.values())
        known = self._entry(key)
        if self.incremental:
            if self._missing(known, b):
                self.add(profile, len(known), self.evaluate.losses(profile, len(known), b))
            value = sum(known[:b]) / b if len(known) >= b else math.inf
        else:
            if b not in known:
                known[b] = float(self.evaluate(profile, b) if self.staged else self.evaluate(profile))
                self._logged(key, b, known[b])
                self.batch_evaluations += b
                self.full_evaluations += b == self.batches
                _warn_if_broken(known[b])
            value = known[b]
        return value if math.isfinite(value) else math.inf

    def prefetch(self, profiles: Sequence[Mapping[str, str]], batches: int | None, pool: Pool | None) -> None:
        """Score ``profiles`` on their first ``batches`` batches in parallel on ``pool`` and record the losses in
        order, so that the `mean` calls a search then makes in that order compute nothing and count, log and
        return exactly what they would have computed one by one. Nothing to do without a pool, or when the
        objective is not an `Evaluator` (its losses are not per batch)."""
        if pool is None or not self.incremental:
            return
        b = self._prefix(batches)
        wanted: dict[tuple[str, ...], tuple[Mapping[str, str], int]] = {}
        for profile in profiles:
            key = tuple(profile.values())
            known = self.memo.get(key, [])
            if key not in wanted and self._missing(known, b):
                wanted[key] = (profile, len(known))
        results = pool.map(batch_losses, [(profile, start, b) for profile, start in wanted.values()])
        for (profile, start), losses in zip(wanted.values(), results):
            self.add(profile, start, losses)

    def known(self, profile: Mapping[str, str]) -> int:
        """The most batches ``profile`` has been scored on (0 if never)."""
        entry = self.memo.get(tuple(profile.values()))
        if not entry:
            return 0
        return len(entry) if isinstance(entry, list) else max(entry)

    def keep_log(self, path: Path | None, fresh: bool) -> None:
        """Append every loss computed from now on to ``path`` (JSON lines) and, unless ``fresh``, take
        back the losses an earlier, killed run logged there: a resumed search pays only for the
        evaluation that was in flight. A line cut short by the kill is ignored."""
        self.log = path
        if path is None:
            return
        if fresh:
            path.unlink(missing_ok=True)
            return
        kind = "batch" if self.incremental else "mean"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                tag, key, at, values = json.loads(line)
            except (ValueError, TypeError):
                continue
            if tag != kind:
                continue
            entry = self.memo.setdefault(tuple(key), [] if self.incremental else {})
            if self.incremental and len(entry) == at:
                entry.extend(float(v) for v in values)
            elif not self.incremental:
                entry[int(at)] = float(values)

    def _logged(self, key: tuple[str, ...], at: int, values: list[float] | float) -> None:
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(["batch" if self.incremental else "mean", list(key), at, values]) + "\n")


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
