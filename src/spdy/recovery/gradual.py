"""Gradual magnitude pruning towards per-unit targets (SPDY section 7).

One-shot pruning to a SPDY profile loses accuracy that fine-tuning can win back; pruning
*during* fine-tuning loses less, because the network adapts while weights go. Each unit
``l`` follows the cubic schedule of Zhu & Gupta (2017) from ``initial`` to its own final
sparsity ``s_l`` over ``steps`` optimizer steps starting at ``start``:

    s_l(t) = s_l + (initial - s_l) * (1 - (t - start) / steps) ** 3,   start <= t <= start + steps

(``initial`` is capped at ``s_l``, so a unit never overshoots its target). Every
``update_every`` steps, and always at the last step of the schedule, each unit's mask
drops the lowest-scoring weights still alive until exactly ``round(s_l(t) * numel)`` are
pruned. Masks never regrow: pruned weights are excluded from the ranking, their gradients
are zeroed by a hook, the weights are re-zeroed after each optimizer step, and their Adam
moments are reset to zero when they are pruned (so no stale momentum moves them).

Scores: ``"magnitude"`` ranks by ``|w|``; ``"obs"`` by the Optimal Brain Surgeon saliency
``w**2 / diag(H^-1)`` with ``H`` a running average of the unit's input second moments
``X X^T`` (linear and conv2d inputs, collected by forward hooks while training).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from spdy.errors import InputError
from spdy.files import read_json, write_json
from spdy.levels import Option
from spdy.search.profile import Profile
from spdy.units import Unit

RECIPE_FORMAT = "spdy.recovery.gradual-recipe/1"
CRITERIA = ("magnitude", "obs")


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, steps: int = 1) -> float:
    """Zhu & Gupta's sparsity at ``step``: ``initial`` before ``start``, ``final`` from ``start + steps`` on."""
    initial = min(initial, final)
    progress = (step - start) / max(steps, 1)
    if progress <= 0.0:
        return initial
    if progress >= 1.0:
        return final
    return final + (initial - final) * (1.0 - progress) ** 3


def prune_lowest(scores: torch.Tensor, count: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mask with exactly ``count`` entries pruned: those already pruned in ``mask``, then the lowest scores.

    Ties break by position (a stable sort), so the result is deterministic.
    """
    flat = scores.detach().flatten().float().clone()
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten().clone()
    flat[~keep] = -float("inf")  # the already pruned stay pruned: masks never regrow
    keep[torch.argsort(flat, stable=True)[:count]] = False
    return keep.view(scores.shape)


@dataclass
class Recipe:
    """Everything that defines a gradual pruning run, saved as JSON so it can be re-run.

    ``targets``: unit -> final sparsity. The schedule prunes from step ``start`` over
    ``steps`` steps, updating masks every ``update_every`` steps; training runs
    ``total_steps`` steps in all: the last update (step ``start + steps``) comes before the end,
and the remaining steps recover at the final sparsity.
    """

    targets: dict[str, float]
    total_steps: int
    steps: int
    start: int = 0
    initial: float = 0.0
    update_every: int = 10
    criterion: str = "magnitude"
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for unit, s in self.targets.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise InputError(f"recipe: unit {unit!r}: target sparsity must be a number in [0, 1), got {s!r}")
        if self.criterion not in CRITERIA:
            raise InputError(f"recipe: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.update_every < 1 or self.steps < 1 or self.start < 0:
            raise InputError(f"recipe: need update_every >= 1, steps >= 1, start >= 0; got {self.update_every}, {self.steps}, {self.start}")
        if self.start + self.steps >= self.total_steps:
            raise InputError(f"recipe: the schedule's last mask update (step {self.start + self.steps}) must come before "
                             f"total_steps={self.total_steps}, so the final masks are applied and trained")
        if not 0.0 <= self.initial < 1.0:
            raise InputError(f"recipe: initial sparsity must be in [0, 1), got {self.initial}")

    @classmethod
    def from_profile(cls, profile: Profile, total_steps: int, prune_fraction: float = 0.75, **kwargs) -> "Recipe":
        """Targets from a SPDY profile (unstructured options only); pruning over the first ``prune_fraction`` of training."""
        for unit, key in profile.options.items():
            if Option.parse(key).pattern != "unstructured" and not Option.parse(key).is_dense:
                raise InputError(f"gradual pruning supports unstructured sparsity only; unit {unit!r} has option {key!r}")
        if total_steps < 2:
            raise InputError(f"gradual pruning needs at least 2 steps, got {total_steps}")
        steps = max(1, min(total_steps - 1, round(prune_fraction * total_steps)))
        return cls(targets=profile.sparsities, total_steps=total_steps, steps=steps, **kwargs)

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        data = read_json(path, "recipe")
        if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
            raise InputError(f"{path}: not a gradual recipe (expected \"format\": \"{RECIPE_FORMAT}\")")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise InputError(f"{path}: unknown recipe keys {unknown}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise InputError(f"{path}: {e}") from None


class _Hessian:
    """Running mean of a unit's input second moments ``X X^T`` (in the (out, in) matrix layout)."""

    def __init__(self, unit: Unit):
        self.unit, self.sum, self.count = unit, None, 0
        self.handle = unit.module.register_forward_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().float()
        if self.unit.kind == "conv2d":
            m = module
            x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # (B, L, in*kh*kw)
        x = x.reshape(-1, x.shape[-1])
        self.sum = x.t() @ x if self.sum is None else self.sum + x.t() @ x
        self.count += x.shape[0]

    def inverse_diagonal(self, damp: float = 0.01) -> torch.Tensor:
        if self.sum is None:
            raise InputError(f"OBS scores for unit {self.unit.name!r}: no inputs seen yet (run forward passes before a mask update)")
        h = self.sum / self.count
        h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(len(h))
        return torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()


class GradualPruner:
    """Masks on ``units`` that follow a :class:`Recipe`; call :meth:`update` before and :meth:`enforce` after each optimizer step.

    Usage, like ``torch.nn.utils.prune`` masks but scheduled::

        pruner = GradualPruner(units, recipe)
        for t in range(recipe.total_steps):
            pruner.update(t, optimizer)   # new masks when the schedule says so
            loss.backward(); optimizer.step()
            pruner.enforce()              # re-zero pruned weights
    """

    def __init__(self, units: Mapping[str, Unit], recipe: Recipe):
        missing = [u for u in recipe.targets if u not in units]
        if missing:
            raise InputError(f"recipe names units the model does not have: {missing[:3]}")
        if recipe.criterion == "obs":
            odd = [u for u in recipe.targets if units[u].kind not in ("linear", "conv2d") or getattr(units[u].module, "groups", 1) != 1]
            if odd:
                raise InputError(f"criterion 'obs' supports linear and ungrouped conv2d units; {odd[:3]} are not")
        self.units = {u: units[u] for u in recipe.targets}
        self.recipe = recipe
        self.masks = {u: torch.ones_like(unit.module.weight, dtype=torch.bool) for u, unit in self.units.items()}
        self._hooks = [unit.module.weight.register_hook(lambda g, u=u: g * self.masks[u]) for u, unit in self.units.items()]
        self._hessians = {u: _Hessian(unit) for u, unit in self.units.items()} if recipe.criterion == "obs" else {}

    def remove(self) -> None:
        """Detach the gradient and input hooks (masks stay applied to the weights)."""
        for h in self._hooks:
            h.remove()
        for hess in self._hessians.values():
            hess.handle.remove()
        self._hooks, self._hessians = [], {}

    def sparsity_at(self, step: int) -> dict[str, float]:
        """Each unit's scheduled sparsity at ``step``."""
        r = self.recipe
        return {u: cubic_sparsity(step, s, r.initial, r.start, r.steps) for u, s in r.targets.items()}

    def due(self, step: int) -> bool:
        """Whether masks change at ``step``: every ``update_every`` steps inside the schedule, and at its end."""
        r = self.recipe
        end = r.start + r.steps
        return step == end or (r.start <= step < end and (step - r.start) % r.update_every == 0)

    def measured(self) -> dict[str, float]:
        """Fraction of zero weights in each unit as it stands."""
        return {u: float((unit.module.weight == 0).sum()) / unit.module.weight.numel() for u, unit in self.units.items()}

    def _scores(self, name: str) -> torch.Tensor:
        w = self.units[name].module.weight.detach()
        if self.recipe.criterion == "magnitude":
            return w.abs().float()
        matrix = w.reshape(w.shape[0], -1).float()
        return (matrix.pow(2) / self._hessians[name].inverse_diagonal()).reshape(w.shape)

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Prune to the schedule's sparsity if ``step`` is an update step; returns whether masks changed."""
        if not self.due(step):
            return False
        for name, sparsity in self.sparsity_at(step).items():
            mask = self.masks[name]
            count = round(sparsity * mask.numel())
            pruned = int((~mask).sum())
            if count <= pruned:
                continue
            self.masks[name] = prune_lowest(self._scores(name), count, mask)
            if optimizer is not None:
                self._reset_state(optimizer, self.units[name].module.weight, self.masks[name])
        self.enforce()
        return True

    @staticmethod
    def _reset_state(optimizer: torch.optim.Optimizer, weight: nn.Parameter, mask: torch.Tensor) -> None:
        """Zero the optimizer's per-weight buffers (Adam moments, SGD momentum) of pruned weights."""
        for value in optimizer.state.get(weight, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                value.mul_(mask)

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the pruned weights (after every optimizer step)."""
        for name, unit in self.units.items():
            unit.module.weight.mul_(self.masks[name])

    def mask_tensors(self) -> dict[str, torch.Tensor]:
        """Masks as uint8 tensors for a checkpoint."""
        return {name: m.to(torch.uint8) for name, m in self.masks.items()}

    def load_masks(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, mask in self.masks.items():
            if name not in tensors or tensors[name].shape != mask.shape:
                raise InputError(f"checkpoint: mask for unit {name!r} missing or of the wrong shape")
            self.masks[name] = tensors[name].bool()

    def hessian_tensors(self) -> dict[str, torch.Tensor]:
        """Running Hessian sums (``obs`` only) and their sample counts, for a checkpoint."""
        out = {}
        for name, hess in self._hessians.items():
            if hess.sum is not None:
                out[name] = hess.sum
                out[name + "#count"] = torch.tensor(hess.count)
        return out

    def load_hessians(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, hess in self._hessians.items():
            if name in tensors:
                hess.sum, hess.count = tensors[name].clone(), int(tensors[name + "#count"])
