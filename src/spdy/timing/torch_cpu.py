"""The ``torch-cpu`` backend: times units in every runtime format, keeps the fastest.

Each option is timed on a magnitude mask of its sparsity (speed depends on how many
weights remain and how they group, not on which), at the unit's real input shape, with
the very modules :mod:`spdy.runtime` deploys, so a converted model runs what was timed.

Being smart about the 42-level grid:

* units with the same kind, weight shape, bias and input shape are timed once
  (`signature`); MiniLM's 36 encoder Linears are 3 distinct shapes;
* levels run from the sparsest down; a sparse format that was ``hopeless`` x slower than
  the best at some level only gets slower at denser levels, so it is dropped for them;
* the dense option (0%) runs in the kernel format where that beats torch's ``F.linear`` (it does on
  some CPUs with no zero at all): the deployed runtime then runs the unpruned layer that way, and
  a target that speed meets needs no pruning; the torch time is kept as ``unpruned`` (the
  unpruned model's, from which the table's fixed cost is taken);
* when only dense is left, the option is dense and costs exactly torch's dense time;
* a sparse format's time is its ratio to dense *in the same alternated run* times the
  unit's dense time, so slow periods of the machine between levels cancel out.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE, Option
from spdy.runtime.convert import convert
from spdy.runtime.formats import FORMATS, kernel_status, set_threads
from spdy.runtime.masks import magnitude_mask
from spdy.runtime.select import MIN_GAIN, format_stats, pick
from spdy.runtime.timer import Stat, alternating_stats, oversubscribed
from spdy.timing.backend import Backend, UnitTiming, machine_meta
from spdy.timing.in_block import WholeBlocks
from spdy.units import Unit, call_model, set_weight_matrix, weight_matrix

HOPELESS = 1.5


class TorchCpuBackend(Backend):
    """torch on the CPU, formats ``dense``, ``csr``, ``bsr`` and (if it loads) ``kernel``."""

    name = "torch-cpu"

    def __init__(self, threads: int | None = None, formats: Sequence[str] = FORMATS, rounds: int = 11, model_rounds: int = 10,
                 max_spread: float = 0.15, hopeless: float = HOPELESS, whole_blocks: bool = True):
        self.threads = threads or os.cpu_count() or 1
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise InputError(f"torch-cpu: unknown formats {unknown}; formats are {', '.join(FORMATS)}")
        self.formats = tuple(formats)
        self.rounds, self.model_rounds, self.max_spread, self.hopeless = rounds, model_rounds, max_spread, hopeless
        self.whole_blocks = whole_blocks
        self._blocks: WholeBlocks | None = None
        self._previous_threads = torch.get_num_threads()

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        if warning := oversubscribed(self.threads):
            warnings.warn(f"torch-cpu timing: {warning}", RuntimeWarning, stacklevel=3)
        self._previous_threads = torch.get_num_threads()
        set_threads(self.threads)
        if "kernel" in self.formats and kernel_status()[0]:
            from spdy.runtime import conv_kernels, kernels

            kernels.warmup()
            if any(u.kind == "conv2d" for u in units.values()):
                conv_kernels.warmup()  # compiled here, not inside the first conv's timing rounds
            if self.whole_blocks:
                self._blocks = WholeBlocks(model, units, batch, self.rounds, self.max_spread)

    def finish(self) -> None:
        set_threads(self._previous_threads)


    def signature(self, unit: Unit) -> str | None:
        if self._blocks is not None and unit.name in self._blocks:
            return self._blocks.signature(unit)
        m = unit.module
        conv = f":k{m.kernel_size}s{m.stride}p{m.padding}d{m.dilation}" if unit.kind == "conv2d" else ""
        return f"{unit.kind}:{tuple(unit.weight_shape)}:in{tuple(unit.input_shape)}:bias{m.bias is not None}{conv}"

    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        if unit.input_shape is None:
            raise InputError(f"unit {unit.name!r} has no input shape; run capture_shapes first")
        layer = copy.deepcopy(unit.module)
        work = Unit(unit.name, layer, unit.kind)
        dense = weight_matrix(unit).clone()
        result = UnitTiming({}, {}, {})
        # Dense first: the reference every level is compared with, and the time of every
        # option that ends up running dense (re-timing those would only add noise).
        ref = self._stats(unit, layer, DENSE, ["dense"])["dense"]
        if self._blocks is not None and unit.name in self._blocks:
            return self._blocks.unit_times(unit, options, unpruned=ref.median)
        result.times[DENSE], result.formats[DENSE], result.spread[DENSE] = ref.median, "dense", ref.spread
        result.unpruned = ref.median
        if "kernel" in self.formats and kernel_status()[0]:
            # the kernel's ratio to dense in one alternated run, applied to the dense time measured alone (which is
            # what the unpruned model's base holds: alternation slows both a little)
            stats = self._stats(unit, layer, DENSE, ["dense", "kernel"])
            if pick(stats) == "kernel":
                ratio = stats["kernel"].median / stats["dense"].median
                result.times[DENSE], result.formats[DENSE], result.spread[DENSE] = ref.median * ratio, "kernel", stats["kernel"].spread
        parsed = sorted((Option.parse(k) for k in set(options) - {DENSE}), key=lambda o: (o.pattern, -o.sparsity))
        dropped: dict[str, set[str]] = {}
        for option in parsed:
            key = option.key
            candidates = [f for f in self.formats if f not in dropped.get(option.pattern, set())]
            if candidates == ["dense"]:
                result.times[key], result.formats[key], result.spread[key] = ref.median, "dense", ref.spread
                continue
            with torch.no_grad():
                set_weight_matrix(work, dense * magnitude_mask(dense, option))
            stats = self._stats(unit, layer, key, candidates)
            best = pick(stats)
            if best == "dense":
                result.times[key], result.formats[key], result.spread[key] = ref.median, "dense", ref.spread
            else:
                # Dense ran alternated with the others at this level: scale its ratio to the
                # unit's dense reference, so drift between levels cancels out.
                scale = ref.median / stats["dense"].median if "dense" in stats else 1.0
                result.times[key], result.formats[key], result.spread[key] = stats[best].median * scale, best, stats[best].spread
            for f, s in stats.items():
                if f != "dense" and s.median > self.hopeless * stats[best].median:
                    dropped.setdefault(option.pattern, set()).add(f)
        return result

    def _stats(self, unit: Unit, layer: nn.Module, key: str, candidates: list[str]) -> dict[str, Stat]:
        try:
            return format_stats(layer, unit.input_shape, candidates, rounds=self.rounds, max_spread=self.max_spread)
        except Exception as e:
            raise RuntimeError(f"timing unit {unit.name!r} option {key!r} (formats {candidates}) failed: {e}") from e

    def deployed_fixed(self, model: nn.Module, batch: Any, dense: dict[str, tuple[float, str]], base: float) -> dict | None:
        """The time outside the units as the runtime deploys the model (it fuses activations and residuals into
        kernel-format layers, which torch runs as passes of their own). With whole blocks: the deployed model with
        their units empty, less the other units' dense times. Else, where some dense option runs in another format
        than torch's: the model converted to every unit's dense option, less those options' times. None (the dense
        model's time less the units' unpruned ones) where the unpruned model runs as torch runs it, and for a decode
        step (the copy of a language model in the kernel format would cost more than the correction is worth).

        The deployed model is timed alternated with the dense one and taken as its ratio times ``base``: this
        machine's speed drifts by tens of percent between two measurements minutes apart, and a fixed cost from
        two separate runs would carry that drift whole."""
        if self._blocks is not None and self._blocks.members:
            deployed = self._blocks.emptied_model({u: fmt for u, (_, fmt) in dense.items()})
            outside = sum(t for u, (t, _) in dense.items() if u not in self._blocks)
            record = {"whole_blocks": self._blocks.members}
        else:
            formats = {u: fmt for u, (_, fmt) in dense.items() if fmt != "dense"}
            if not formats or hasattr(batch, "run_model"):
                return None
            deployed = convert(copy.deepcopy(model), formats).eval()
            outside, record = sum(t for t, _ in dense.values()), {}
        with torch.no_grad():
            stats = alternating_stats({"model": lambda: call_model(model, batch), "deployed": lambda: call_model(deployed, batch)},
                                      self.model_rounds, max_spread=self.max_spread)
        measured = base * stats["deployed"].median / stats["model"].median
        key = "emptied_model" if "whole_blocks" in record else "reference_model"
        return {"fixed": measured - outside, key: measured, "spread": stats["deployed"].spread, **record}

    def fused_blocks(self) -> dict[str, list[str]]:
        return dict(self._blocks.members) if self._blocks is not None else {}

    def unfused_time(self, block: str) -> float:
        return self._blocks.unfused_time(block)

    @torch.no_grad()
    def model_time(self, model: nn.Module, batch: Any) -> Stat:
        return alternating_stats({"model": lambda: call_model(model, batch)}, self.model_rounds, max_spread=self.max_spread)["model"]

    def meta(self) -> dict:
        ok, why = kernel_status()
        return {
            "backend": self.name,
            **machine_meta(),
            "threads": self.threads,
            "formats_tried": [f for f in self.formats if f != "kernel" or ok],
            "kernel": "available" if ok else why,
            "rounds": self.rounds,
            "model_rounds": self.model_rounds,
            "max_spread": self.max_spread,
            "hopeless": self.hopeless,
            "min_gain": MIN_GAIN,
            "whole_blocks": self.whole_blocks,
        }
