"""The ``deepsparse-blocks`` backend: structured blocks at every kept size, as DeepSparse's dense engine runs them.

A structured profile deploys as a physically smaller dense model, which DeepSparse speeds up
without any sparse format. Its table comes from whole resized models: for the i-th option of
every block at once (a block with fewer options stays at its last), a copy of the model with
each block resized (`spdy.blocks.keep_first`) is exported to ONNX and analysed by
``deepsparse.model_debug_analysis``; a block's time there is that of the engine layers computing
anything in its modules' scopes (the owner's attention or up projection, producers, consumer),
a layer fusing several blocks' ops split evenly. Layers outside every block (embeddings,
reshapes the engine leaves unnamed) are the table's fixed time, from the dense analysis.
Options are timed in place, inside the whole model, so the cache state is the deployed one. A
block removed whole leaves no zero-size layer (`spdy.blocks.BiasOnly`), which DeepSparse 1.8 would die on.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from spdy.blocks import Block, block_of, keep_first, unit_options
from spdy.errors import InputError
from spdy.levels import DENSE
from spdy.runtime.onnx import export_onnx
from spdy.timing.backend import UnitTiming
from spdy.timing.blocks import STRUCTURED_FORMAT
from spdy.timing.deepsparse import DeepSparseBackend, _scope_key, _stat
from spdy.units import Unit


def block_scopes(block: Block) -> list[str]:
    """ONNX scope prefixes of the modules whose work shrinks with ``block``."""
    return sorted({_scope_key(p) for p in (block.owner, block.consumer, *block.producers, *block.chain)})


def block_layer_times(layer_info: list[dict], scopes: dict[str, list[str]]) -> dict[str, float]:
    """Milliseconds per block: the engine layers with an output inside one of the block's scopes (0 for a block
    the engine no longer runs: removed whole)."""
    times = {name: 0.0 for name in scopes}
    for layer in layer_info:
        outputs = [_scope_key(o.strip()) for o in str(layer.get("canonical_name", "")).split(",")]
        owners = [name for name, prefixes in scopes.items()
                  if any(o.startswith(p + "/") for o in outputs for p in prefixes)]
        for name in owners:
            times[name] += float(layer["average_run_time_in_ms"]) / len(owners)
    return times


class DeepSparseBlocksBackend(DeepSparseBackend):
    """DeepSparse's dense engine on physically smaller models."""

    name = "deepsparse-blocks"

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        super().prepare(model, units, batch)
        self._batch, self._units = batch, dict(units)
        self._options = unit_options(units)
        self._scopes = {name: block_scopes(block_of(unit)) for name, unit in units.items()}
        self._resized: dict[int, tuple[dict[str, float], float]] = {}

    def _at_index(self, index: int) -> tuple[dict[str, float], float]:
        """Seconds per block, and the run's spread, in the analysis of the model with every block at its
        ``index``-th option (or its last)."""
        if index not in self._resized:
            if index == 0:
                analysis = self._analysis(0.0)
            else:
                small = copy.deepcopy(self._model).eval()
                for name, keys in self._options.items():
                    key = keys[min(index, len(keys) - 1)]
                    if key != DENSE:
                        block = block_of(self._units[name])
                        keep_first(small, block, block.kept(key))
                path = self.workdir / f"blocks-{index}.onnx"
                analysis = self._analysis(0.0, path, export_onnx(small, self._batch, path))
            times = block_layer_times(analysis["layer_info"], self._scopes)
            self._resized[index] = ({name: ms / 1e3 for name, ms in times.items()}, _stat(analysis).spread)
        return self._resized[index]

    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        timing = UnitTiming({}, {}, {})
        order = self._options[unit.name]
        for key in options:
            if key not in order:
                raise InputError(f"deepsparse-blocks: unit {unit.name!r} has no option {key!r}; its options are {order}")
            times, spread = self._at_index(order.index(key))
            timing.times[key] = times[unit.name]
            if key == DENSE and not timing.times[key]:
                raise InputError(f"deepsparse-blocks: no engine layer computes block {unit.name!r} (looked for outputs in the "
                                 f"ONNX scopes {self._scopes[unit.name]})")
            timing.formats[key] = "dense" if key == DENSE else STRUCTURED_FORMAT
            timing.spread[key] = spread
        return timing

    def meta(self) -> dict:
        return {**super().meta(), "backend": self.name, "formats_tried": ["dense", STRUCTURED_FORMAT]}
