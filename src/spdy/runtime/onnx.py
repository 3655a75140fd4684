"""ONNX export of a model as torch runs it: what DeepSparse compiles and what `spdy.runtime.deploy.export`
writes beside the weights for ONNX runtimes.

The legacy TorchScript exporter at opset 13 is the one DeepSparse 1.8 reads; node names keep the
module scopes (``/bert/encoder/layer.0/...``) so engine layers can be matched to units.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spdy.errors import InputError

OPSET = 13


def import_deepsparse() -> Any:
    """The deepsparse module; missing, an InputError (one line, exit 2) that says how to get it."""
    try:
        import deepsparse
    except ImportError as e:
        raise InputError(
            f"engine deepsparse needs deepsparse 1.8.0, which this Python ({sys.executable}) cannot import ({e}); it pins numpy<2 "
            "and onnx<1.15, so it lives in its own environment: `make .venv-ds/.installed` then run .venv-ds/bin/spdy, or "
            "`pip install 'spdy[deepsparse]'` into a fresh Python 3.11 venv"
        ) from None
    return deepsparse


def _eager_attention(model: nn.Module) -> list[tuple[Any, str]]:
    """Switch transformers configs to eager attention for export; returns what to restore."""
    changed = []
    for module in model.modules():
        config = getattr(module, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current is not None and current != "eager":
            changed.append((config, current))
            config._attn_implementation = "eager"
    return changed


def _inputs(batch: Any) -> tuple[list[str], tuple, dict]:
    if isinstance(batch, dict):
        return list(batch), (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return [f"input_{i}" for i in range(len(batch))], tuple(batch), {}
    return ["input_0"], (batch,), {}


def _scope_graph_outputs(path: Path) -> None:
    """Rename graph outputs after the node that computes them: the exporter names them by number
    (e.g. ``51``), which hides a model's last layer (a classifier's Linear) from `unit_layer_times`."""
    import onnx

    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    renames = {name: f"{node.name}_output_{i}" for node in model.graph.node for i, name in enumerate(node.output)
               if name in outputs and node.name.startswith("/")}
    if not renames:
        return
    for node in model.graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]
    for output in model.graph.output:
        output.name = renames.get(output.name, output.name)
    onnx.save(model, str(path))


def export_onnx(model: nn.Module, batch: Any, path: Path) -> list:
    """Export with module-scoped node names; returns the batch as the engine's numpy inputs."""
    names, args, kwargs = _inputs(batch)
    changed = _eager_attention(model)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter is what DeepSparse reads
            torch.onnx.export(model, args, str(path), kwargs=kwargs or None, input_names=names, dynamo=False, opset_version=OPSET)
    finally:
        for config, value in changed:
            config._attn_implementation = value
    _scope_graph_outputs(path)
    return [t.numpy() for t in (*args, *kwargs.values())]


def write_onnx(model: nn.Module, example: Any, path: Path) -> dict:
    """``model`` as an ONNX file at ``path`` (written whole or not at all), traced on ``example``; what was
    written, or why nothing was (no onnx package, an example that is not tensors, an exporter error)."""
    import importlib.util

    from spdy.files import replace_atomically

    if importlib.util.find_spec("onnx") is None:
        return {"skipped": "the onnx package is not installed (pip install 'spdy[onnx]')"}
    names, args, kwargs = _inputs(example)
    values = [*args, *kwargs.values()]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return {"skipped": f"the example batch ({type(example).__name__}) is not tensors: nothing to trace the model on"}
    try:
        replace_atomically(path, lambda tmp: export_onnx(model.eval(), example, tmp))
    except Exception as e:  # the weights are exported already; an exporter that cannot trace this model costs only the ONNX file
        return {"skipped": f"the ONNX exporter failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"}
    return {"file": path.name, "opset": OPSET, "inputs": {n: list(v.shape) for n, v in zip(names, values)}}
