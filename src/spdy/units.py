"""Prunable units: the layers of a model the solver chooses an option for.

A unit is a module with a 2-D weight matrix (out, in) once viewed as a matmul:
``nn.Linear``, ``nn.Conv2d`` (out, in * kh * kw) and transformers' ``Conv1D`` (stored
transposed). Each unit's real input shape is captured by running sample inputs through
the model, because a layer's time depends on it as much as on its weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from spdy.errors import InputError


@dataclass
class Unit:
    """One prunable layer and the shapes it sees."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d" | "conv1d"
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(out, in) of the weight viewed as a matrix."""
        w = self.module.weight
        if self.kind == "conv1d":
            return (w.shape[1], w.shape[0])
        return (w.shape[0], w[0].numel())

    def describe(self) -> dict:
        return {"kind": self.kind, "weight": list(self.weight_shape), "input": list(self.input_shape) if self.input_shape else None}


def weight_matrix(unit: Unit) -> torch.Tensor:
    """The weight as an (out, in) matrix; a view where the layout allows."""
    from spdy.runtime.modules import weight_of  # at call time: spdy.runtime imports this module

    return weight_of(unit.module)


def set_weight_matrix(unit: Unit, matrix: torch.Tensor) -> None:
    """Copy an (out, in) matrix back into the unit's weight in its own layout."""
    w = unit.module.weight.data
    w.copy_(matrix.t() if unit.kind == "conv1d" else matrix.reshape(w.shape))


def unit_kind(module: nn.Module) -> str | None:
    from spdy.runtime.modules import conv1d_type  # at call time: spdy.runtime imports this module

    conv1d = conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer stays dense (never a unit), or None when the runtime can prune it.

    Grouped and depthwise convolutions hold few weights and no sparse format speeds them up;
    a Conv2d subclass with its own ``forward`` (e.g. TensorFlow-style "same" padding) does
    more than the runtime module that would replace it, so replacing it would change outputs.
    A layer left without weights (the consumer of a block a structured profile removed whole,
    `spdy.blocks.BiasOnly`) has nothing to prune.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.numel() == 0:
        return f"no weights left ({tuple(weight.shape)}): a structured profile removed the block it consumed"
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups}): no sparse format speeds it up"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"padding_mode={module.padding_mode!r}, padding={module.padding!r}: the runtime pads with zeros by numbers"
    if type(module).forward is not nn.Conv2d.forward:
        return f"{type(module).__name__} has its own forward, which the runtime's Conv2d would not reproduce"
    return None


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Layers that look prunable but stay dense, with the reason (recorded in timing tables)."""
    return {name: why for name, m in model.named_modules() if unit_kind(m) is not None and (why := unsupported_reason(m)) is not None}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_units(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> dict[str, Unit]:
    """Prunable units by module name, in model order.

    ``include``/``exclude`` are glob patterns on module names (e.g. ``"encoder.*"``);
    a pattern that matches no prunable layer is an error, since it is almost always a typo.
    Layers the runtime cannot prune (`unsupported_reason`) are never units.
    """
    unsupported = unsupported_layers(model)
    found = {name: Unit(name, m, k) for name, m in model.named_modules() if (k := unit_kind(m)) is not None and name not in unsupported}
    if not found:
        why = f"; {len(unsupported)} stay dense, e.g. {next(iter(unsupported.items()))}" if unsupported else ""
        raise InputError(f"the model has no prunable layers (nn.Linear, nn.Conv2d or transformers Conv1D){why}")
    for patterns, what in ((include or [], "include"), (exclude, "exclude")):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in found):
                dense = [f"{n}: {why}" for n, why in unsupported.items() if fnmatch.fnmatchcase(n, p)][:2]
                because = f"; it matches only layers that stay dense ({'; '.join(dense)})" if dense else ""
                raise InputError(f"--{what} pattern {p!r} matches no prunable layer{because}; layers are e.g. {list(found)[:4]}")
    chosen = {n: u for n, u in found.items() if (not include or _matches(n, include)) and not _matches(n, exclude)}
    if not chosen:
        raise InputError(f"--include {list(include) if include else 'all'} with --exclude {list(exclude)} leaves no prunable layer "
                         f"(every include match is excluded); layers are e.g. {list(found)[:4]}")
    return chosen


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run a sample batch: dicts as keyword arguments, tuples/lists as positionals; a batch that knows
    how to run a model (`spdy.models.workload.DecodeStep`: one generated token) runs it."""
    if hasattr(batch, "run_model"):
        return batch.run_model(model)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def capture_shapes(model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
    """Fill each unit's input and output shapes by running one batch with forward hooks."""
    hooks = []
    for unit in units.values():

        def hook(module, args, output, unit=unit):
            unit.input_shape = tuple(args[0].shape)
            unit.output_shape = tuple(output.shape)

        hooks.append(unit.module.register_forward_hook(hook))
    try:
        call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    missed = [n for n, u in units.items() if u.input_shape is None]
    if missed:
        raise InputError(f"units never ran on the sample input (unused layers?): {missed[:5]}; exclude them")



@torch.no_grad()
def captured_inputs(model: nn.Module, modules: Sequence[str], batch: Any) -> dict[str, tuple[tuple, dict]]:
    """Module name -> (args, kwargs) the module is called with when the model runs ``batch`` (tensors
    copied): what a part of the model is timed on alone. A module the batch never reaches is an error."""
    inputs: dict[str, tuple[tuple, dict]] = {}
    keep = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
    hooks = []
    for name in modules:

        def hook(module, args, kwargs, name=name):
            inputs[name] = tuple(map(keep, args)), {k: keep(v) for k, v in kwargs.items()}

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    missed = [n for n in modules if n not in inputs]
    if missed:
        raise InputError(f"these parts of the model never ran on the timing batch: {missed[:3]}")
    return inputs
