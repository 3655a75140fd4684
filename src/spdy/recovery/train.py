"""Fine-tuning loop for gradual pruning, with checkpoints that resume bit-exactly.

The model trains in eval mode (dropout off, batch-norm statistics of the dense model kept,
as SPDY scores its profiles), so the only randomness is the batch order, drawn per epoch
from ``seed``: a resumed run replays exactly what the uninterrupted one would have done.

A work directory holds ``recipe.json`` (what is being run), ``model.safetensors`` and
``state.safetensors`` (optimizer moments, masks, OBS Hessians) and ``progress.json`` (the
step reached), written in that order with atomic renames; the step is also stamped in each
tensor file's metadata, so a half-written checkpoint is detected instead of resumed.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.recovery.distill import DistillLoss
from spdy.files import replace_atomically, write_json
from spdy.recovery.gradual import GradualPruner, Recipe, prune_lowest
from spdy.units import Unit


@dataclass
class TrainConfig:
    """Optimizer and loss settings; stored in the recipe's ``training`` so a recipe re-runs as it ran."""

    lr: float = 1e-4
    seed: int = 0
    distill: str = "kl"
    task: float = 1.0
    output: float = 1.0
    layer: float = 0.0
    temperature: float = 2.0
    checkpoint_every: int = 50

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe training") -> "TrainConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"{source}: unknown training keys {unknown}")
        return cls(**data)


def batch_order(step: int, batches: int, seed: int) -> int:
    """The batch trained at ``step``: a fresh permutation each epoch, a pure function of (step, seed)."""
    epoch, position = divmod(step, batches)
    return int(torch.randperm(batches, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[position])


class Checkpoint:
    """The files of one run in ``directory``; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, recipe: Recipe):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        recipe_path = self.dir / "recipe.json"
        if recipe_path.is_file() and (self.dir / "progress.json").is_file():
            if json.loads(recipe_path.read_text()) != recipe.to_dict():
                raise InputError(f"work dir {self.dir} holds a run of another recipe ({recipe_path}); use another --work-dir or delete it")
        write_json(recipe_path, recipe.to_dict())

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, pruner: GradualPruner) -> None:
        meta = {"step": str(step)}
        replace_atomically(self.dir / "model.safetensors", lambda p: save_model(model, str(p), metadata=meta))
        state, groups = _optimizer_tensors(optimizer)
        tensors = {**state, **{f"mask/{n}": m for n, m in pruner.mask_tensors().items()},
                   **{f"hessian/{n}": h for n, h in pruner.hessian_tensors().items()}}
        replace_atomically(self.dir / "state.safetensors", lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))
        write_json(self.dir / "progress.json", {"step": step, "param_groups": groups})

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, pruner: GradualPruner) -> int:
        """Restore the last checkpoint; returns the step to continue from (0 when there is none)."""
        progress = self.dir / "progress.json"
        if not progress.is_file():
            return 0
        info = json.loads(progress.read_text())
        step = int(info["step"])
        for name in ("model.safetensors", "state.safetensors"):
            with safe_open(str(self.dir / name), "pt") as f:
                stamped = (f.metadata() or {}).get("step")
            if stamped != str(step):
                raise InputError(f"checkpoint {self.dir / name} is from step {stamped}, progress.json says {step}: "
                                 f"the run was interrupted while saving; delete {self.dir} to start over")
        load_model(model, str(self.dir / "model.safetensors"), strict=True)
        tensors = load_file(str(self.dir / "state.safetensors"))
        optimizer.load_state_dict(_optimizer_state(tensors, info["param_groups"]))
        pruner.load_masks({k[len("mask/"):]: v for k, v in tensors.items() if k.startswith("mask/")})
        pruner.load_hessians({k[len("hessian/"):]: v for k, v in tensors.items() if k.startswith("hessian/")})
        return step


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state as flat tensors ``opt/<param index>/<key>`` plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {f"opt/{i}/{k}": (v if isinstance(v, torch.Tensor) else torch.tensor(v)) for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, sd["param_groups"]


def _optimizer_state(tensors: Mapping[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def fine_tune(model: nn.Module, units: Mapping[str, Unit], recipe: Recipe, batches: Sequence[Any],
              labels: Sequence[torch.Tensor] | None = None, config: TrainConfig | None = None, work_dir: str | os.PathLike | None = None,
              teacher: nn.Module | None = None, until: int | None = None, progress: bool = True) -> GradualPruner:
    """Prune ``model`` in place along ``recipe`` while training on ``batches`` against the dense ``teacher``.

    ``teacher`` defaults to a copy of ``model`` as it is on entry (pass the dense model when
    resuming). With ``work_dir`` the run checkpoints every ``config.checkpoint_every`` steps
    and at the end, and resumes from there; ``until`` stops after that many steps in all
    (checkpointed), for time-boxed jobs. Returns the pruner (its hooks removed).
    """
    config = config or TrainConfig()
    if not batches:
        raise InputError("fine_tune: no training batches")
    if labels is not None and len(labels) != len(batches):
        raise InputError(f"fine_tune: {len(labels)} label tensors for {len(batches)} batches")
    teacher = teacher if teacher is not None else copy.deepcopy(model)
    model.eval()
    pruner = GradualPruner(units, recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = DistillLoss(model, teacher, list(recipe.targets), config.distill, config.task, config.output, config.layer, config.temperature)
    checkpoint = Checkpoint(work_dir, recipe) if work_dir is not None else None
    start = checkpoint.load(model, optimizer, pruner) if checkpoint else 0
    stop = recipe.total_steps if until is None else min(until, recipe.total_steps)
    bar = progress_bar(range(start, stop), initial=start, total=recipe.total_steps, disable=not progress, desc="gradual", leave=False)
    try:
        for step in bar:
            pruner.update(step, optimizer)
            i = batch_order(step, len(batches), config.seed)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(batches[i], labels[i] if labels is not None else None)
            loss.backward()
            optimizer.step()
            pruner.enforce()
            if progress:
                bar.set_postfix(loss=f"{float(loss):.4g}", sparsity=f"{_overall(pruner):.3f}", refresh=False)
            if checkpoint and (step + 1) % config.checkpoint_every == 0 and step + 1 < stop:
                checkpoint.save(step + 1, model, optimizer, pruner)
        if checkpoint and stop > start:
            checkpoint.save(stop, model, optimizer, pruner)
    finally:
        bar.close()
        loss_fn.remove()
        pruner.remove()
    return pruner


def _overall(pruner: GradualPruner) -> float:
    """Fraction of pruned weights over all units."""
    total = sum(m.numel() for m in pruner.masks.values())
    return sum(int((~m).sum()) for m in pruner.masks.values()) / total


@torch.no_grad()
def one_shot(units: Mapping[str, Unit], targets: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Magnitude-prune each unit to exactly its target in place; returns the dense weights to restore."""
    saved = {}
    for name, sparsity in targets.items():
        weight = units[name].module.weight
        saved[name] = weight.detach().clone()
        weight.mul_(prune_lowest(weight.abs(), round(sparsity * weight.numel())))
    return saved


@torch.no_grad()
def restore(units: Mapping[str, Unit], saved: Mapping[str, torch.Tensor]) -> None:
    for name, weight in saved.items():
        units[name].module.weight.copy_(weight)


def default_distill(loss: str) -> str:
    """The output distillation that matches a model's evaluation loss."""
    return {"cosine": "cosine", "mse": "mse"}.get(loss, "kl")


def gradual_prune(bundle, units: Mapping[str, Unit], recipe: Recipe, config: TrainConfig, work_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``bundle.model`` along ``recipe`` on its calibration batches; held-out loss before (one-shot) and after.

    ``heldout_before`` is the held-out loss of the model one-shot magnitude-pruned to the
    recipe's final targets (what fine-tuning starts from), ``heldout_dense`` that of the dense
    model; for labelled models the top-1 accuracies come too. The model stays pruned.
    """
    from spdy.search.evaluate import Evaluator

    if not bundle.heldout:
        raise InputError(f"model {bundle.name!r} has no held-out batches to evaluate on")
    model = bundle.model
    heldout = Evaluator(model, bundle.heldout, bundle.loss, labels=bundle.heldout_labels)
    teacher = copy.deepcopy(model)
    result: dict[str, Any] = {"heldout_dense": heldout.score()}
    accuracy = bundle.heldout_labels is not None
    if accuracy:
        from spdy.models.digits import accuracy as top1

        result["accuracy_dense"] = top1(model, bundle.heldout, bundle.heldout_labels)
    saved = one_shot(units, recipe.targets)
    result["heldout_before"] = heldout.score()
    if accuracy:
        result["accuracy_before"] = top1(model, bundle.heldout, bundle.heldout_labels)
    restore(units, saved)
    pruner = fine_tune(model, units, recipe, bundle.calibration, bundle.calibration_labels, config, work_dir, teacher, progress=progress)
    model.eval()
    result["heldout_after"] = heldout.score()
    if accuracy:
        result["accuracy_after"] = top1(model, bundle.heldout, bundle.heldout_labels)
    result["sparsity"] = pruner.measured()
    return result
