"""The ``deepsparse`` backend: unit times from DeepSparse's per-layer analysis.

The model is exported once to ONNX (legacy exporter, opset 13, eager attention: DeepSparse
1.8 rejects newer opsets and SDPA needs opset 14). For each sparsity level one
``deepsparse.model_debug_analysis(..., imposed_ks=level)`` run times every engine layer
with every prunable weight pruned to that level; an engine layer belongs to a unit when
one of the ONNX outputs in its ``canonical_name`` (a comma-separated list for fused
layers) is the output of a MatMul/Gemm/Conv node in the unit's module scope
(``/bert/encoder/layer.0/.../query/MatMul_output_0`` for ``bert.encoder.layer.0....query``).
A unit's time can therefore include fused neighbours (bias add, residual, LayerNorm) that
do not change with sparsity; ``base`` comes from the dense analysis of the same engine, so
``fixed = base - sum of dense unit times`` stays consistent.

Needs ``deepsparse==1.8.0`` (``pip install 'spdy[deepsparse]'``, numpy<2, onnx<1.15).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from spdy.errors import InputError
from spdy.levels import UNSTRUCTURED, Option
from spdy.runtime.onnx import export_onnx, import_deepsparse
from spdy.runtime.timer import Stat
from spdy.timing.backend import Backend, UnitTiming, machine_meta
from spdy.units import Unit

_WEIGHT_OP = re.compile(r"^(?P<scope>.*)/(MatMul|Gemm|Conv)(_\d+)?_output_0$")


def _scope_key(text: str) -> str:
    """Module names and ONNX scopes on common ground: ``layer.0`` and ``layer/0`` both -> ``layer/0``."""
    return text.strip("/").replace(".", "/")


def unit_layer_times(layer_info: list[dict], units: list[str]) -> dict[str, float]:
    """Milliseconds per unit: the engine layers whose fused outputs include the unit's weight op.

    A layer that fuses the weight ops of several units is split evenly between them.
    Raises naming the unit when no engine layer matches it.
    """
    by_scope = {_scope_key(u): u for u in units}
    times = {u: 0.0 for u in units}
    found = set()
    for layer in layer_info:
        owners = []
        for output in str(layer.get("canonical_name", "")).split(","):
            m = _WEIGHT_OP.match(output.strip())
            if m and (unit := by_scope.get(_scope_key(m.group("scope")))) is not None and unit not in owners:
                owners.append(unit)
        for unit in owners:
            times[unit] += float(layer["average_run_time_in_ms"]) / len(owners)
            found.add(unit)
    missing = [u for u in units if u not in found]
    if missing:
        names = [str(layer.get("canonical_name", ""))[:80] for layer in layer_info[:3]]
        raise InputError(
            f"deepsparse: no engine layer computes unit(s) {missing[:3]} (looked for a MatMul/Gemm/Conv output in scope "
            f"'/{missing[0].replace('.', '/')}/'); engine layers' canonical names look like {names}"
        )
    return times


class DeepSparseBackend(Backend):
    """Neural Magic's DeepSparse CPU engine, unstructured sparsity imposed per level."""

    name = "deepsparse"

    def __init__(self, threads: int | None = None, iterations: int = 20, warmup_iterations: int = 5, workdir: str | None = None):
        self.deepsparse = import_deepsparse()  # fail before any work when the engine is missing
        self.threads = threads or os.cpu_count() or 1
        self.iterations, self.warmup_iterations = iterations, warmup_iterations
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="spdy-deepsparse-"))
        self._analyses: dict[float, dict] = {}
        self._model: nn.Module | None = None

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.onnx = self.workdir / "model.onnx"
        self.inputs = export_onnx(model, batch, self.onnx)
        self.batch_size = int(self.inputs[0].shape[0])
        self.unit_names = list(units)
        self._model = model
        self._analyses.clear()

    def _analysis(self, sparsity: float, onnx: Path | None = None, inputs: list | None = None) -> dict:
        """One engine run at an imposed sparsity (0 = the weights as they are), cached per level."""
        if onnx is None and sparsity in self._analyses:
            return self._analyses[sparsity]
        result = self.deepsparse.model_debug_analysis(
            str(onnx or self.onnx),
            inputs or self.inputs,
            batch_size=self.batch_size,
            num_cores=self.threads,
            num_iterations=self.iterations,
            num_warmup_iterations=self.warmup_iterations,
            imposed_ks=sparsity or None,
        )
        if onnx is None:
            self._analyses[sparsity] = result
        return result

    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        timing = UnitTiming({}, {}, {})
        for key in options:
            option = Option.parse(key)
            if option.pattern != UNSTRUCTURED:
                raise InputError(f"deepsparse: unit {unit.name!r} option {key!r}: only unstructured sparsity can be imposed")
            analysis = self._analysis(option.sparsity)
            ms = unit_layer_times(analysis["layer_info"], self.unit_names)[unit.name]
            timing.times[key] = ms / 1e3
            timing.formats[key] = "deepsparse"
            timing.spread[key] = _stat(analysis).spread
        return timing

    def model_time(self, model: nn.Module, batch: Any) -> Stat:
        """The dense analysis's total for the prepared model; any other (e.g. pruned) model is
        exported and run end to end with its own weights."""
        if model is self._model:
            return _stat(self._analysis(0.0))
        path = self.workdir / "other.onnx"
        inputs = export_onnx(model, batch, path)
        return _stat(self._analysis(0.0, path, inputs))

    def meta(self) -> dict:
        return {"backend": self.name, **machine_meta(), "deepsparse": self.deepsparse.__version__, "threads": self.threads, "iterations": self.iterations, "warmup_iterations": self.warmup_iterations}


def _stat(analysis: dict) -> Stat:
    """Average total (what the per-layer averages add up to), with the iterations' spread."""
    iterations = [float(t) / 1e3 for t in analysis.get("iteration_times") or []]
    spread = Stat.of(iterations).spread if iterations else 0.0
    return Stat(float(analysis["average_total_time"]) / 1e3, spread, len(iterations))
