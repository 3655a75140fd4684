"""Training losses for fine-tuning a pruned student against its dense teacher.

With little data, the dense model's outputs are a richer signal than labels: logits KL at a
temperature (Hinton et al.), 1 - cosine for embedding models, and the per-layer output loss
``sum_l ||out_s - out_t||^2 / ||out_t||^2`` over the pruned units (SPDY's gAP), which gives
every layer its own target. The task loss (cross-entropy with labels) joins when labels exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from spdy.errors import InputError
from spdy.units import call_model

DISTILL = ("kl", "cosine", "mse", "layer", "none")


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` per position; ``T^2`` keeps gradients comparable across T."""
    t = temperature
    logp = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
    logq = F.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean") * t * t


def cosine_distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of the outputs (sentence embeddings), averaged over the batch."""
    return 1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=-1).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``||s - t||^2 / ||t||^2``: output error relative to the teacher's energy."""
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


class LayerOutputs:
    """Records the outputs of named submodules on every forward pass (forward hooks)."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def layer_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over units of the relative squared output error (SPDY's gAP objective)."""
    return sum(relative_mse(student[n], teacher[n].detach()) for n in teacher)


@dataclass
class DistillLoss:
    """``task * CE(labels) + output * D(student, teacher) + layer * per-layer loss``.

    ``distill`` names the output term ``D``: ``kl`` (logits, at ``temperature``),
    ``cosine`` (embeddings), ``mse`` (relative output error), ``layer`` (no output term,
    only the per-layer loss) or ``none`` (task loss only). The per-layer term is on when
    ``layer > 0`` or ``distill == "layer"``.
    """

    student: nn.Module
    teacher: nn.Module
    units: list[str]
    distill: str = "kl"
    task: float = 1.0
    output: float = 1.0
    layer: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.distill not in DISTILL:
            raise InputError(f"--distill must be one of {', '.join(DISTILL)}, got {self.distill!r}")
        if self.distill == "layer" and self.layer == 0.0:
            self.layer = 1.0
        self.teacher.eval().requires_grad_(False)
        self._hooks = (LayerOutputs(self.student, self.units), LayerOutputs(self.teacher, self.units)) if self.layer > 0 else None

    def remove(self) -> None:
        if self._hooks:
            for h in self._hooks:
                h.remove()

    def __call__(self, batch: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss of the student on ``batch`` (runs both models)."""
        if labels is None and self.distill == "none":
            raise InputError("--distill none needs labels (a model with the 'ce' loss)")
        out = call_model(self.student, batch)
        loss = out.new_zeros(())
        if self.distill not in ("layer", "none") or self._hooks:
            with torch.no_grad():
                ref = call_model(self.teacher, batch)
            if self.distill == "kl":
                loss = loss + self.output * kl_distill(out, ref, self.temperature)
            elif self.distill == "cosine":
                loss = loss + self.output * cosine_distill(out, ref)
            elif self.distill == "mse":
                loss = loss + self.output * relative_mse(out, ref)
        if self._hooks:
            student, teacher = self._hooks
            loss = loss + self.layer * layer_loss(student.outputs, teacher.outputs)
        if labels is not None and self.task > 0:
            loss = loss + self.task * F.cross_entropy(out, labels)
        return loss
