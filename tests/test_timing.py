"""The torch-cpu backend and `measure` on small real models: valid tables, resume, dedupe."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from spdy.levels import DENSE
from spdy.runtime.timer import Stat
from spdy.timing import FixedTimeError, measure
from spdy.timing.backend import Backend, UnitTiming, backend_names, get_backend, register_backend
from spdy.timing.table import TimingTable
from spdy.timing.torch_cpu import TorchCpuBackend
from spdy.units import Unit, find_units

FAST = {"formats": ("dense", "csr"), "rounds": 3, "model_rounds": 5}
LEVELS = [0.5, 0.9, 0.99]


class Net(nn.Module):
    """Three prunable Linears (two of equal shape) and a big Linear left out of the solver,
    so ``fixed`` is clearly positive even on a noisy machine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(128, 256)
        self.b = nn.Linear(256, 256)
        self.c = nn.Linear(256, 256)
        self.head = nn.Linear(256, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.fixture()
def net() -> tuple[nn.Module, dict[str, Unit], torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    return model, find_units(model, exclude=["head"]), torch.randn(64, 128)


def test_measure_gives_a_valid_table(net, tmp_path: Path) -> None:
    model, units, x = net
    table = measure(model, units, x, levels=LEVELS, progress=False, threads=1, **FAST)
    assert table.units == ["a", "b", "c"]
    for unit in table.units:
        assert table.options(unit) == [DENSE, "0.5000", "0.9000", "0.9900"]
        assert set(table.meta["formats"][unit]) == set(table.options(unit))
        assert set(table.meta["formats"][unit].values()) <= {"dense", "csr"}
        for key, fmt in table.meta["formats"][unit].items():
            if fmt == "dense":
                assert table.times[unit][key] == table.dense_time(unit)
    assert table.fixed >= 0 and table.base > table.fixed
    # base is the dense model's time, before and after the units pooled; fixed is what the units leave of it
    assert min(table.meta["base_before"], table.meta["base_after"]) <= table.base <= max(table.meta["base_before"], table.meta["base_after"])
    assert table.fixed + sum(table.unpruned_time(u) for u in table.units) == pytest.approx(table.base)
    # a format is kept only when it beats dense in the same run, so no option costs more than dense
    assert all(t <= table.dense_time(u) for u in table.units for t in table.times[u].values())
    assert table.max_speedup() >= 1
    assert table.meta["shared"] == {"c": "b"}  # same shapes: measured once
    assert table.meta["threads"] == 1 and table.meta["backend"] == "torch-cpu"
    assert {"cpu", "torch", "date", "batch_shapes", "base_before", "base_after"} <= set(table.meta)
    assert table.shapes["a"]["input"] == [64, 128]
    table.save(tmp_path / "t.json")
    assert TimingTable.load(tmp_path / "t.json").times == table.times


def test_the_dense_option_runs_in_the_kernel_format_where_that_is_faster(net) -> None:
    """The deployed runtime runs an unpruned unit in the kernel format when that beats torch's ``F.linear``
    (it does on some CPUs): then the dense option is the kernel's time, ``base`` still holds torch's, and
    verify converts those unpruned units too, computing what the dense model does."""
    from spdy.runtime import kernel_status
    from spdy.search.profile import Profile
    from spdy.verification import verify

    if not kernel_status()[0]:
        pytest.skip(f"the kernel format is unavailable here: {kernel_status()[1]}")
    model, units, x = net
    table = measure(model, units, x, levels=[0.9], progress=False, threads=1, formats=("dense", "kernel"), rounds=5, model_rounds=5)
    unpruned = table.meta["unpruned"]
    assert set(unpruned) == set(table.units)
    deployed = table.meta.get("deployed_fixed")
    if table.dense_formats():  # the time outside the units: the model converted to the dense options, less their times
        assert table.fixed == pytest.approx(max(deployed["reference_model"] - sum(table.dense_time(u) for u in table.units), 0.0))
    else:  # the unpruned model runs as torch runs it: its time, less the units'
        assert deployed is None and table.fixed + sum(unpruned.values()) == pytest.approx(table.base)
    for unit in table.units:
        assert table.unpruned_time(unit) == unpruned[unit]
        if table.meta["formats"][unit][DENSE] == "dense":
            assert table.dense_time(unit) == unpruned[unit]
        else:  # kept only when faster than torch by the formats' minimum gain
            assert table.meta["formats"][unit][DENSE] == "kernel" and table.dense_time(unit) < unpruned[unit]
    result = verify(model, units, Profile({u: DENSE for u in table.units}), x, table, rounds=3, threads=1)
    assert result.formats == table.dense_formats() and result.output_error < 1e-5


def test_option_keys_per_unit_and_block_patterns(net) -> None:
    model, units, x = net
    options = {"a": ["16x16@0.9000"], "b": ["0.9900"], "c": ["0.9900"]}
    table = measure(model, units, x, options=options, progress=False, dedupe=False, threads=1, formats=("dense", "csr", "bsr"), rounds=3, model_rounds=5)
    assert table.options("a") == [DENSE, "16x16@0.9000"]
    assert table.meta["shared"] == {}
    assert table.meta["formats"]["a"]["16x16@0.9000"] in ("dense", "csr", "bsr")


class Stop(Exception):
    pass


def test_checkpoint_resumes_without_remeasuring(net, tmp_path: Path) -> None:
    model, units, x = net
    path = tmp_path / "ck.json"

    def stop_after_a(name: str) -> None:
        if name == "a":
            raise Stop

    with pytest.raises(Stop):
        measure(model, units, x, levels=LEVELS, checkpoint=path, progress=False, on_unit=stop_after_a, dedupe=False, threads=1, **FAST)
    saved = json.loads(path.read_text())["entries"]
    assert list(saved) == ["a"]
    seen: list[str] = []
    table = measure(model, units, x, levels=LEVELS, checkpoint=path, progress=False, on_unit=seen.append, dedupe=False, threads=1, **FAST)
    assert seen == ["b", "c"]  # "a" came from the checkpoint
    assert set(table.units) == {"a", "b", "c"}
    assert table.times["a"][DENSE] == saved["a"]["times"][DENSE]
    assert table.times["a"]["0.9900"] == saved["a"]["times"]["0.9900"]
    # A wider level set measures only the missing levels of every unit.
    seen.clear()
    wider = measure(model, units, x, levels=LEVELS + [0.95], checkpoint=path, progress=False, on_unit=seen.append, dedupe=False, threads=1, **FAST)
    assert seen == ["a", "b", "c"] and "0.9500" in wider.options("a")
    with pytest.raises(ValueError, match="measured differently"):
        measure(model, units, x, levels=LEVELS, checkpoint=path, progress=False, threads=2, **FAST)


class InflatedUnits(TorchCpuBackend):
    """A backend whose unit times are 1000x too long: the sum exceeds the model time."""

    name = "inflated"

    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        timing = super().unit_times(unit, options)
        return UnitTiming({k: 1000 * t for k, t in timing.times.items()}, timing.formats, timing.spread)


def test_negative_fixed_is_an_error(net) -> None:
    model, units, x = net
    register_backend("inflated", InflatedUnits)
    assert "inflated" in backend_names()
    with pytest.raises(FixedTimeError, match="more than the whole model"):
        measure(model, units, x, levels=[0.9], backend="inflated", progress=False, threads=1, **FAST)


class InflatedFirstPass(TorchCpuBackend):
    """A backend whose first timing of each unit is 1000x too long, as if another job had the cores then."""

    name = "inflated-once"

    def __init__(self, **options):
        super().__init__(**options)
        self.seen: set[str] = set()

    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        timing = super().unit_times(unit, options)
        scale = 1 if unit.name in self.seen else 1000
        self.seen.add(unit.name)
        return UnitTiming({k: scale * t for k, t in timing.times.items()}, timing.formats, timing.spread)


def test_units_summing_over_the_model_are_timed_once_more(net) -> None:
    model, units, x = net
    engine = InflatedFirstPass(threads=1, **FAST)
    with pytest.warns(RuntimeWarning, match="timing them again"):
        table = measure(model, units, x, levels=[0.9], backend=engine, progress=False, dedupe=False)
    assert engine.seen == set(units) and table.fixed >= 0
    assert sum(table.times[u][DENSE] for u in table.units) <= 1.03 * table.base


def test_backend_registry_errors() -> None:
    with pytest.raises(ValueError, match="unknown timing backend"):
        get_backend("tpu")
    with pytest.raises(ValueError, match="unknown formats"):
        get_backend("torch-cpu", formats=("coo",))
    assert isinstance(get_backend("torch-cpu", threads=1), Backend)


def test_model_time_grows_with_the_model(one_thread) -> None:
    """A model with ~500x the multiply-adds of another takes far longer, however noisy the machine (one
    thread: two threads on a loaded 2-core machine make even a tiny layer wait milliseconds for a core)."""
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    tiny = nn.Linear(128, 16).eval()
    big = nn.Sequential(nn.Linear(128, 1024), nn.Linear(1024, 1024)).eval()
    backend = TorchCpuBackend(threads=1, model_rounds=4)
    small, large = backend.model_time(tiny, x), backend.model_time(big, x)
    assert small.samples >= 4 and large.samples >= 4
    assert large.median > 10 * small.median


def test_stat_median_ignores_an_outlier() -> None:
    """One slow sample (a descheduled run) leaves the median and barely widens the spread (IQR, not range)."""
    steady = Stat.of([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0])
    burst = Stat.of([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 100.0])
    assert steady.median == burst.median == 1.0 and burst.samples == 7
    assert steady.spread <= burst.spread < 0.2


def test_deepsparse_layers_match_units_by_onnx_scope() -> None:
    from spdy.timing.deepsparse import unit_layer_times

    q, k = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"
    ffn = "bert.encoder.layer.10.intermediate.dense"
    info = [
        {"canonical_name": "<none>", "average_run_time_in_ms": 9.0},
        {"canonical_name": "/bert/encoder/layer.0/attention/self/query/MatMul_output_0,/bert/encoder/layer.0/attention/self/query/Add_output_0", "average_run_time_in_ms": 2.0},
        {"canonical_name": "/bert/encoder/layer.0/attention/self/MatMul_output_0", "average_run_time_in_ms": 5.0},  # QK^T: no unit
        {"canonical_name": "/bert/encoder/layer.0/attention/self/key/MatMul_output_0", "average_run_time_in_ms": 3.0},
        {"canonical_name": "/bert/encoder/layer.10/intermediate/dense/MatMul_output_0", "average_run_time_in_ms": 4.0},
        {"canonical_name": "/bert/encoder/layer.1/intermediate/dense/MatMul_output_0", "average_run_time_in_ms": 7.0},
    ]
    assert unit_layer_times(info, [q, k, ffn]) == {q: 2.0, k: 3.0, ffn: 4.0}
    with pytest.raises(ValueError, match="no engine layer computes"):
        unit_layer_times(info, ["bert.encoder.layer.2.output.dense"])


def test_deepsparse_backend_end_to_end(net, tmp_path: Path) -> None:
    pytest.importorskip("deepsparse", reason="deepsparse 1.8.0 is not installed in this environment (see .venv-ds)")
    model, units, x = net
    table = measure(model, units, x, levels=[0.9], backend="deepsparse", progress=False, threads=1, iterations=5, warmup_iterations=1, workdir=str(tmp_path))
    assert table.units == ["a", "b", "c"] and table.meta["backend"] == "deepsparse"
    assert table.fixed >= 0 and table.fixed + sum(table.unpruned_time(u) for u in table.units) == pytest.approx(table.base)
    assert table.meta["formats"]["a"]["0.9000"] == "deepsparse"


def test_oversubscription_discounts_this_process_own_threads(monkeypatch) -> None:
    """A long 2-thread job raises the load average by itself; only other processes' load should warn."""
    import os

    from spdy.runtime import timer

    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.1, cores, cores))
    monkeypatch.setattr(timer, "_own_load", lambda: 2.0)
    assert timer.oversubscribed(2) is None
    monkeypatch.setattr(timer, "_own_load", lambda: 0.0)
    assert "oversubscribed" in timer.oversubscribed(2)
    assert timer.oversubscribed(1) is None


class ConstantTimes(Backend):
    """Every unit takes 1 ms dense and half that pruned; the model takes ``model_ms``: known numbers."""

    name = "constant"

    def __init__(self, model_ms: float):
        self.model_ms = model_ms

    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        return UnitTiming({k: 1e-3 if k == DENSE else 0.5e-3 for k in options})

    def model_time(self, model: nn.Module, batch) -> Stat:
        return Stat(self.model_ms * 1e-3, 0.0, 1)


@pytest.mark.parametrize("model_ms, fixed_ms", [(2.94, 0.0), (3.5, 0.5)])
def test_units_a_little_over_the_model_mean_zero_fixed(net, model_ms: float, fixed_ms: float) -> None:
    model, units, x = net  # 3 units of 1 ms each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = measure(model, units, x, levels=[0.9], backend=ConstantTimes(model_ms), progress=False, dedupe=False)
    assert table.fixed == pytest.approx(fixed_ms * 1e-3)
    assert any("within timing noise" in str(w.message) for w in caught) == (fixed_ms == 0.0)
    with pytest.raises(FixedTimeError, match="more than the whole model"):
        measure(model, units, x, levels=[0.9], backend=ConstantTimes(2.9), progress=False, dedupe=False)


class DisturbedModel(ConstantTimes):
    """The model measures ``times`` ms in turn: e.g. slowed by another job before the units, not after."""

    def __init__(self, *times: float):
        self.times = list(times)

    def model_time(self, model: nn.Module, batch) -> Stat:
        return Stat(self.times.pop(0) * 1e-3, 0.0, 1)


def test_a_base_measured_at_two_speeds_is_measured_a_third_time(net) -> None:
    model, units, x = net  # 3 units of 1 ms each
    table = measure(model, units, x, levels=[0.9], backend=DisturbedModel(16.0, 4.0, 4.2), progress=False, dedupe=False)
    assert table.base == pytest.approx(4.2e-3) and table.meta["base_again"] == pytest.approx(4.2e-3)
    assert table.fixed == pytest.approx(1.2e-3)
    agreeing = measure(model, units, x, levels=[0.9], backend=DisturbedModel(4.0, 4.4), progress=False, dedupe=False)
    assert agreeing.base == pytest.approx(4.2e-3) and "base_again" not in agreeing.meta
