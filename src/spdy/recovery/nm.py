"""N:M (e.g. 2:4) post-training pruning with little data: layer-wise masks, then global AdaPrune.

Every unit is pruned to the one N:M option with a database pruner (magnitude, AdaPrune or
OBS, each fitted to the dense model's inputs), the results are stitched into the model,
and gAP (:mod:`spdy.recovery.gap`) then fine-tunes the whole model against the dense one with the
masks held. Held-out quality is reported before and after gAP, with the bundle's own loss
against the dense model (and perplexity for causal LMs), so the two steps can be compared.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from spdy.models.data import fingerprint_batches
from spdy.database import Stitcher, build_database
from spdy.errors import InputError
from spdy.search.evaluate import Evaluator
from spdy.recovery.gap import GlobalAdaPrune
from spdy.levels import nm_sparsity, options_for
from spdy.models import ModelBundle
from spdy.units import Unit, set_weight_matrix


class HeldOut:
    """Scores any model of the bundle's architecture on the held-out batches against the
    dense model's outputs, which are computed once, here."""

    def __init__(self, bundle: ModelBundle, dense: nn.Module):
        if not bundle.heldout:
            raise InputError(f"MODEL {bundle.name!r} has no held-out batches; a module:function MODEL must return them as its third value")
        self.loss = bundle.loss
        self.evaluator = Evaluator(dense, bundle.heldout, bundle.loss, labels=bundle.heldout_labels)

    def __call__(self, model: nn.Module, suffix: str) -> dict[str, float]:
        self.evaluator.model = model  # the references stay the dense model's
        value = self.evaluator.score()
        result = {f"heldout_{suffix}": value}
        if self.loss == "next-token":
            result[f"perplexity_{suffix}"] = math.exp(value) if math.isfinite(value) else math.inf
        return result


def dense_copy(bundle: ModelBundle, units: Mapping[str, Unit], dense_weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """The bundle's model with the dense (out, in) weights of ``units`` put back: the teacher
    for gAP after a stitched profile (``Stitcher.dense`` holds exactly these weights)."""
    model = copy.deepcopy(bundle.model)
    teacher_units = {name: Unit(name, model.get_submodule(name), unit.kind) for name, unit in units.items()}
    missing = [name for name in units if name not in dense_weights]
    if missing:
        raise InputError(f"no dense weights for units {missing[:3]}")
    with torch.no_grad():
        for name, unit in teacher_units.items():
            set_weight_matrix(unit, dense_weights[name])
    return model


def finish_with_gap(bundle: ModelBundle, units: Mapping[str, Unit], dense: nn.Module | Mapping[str, torch.Tensor], epochs: int = 100,
                    lr: float = 1e-5, batch_size: int = 32, seed: int = 0, work_dir: str | os.PathLike | None = None,
                    progress: bool = True, heldout: HeldOut | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """gAP on ``bundle.model`` as it stands (e.g. a stitched SPDY profile), trained on the
    bundle's calibration batches against ``dense`` (the dense model, or the dense unit
    weights such as ``Stitcher.dense``). Changes ``bundle.model`` in place, every parameter.

    Returns held-out loss (and perplexity for causal LMs) before and after, and the fit's
    settings and per-epoch training losses. ``work_dir`` makes the fit resumable.
    """
    teacher = dense if isinstance(dense, nn.Module) else dense_copy(bundle, units, dense)
    heldout = heldout or HeldOut(bundle, teacher)
    result: dict[str, Any] = heldout(bundle.model, "before_gap")
    gap = GlobalAdaPrune(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_steps=max_steps, checkpoint_dir=work_dir, progress=progress)
    gap.fit(bundle.model, teacher, bundle.calibration, units)
    result.update(heldout(bundle.model, "after_gap"))
    result["gap"] = {"epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "seed": seed, "steps": gap.steps_,
                     "train_loss": gap.losses_}
    return result


def calibration_samples(batches: list) -> int:
    """Samples (sequences, images) in the calibration batches."""
    total = 0
    for batch in batches:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
        total += int(first.shape[0])
    return total


def nm_pattern_kept(units: Mapping[str, Unit], pattern: str) -> bool:
    """Whether every unit has at least N zeros in every group of M consecutive inputs."""
    n, m = (int(v) for v in pattern.split(":"))
    for unit in units.values():
        w = unit.module.weight.detach()
        w = w.t() if unit.kind == "conv1d" else w.reshape(w.shape[0], -1)
        if int((w.reshape(w.shape[0], -1, m) == 0).sum(-1).min()) < n:
            return False
    return True


def prune_nm(bundle: ModelBundle, units: Mapping[str, Unit], pattern: str = "2:4", pruner: str = "obs", gap: bool = True,
             work_dir: str | os.PathLike = "spdy-nm", epochs: int = 100, lr: float = 1e-5, batch_size: int = 32, seed: int = 0,
             progress: bool = True, max_steps: int | None = None, pruner_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Prune every unit of ``bundle.model`` to ``pattern`` in place, then (``gap``) run gAP.

    ``pruner_params`` go to the pruner (e.g. ``{"refine": 0}`` makes OBS plain SparseGPT).
    The database and the gAP checkpoint live under ``work_dir`` in folders named after the
    model, pruner, pattern and calibration data, so an interrupted run resumes and a run on
    other data starts fresh. ``samples`` in the result counts the calibration samples.
    """
    nm_sparsity(pattern)  # a clear error for anything but N:M
    work = Path(work_dir)
    params = dict(pruner_params or {})
    variant = "".join(f"-{key}{value}" for key, value in sorted(params.items()))
    tag = f"{bundle.name}-{pruner}{variant}-{pattern.replace(':', 'of')}-{fingerprint_batches(bundle.calibration)[:10]}"
    teacher = copy.deepcopy(bundle.model)
    heldout = HeldOut(bundle, teacher)
    result: dict[str, Any] = {"model": bundle.name, "pattern": pattern, "pruner": pruner, "pruner_params": params,
                              "samples": calibration_samples(bundle.calibration),
                              "units": len(units), "loss": bundle.loss, **heldout(teacher, "dense")}
    options = options_for(pattern)
    db = build_database(bundle.model, dict(units), bundle.calibration, options, work / f"db-{tag}", pruner=pruner, progress=progress,
                        **params)
    Stitcher(units, db).apply({name: options[-1].key for name in units})
    if gap:
        result.update(finish_with_gap(bundle, units, teacher, epochs, lr, batch_size, seed, work / f"gap-{tag}", progress, heldout, max_steps))
    else:
        result.update(heldout(bundle.model, "before_gap"))
        result["heldout_after_gap"] = None
        if bundle.loss == "next-token":
            result["perplexity_after_gap"] = None
    result["pattern_kept"] = nm_pattern_kept(units, pattern)
    return result
