"""Check that a pruned model really runs at the speedup its profile promised.

The SPDY reference never ran its profiles. `verify` builds the pruned model (database
weights or magnitude masks), converts it with the runtime in the formats the timing table
measured, checks its output against the masked dense model, then runs the dense and the
pruned model alternately on the same batch. Each round gives one ratio ``dense / pruned``
from two runs a moment apart, so machine-wide slow periods cancel; we report the median
ratio and its spread (IQR / median).

Every speedup names its baseline. ``measured_speedup`` is over dense torch (the unpruned model
as torch runs it; what the SPDY target means). The same rounds also time the engine's fastest
dense run, the unpruned model converted with the kernel format where the profile runs the
kernel (with convert's fusions): on some CPUs that format beats torch's dense ``F.linear``
with no zero at all (on others, or at small shapes, it loses). ``speedup_over_engine_dense`` is
over the faster of the two dense runs: the share sparsity earns by itself.

``met`` is ``median >= target * (1 - tolerance)``. The default tolerance (3%) is the
run-to-run wobble of such a median on a shared 2-core machine (single runs move ~30%,
medians of 20+ alternated ratios a few percent); a miss beyond it warns loudly.
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE
from spdy.models.workload import GENERATION_ROUNDS
from spdy.search.profile import Profile
from spdy.runtime import (FeedForwardInput, FeedForwardOutput, FusedBottleneck, FusedEncoderLayer, FusedMBConv,
                          ProjectedSelfAttention, ResidualNormOutput, SparseConv2d, SparseLinear, convert, formats_of,
                          kernel_status, magnitude_mask)
from spdy.runtime.formats import set_threads
from spdy.runtime.timer import oversubscribed, time_alternating
from spdy.timing.table import TimingTable
from spdy.units import Unit, call_model, set_weight_matrix, weight_matrix

TOLERANCE = 0.03
ROUNDS = 30

Weights = Callable[[str, str], torch.Tensor] | Mapping[str, Any]


UNDER_PREDICTED = 1.25  # measured / predicted beyond this is no longer noise
OVER_DELIVERED = 1.08  # a met profile measured beyond this x its target prunes more than needed
BASELINE = "dense torch"
ORIGINAL = "the original model in dense torch"  # a shrunk model's baseline: the model before it was shrunk
ENGINE_BASELINE = "the kernel format at 0%"
TORCH_FASTER = "dense torch, faster here than the kernel format at 0%"
FUSED_TYPES = (ResidualNormOutput, FeedForwardInput, FeedForwardOutput, ProjectedSelfAttention, FusedEncoderLayer,
               FusedBottleneck, FusedMBConv)


def fused_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks `convert` fused (modules of `spdy.runtime.modeling`, and layers that took
    their GELU into the kernel): a table that timed units one by one does not see these."""
    return [n for n, m in model.named_modules()
            if isinstance(m, FUSED_TYPES) or isinstance(m, (SparseLinear, SparseConv2d)) and m.activation is not None]


def _median_spread(ratios: list[float]) -> tuple[float, float]:
    """Median of per-round ratios and their spread (IQR / median)."""
    measured = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), measured, max(ratios)]
    return measured, (q[2] - q[0]) / measured


def pooled(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict:
    """Two `VerifyResult.to_json` measurements of one profile as one, their per-round ratios pooled: a
    measurement that missed by the machine's noise is judged again on twice the rounds."""
    ratios = list(first["ratios"]) + list(second["ratios"])
    measured, spread = _median_spread(ratios)
    result = dict(second, ratios=ratios, rounds=len(ratios), measured_speedup=measured, measured_spread=spread)
    if second.get("target") is not None:
        result["met"] = measured >= second["target"] * (1 - second["tolerance"])
    engine = list(first.get("engine_dense_ratios") or []) + list(second.get("engine_dense_ratios") or [])
    if second.get("speedup_over_engine_dense") is not None:
        result["engine_dense_ratios"] = engine
        result["speedup_over_engine_dense"] = statistics.median(engine) if second.get("engine_baseline") == ENGINE_BASELINE and engine else measured
    return result


@dataclass
class VerifyResult:
    """Measured against predicted speedup of one profile on this machine.

    ``measured_speedup`` is over ``baseline`` (dense torch); ``speedup_over_engine_dense`` over the
    engine's fastest dense run (``engine_baseline``: the kernel format at 0%, or dense torch where
    that was faster), None where the kernel-format dense run was not measured. ``engine_dense_time``
    and ``engine_dense_ratios`` are the kernel-format dense run's. ``fused`` is None in results
    saved before it was recorded. ``generation``: for a decoding workload, the models' own
    ``generate`` timed (tokens per second, dense and pruned) and its greedy tokens checked against
    the masked dense twin (`spdy.models.workload.DecodeStep.generation`); else None.
    """

    target: float | None
    predicted_speedup: float | None
    measured_speedup: float
    measured_spread: float
    met: bool | None
    tolerance: float
    dense_time: float
    pruned_time: float
    rounds: int
    threads: int
    output_error: float
    formats: dict[str, str] = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)
    baseline: str = BASELINE
    engine_baseline: str | None = None
    engine_dense_time: float | None = None
    speedup_over_engine_dense: float | None = None
    engine_dense_ratios: list[float] = field(default_factory=list)
    fused: list[str] | None = None
    generation: dict | None = None

    @classmethod
    def from_samples(cls, dense: list[float], pruned: list[float], target: float | None, predicted: float | None,
                     tolerance: float, threads: int, output_error: float, **fields: Any) -> "VerifyResult":
        """Per-round ``dense / pruned`` ratios of alternated runs -> median speedup, spread (IQR / median), met."""
        ratios = [d / p for d, p in zip(dense, pruned)]
        measured, spread = _median_spread(ratios)
        return cls(target=target, predicted_speedup=predicted, measured_speedup=measured, measured_spread=spread,
                   met=None if target is None else measured >= target * (1 - tolerance), tolerance=tolerance,
                   dense_time=statistics.median(dense), pruned_time=statistics.median(pruned), rounds=len(ratios),
                   threads=int(threads), output_error=output_error, ratios=ratios, **fields)

    def to_json(self) -> dict:
        """Plain JSON types; ``formats`` holds only the layers that run sparse."""
        return asdict(self)

    def speedups(self) -> str:
        """The measured speedup with its baselines, e.g. "2.41x over dense torch (1.62x over the
        engine's fastest dense run: the kernel format at 0%)"."""
        text = f"{self.measured_speedup:.3f}x over {self.baseline}"
        if self.speedup_over_engine_dense is not None:
            text += f" ({self.speedup_over_engine_dense:.3f}x over the engine's fastest dense run: {self.engine_baseline})"
        return text

    def under_prediction(self) -> str:
        """A line for users when the model runs well beyond its prediction ("" otherwise), with the
        reason that holds here: fused blocks the table cannot see, or a table that no longer
        describes this machine."""
        if not self.predicted_speedup or self.measured_speedup < UNDER_PREDICTED * self.predicted_speedup:
            return ""
        head = (f"the runtime beats the timing table's prediction {self.measured_speedup / self.predicted_speedup:.1f}x "
                f"(both over {self.baseline}): ")
        if self.fused is None:
            why = ("the table may not see blocks convert() fuses, or was measured under other load; re-time it "
                   "(`spdy time`) on this machine")
        elif self.fused:
            why = (f"the table times layers one by one and sees none of the {len(self.fused)} blocks convert() fused "
                   f"(e.g. {self.fused[0]})")
        else:
            why = ("the table saw every block that runs fused (it timed their units inside them), so it under-predicts on its "
                   "own (measured under other load, or stale); re-time it (`spdy time`) on this machine")
        return head + why + ", and this profile prunes more than its target needs"

    def over_delivery(self) -> str:
        """A line when a met profile runs beyond OVER_DELIVERED x its target ("" otherwise): it
        prunes more than the target needs, giving accuracy away, unless the engine's dense run alone
        is already that fast (nothing to give back)."""
        if not self.met or not self.target or self.measured_speedup <= OVER_DELIVERED * self.target:
            return ""
        ahead = f"over-delivered: measured {self.measured_speedup / self.target:.2f}x the {self.target:g}x target (over {self.baseline})"
        if self.speedup_over_engine_dense is not None and self.speedup_over_engine_dense <= 1 + self.tolerance:
            return f"{ahead}, as fast as {self.engine_baseline} alone: this engine meets the target without pruning"
        return f"{ahead}: the profile prunes more than the target needs and gives accuracy away"


class SpeedupMiss(RuntimeWarning):
    """The pruned model is slower than the target beyond measurement noise."""


def _pruned_weight(weights: Weights | None, unit: str, key: str, dense: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return dense * magnitude_mask(dense, key)
    if callable(weights):
        w = weights(unit, key)
    else:
        if unit not in weights:
            raise InputError(f"verify: weights has no entry for unit {unit!r} (profile option {key!r})")
        w = weights[unit]
        if isinstance(w, Mapping):
            if key not in w:
                raise InputError(f"verify: weights[{unit!r}] has no option {key!r}; it has {sorted(w)[:5]}")
            w = w[key]
    w = torch.as_tensor(w, dtype=dense.dtype)
    if tuple(w.shape) != tuple(dense.shape):
        raise InputError(f"verify: weights for unit {unit!r} option {key!r} have shape {tuple(w.shape)}, expected {tuple(dense.shape)}")
    return w


@torch.no_grad()
def pruned_copy(model: nn.Module, units: Mapping[str, Unit], options: Mapping[str, str], weights: Weights | None = None) -> nn.Module:
    """A copy of ``model`` holding the profile's weights (masked dense tensors, not converted).

    ``weights``: ``f(unit, key) -> (out, in) tensor`` (e.g. ``Database.weight``), or
    ``{unit: tensor}`` or ``{unit: {key: tensor}}``; default magnitude masks.
    """
    unknown = [u for u in options if u not in units]
    if unknown:
        raise InputError(f"verify: the profile names units the model lacks, e.g. {unknown[:3]}")
    pruned = copy.deepcopy(model).eval()
    for name, key in options.items():
        if key == DENSE:
            continue
        unit = units[name]
        target = Unit(name, pruned.get_submodule(name), unit.kind)
        set_weight_matrix(target, _pruned_weight(weights, name, key, weight_matrix(unit).clone()))
    return pruned


def _tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model output (tensors, tuples, dicts, HF ModelOutputs)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else getattr(output, "to_tuple", lambda: ())()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"verify: cannot find a tensor in the model output of type {type(output).__name__}")


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _engine_dense(model: nn.Module, pruned_formats: Mapping[str, str]) -> nn.Module | None:
    """The engine's fastest dense run: a copy of the unpruned model with the kernel format (and
    convert's fusions) wherever the pruned model runs the kernel. None when the kernel is
    unavailable or unused: then dense torch is already the engine's dense run."""
    kernel_units = [u for u, f in pruned_formats.items() if f == "kernel"]
    if not kernel_units or not kernel_status()[0]:
        return None
    return convert(copy.deepcopy(model).eval(), {u: "kernel" for u in kernel_units})


def verify(
    model: nn.Module,
    units: Mapping[str, Unit],
    profile: Profile,
    batch: Any,
    table: TimingTable | None = None,
    weights: Weights | None = None,
    rounds: int = ROUNDS,
    formats: Mapping[str, str] | None = None,
    tolerance: float = TOLERANCE,
    threads: int | None = None,
    engine: str | None = None,
    engine_dense: bool = True,
    generation: bool = True,
    baseline: nn.Module | None = None,
) -> VerifyResult:
    """Build, convert and time the profile's pruned model against dense torch and, where the
    profile runs the kernel format, the engine's fastest dense run (`_engine_dense`).

    Formats: ``formats`` if given, else those the table recorded (`TimingTable.formats`) for the
    chosen options (so the runtime runs what was timed), else measured at convert time.
    Threads: ``threads``, else the table's, else all cores. The model itself is not changed.
    Engine: ``engine``, else the table's backend; ``deepsparse`` and ``cuda-2:4`` verify on that
    engine, pruned over its own dense run (`spdy.verify_engines`). ``engine_dense=False`` skips the
    engine's dense run (a third of the rounds' time) where only the speedup over dense torch is used,
    e.g. a curve's landing rounds; ``generation=False`` skips a decoding workload's timed ``generate``
    (else it runs min(``rounds``, `GENERATION_ROUNDS`) rounds). ``baseline``: the model the speedups are over, when
    not ``model`` itself (the original a shrunk ``model`` came from, with the same layer names); its dense torch
    run and its engine's fastest dense run are the two baselines.
    """
    from spdy.verify_engines import ENGINES, engine_of, verify_on_engine

    if (on := engine_of(table, engine)) in ENGINES:
        if baseline is not None:
            raise InputError(f"verify: a speedup over another model (a shrunk model's original) is measured on torch, not on {on}")
        return verify_on_engine(on, model, units, profile, batch, table, weights, rounds, tolerance, threads)
    options = dict(profile.options)
    target = profile.target
    predicted = table.predicted_speedup(options) if table is not None else profile.predicted_speedup
    threads = threads or (table.meta.get("threads") if table is not None else None) or torch.get_num_threads()
    if warning := oversubscribed(int(threads)):
        warnings.warn(f"verify: {warning}", RuntimeWarning, stacklevel=2)
    previous, grad = torch.get_num_threads(), torch.is_grad_enabled()
    set_threads(int(threads))
    torch.set_grad_enabled(False)
    try:
        model.eval()
        pruned = pruned_copy(model, units, options, weights)
        twin = copy.deepcopy(pruned) if generation and hasattr(batch, "generation") else None  # stays masked dense torch
        reference = _tensor(call_model(pruned, batch)).clone()
        chosen = dict(formats) if formats is not None else (table.formats(options) if table is not None else None)
        sparse_units = [u for u, k in options.items() if k != DENSE]
        if chosen is None:
            convert(pruned, units=sparse_units, example=batch)
        else:  # and the unpruned units the table timed in a faster format than torch's (not when ``formats`` names them)
            convert(pruned, {u: f for u, f in chosen.items() if u in sparse_units or formats is None and f != "dense"})
        out = _tensor(call_model(pruned, batch))
        error = _relative_error(out, reference)
        baseline = model if baseline is None else baseline.eval()
        contenders = {"dense": lambda: call_model(baseline, batch), "pruned": lambda: call_model(pruned, batch)}
        engine_dense = _engine_dense(baseline, formats_of(pruned)) if engine_dense else None
        if engine_dense is not None:
            dense_error = _relative_error(_tensor(call_model(engine_dense, batch)), _tensor(call_model(baseline, batch)))
            if not math.isfinite(dense_error) or dense_error > 1e-3:
                warnings.warn(f"verify: the engine's dense run differs from dense torch by {dense_error:.2e} (relative)", RuntimeWarning, stacklevel=2)
            contenders["engine dense"] = lambda: call_model(engine_dense, batch)
        samples = time_alternating(contenders, rounds)
        timed_whole = ((table.meta.get("deployed_fixed") or {}).get("whole_blocks") or {}) if table is not None else {}
        fused = [n for n in fused_blocks(pruned) if not any(n == b or n.startswith(b + ".") for b in timed_whole)]
        generated = batch.generation(baseline, pruned, twin, rounds=min(rounds, GENERATION_ROUNDS)) if twin is not None else None
    finally:
        set_threads(previous)
        torch.set_grad_enabled(grad)
    engine_ratios = [d / p for d, p in zip(samples.get("engine dense", []), samples["pruned"])]
    engine_time = statistics.median(samples["engine dense"]) if engine_ratios else None
    kernel_faster = engine_time is not None and engine_time < statistics.median(samples["dense"])
    result = VerifyResult.from_samples(
        samples["dense"], samples["pruned"], target, predicted, tolerance, threads, error,
        formats=formats_of(pruned),
        baseline=BASELINE if baseline is model else ORIGINAL,
        engine_baseline=None if engine_time is None else ENGINE_BASELINE if kernel_faster else TORCH_FASTER,
        engine_dense_time=engine_time,
        engine_dense_ratios=engine_ratios,
        fused=fused,
        generation=generated,
    )
    if engine_time is not None:
        result.speedup_over_engine_dense = statistics.median(engine_ratios) if kernel_faster else result.measured_speedup
    measured, met = result.measured_speedup, result.met
    if met is False:
        warnings.warn(
            f"SPEEDUP MISSED: measured {measured:.3f}x over {result.baseline} (spread {result.measured_spread:.1%}) < target {target:g}x "
            f"- {tolerance:.0%} noise tolerance; predicted {'?' if predicted is None else f'{predicted:.3f}'}x. The timing table may be stale or "
            f"measured under other load; re-measure it on this machine",
            SpeedupMiss,
            stacklevel=2,
        )
    if not math.isfinite(error) or error > 1e-3:
        warnings.warn(f"verify: the converted model's output differs from the masked dense model by {error:.2e} (relative)", RuntimeWarning, stacklevel=2)
    return result
