"""`verify` on a small real MLP: keys, formats from the table, weights sources, misses."""

from __future__ import annotations

import json
import statistics
import warnings

import pytest
import torch
from torch import nn

from spdy.levels import DENSE
from spdy.search.profile import Profile
from spdy.runtime import magnitude_mask
from spdy.timing import measure
from spdy.units import find_units, weight_matrix
from spdy.verification import UNDER_PREDICTED, SpeedupMiss, VerifyResult, pruned_copy, verify


@pytest.fixture()
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1024)).eval()
    return model, find_units(model, exclude=["4"]), torch.randn(64, 128)


def test_verify_reports_sensible_keys(mlp) -> None:
    model, units, x = mlp
    profile = Profile({"0": "0.9900", "2": "0.9900"}, target=1.0, predicted_speedup=1.2)
    before = weight_matrix(units["0"]).clone()
    result = verify(model, units, profile, x, rounds=6, formats={"0": "csr", "2": "csr"}, threads=1)
    data = result.to_json()
    assert {"target", "predicted_speedup", "measured_speedup", "measured_spread", "met"} <= set(data)
    json.dumps(data)
    assert data["target"] == 1.0 and data["predicted_speedup"] == 1.2
    assert len(data["ratios"]) == 6 and data["threads"] == 1
    assert data["measured_speedup"] == statistics.median(data["ratios"])
    quartiles = statistics.quantiles(data["ratios"], n=4)
    assert data["measured_spread"] == pytest.approx((quartiles[2] - quartiles[0]) / data["measured_speedup"])
    assert data["formats"] == {"0": "csr", "2": "csr"}
    assert data["output_error"] < 1e-4
    assert torch.equal(weight_matrix(units["0"]), before)  # the model itself is untouched


def test_formats_come_from_the_table(mlp) -> None:
    model, units, x = mlp
    table = measure(model, units, x, levels=[0.99], progress=False, threads=1, formats=("dense", "csr"), rounds=3, model_rounds=5)
    profile = Profile({"0": "0.9900", "2": DENSE}, target=None)
    result = verify(model, units, profile, x, table=table, rounds=4)
    expected = {u: f for u, f in {"0": table.meta["formats"]["0"]["0.9900"]}.items() if f != "dense"}
    assert result.formats == expected
    assert result.predicted_speedup == pytest.approx(table.predicted_speedup(profile.options))
    assert result.met is None and result.threads == 1


def test_weights_sources(mlp) -> None:
    model, units, x = mlp
    w0 = torch.zeros(512, 128)
    w0[:, 0] = 1.0
    for weights in ({"0": w0}, {"0": {"0.5000": w0}}, lambda unit, key: w0):
        pruned = pruned_copy(model, units, {"0": "0.5000"}, weights)
        assert torch.equal(pruned[0].weight, w0)
    default = pruned_copy(model, units, {"2": "0.9000"})
    assert torch.equal(default[2].weight != 0, magnitude_mask(model[2].weight, "0.9000"))
    with pytest.raises(ValueError, match="no entry for unit '0'"):
        pruned_copy(model, units, {"0": "0.5000"}, {"2": w0})
    with pytest.raises(ValueError, match="shape"):
        pruned_copy(model, units, {"0": "0.5000"}, {"0": torch.zeros(3, 3)})


@pytest.fixture()
def wide():
    """Two wide pruned layers that hold nearly all the work, and a small dense head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    return model, find_units(model, exclude=["4"]), torch.randn(64, 256)


SPARSE = {"0": "0.9900", "2": "0.9900"}
KERNEL = {"0": "kernel", "2": "kernel"}


def test_sparse_kernel_runs_faster_than_dense(wide) -> None:
    """At 99% sparsity the kernel format beats the dense layers it replaces; a profile with every
    unit dense runs the dense model against itself and measures ~1x."""
    model, units, x = wide
    sparse = verify(model, units, Profile(SPARSE), x, rounds=12, formats=KERNEL, threads=1)
    dense = verify(model, units, Profile({"0": DENSE, "2": DENSE}), x, rounds=12, formats=KERNEL, threads=1)
    assert sparse.formats == KERNEL and dense.formats == {}
    assert sparse.output_error < 1e-5 and dense.output_error == 0.0  # the converted model computes what its masked twin does
    assert sparse.measured_speedup > 2 and sparse.measured_speedup > 2 * dense.measured_speedup
    assert abs(dense.measured_speedup - 1) <= max(2 * dense.measured_spread, 0.15)


def test_met_follows_the_measurement(wide) -> None:
    """Targets set from a first measurement: well under it is met, well over it is missed (with a
    warning that gives the measured figure), and ``tolerance`` is the slack a target gets. The margins
    are wide because a process's first measurement can be 2x its later ones (cold allocator)."""
    model, units, x = wide
    measured = verify(model, units, Profile(SPARSE), x, rounds=10, formats=KERNEL, threads=1).measured_speedup
    for target, tolerance, expected in ((0.3 * measured, 0.03, True), (1.5 * measured, 0.8, True), (4 * measured, 0.03, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = verify(model, units, Profile(SPARSE, target=target), x, rounds=10, formats=KERNEL, threads=1, tolerance=tolerance)
        assert result.met is (result.measured_speedup >= target * (1 - tolerance)), (target, tolerance, result.measured_speedup)
        assert result.met is expected, (target, tolerance, result.measured_speedup, measured)
        misses = [str(w.message) for w in caught if issubclass(w.category, SpeedupMiss)]
        assert len(misses) == (0 if expected else 1)
        assert all(f"{result.measured_speedup:.3f}x" in m and f"{target:g}x" in m for m in misses)


def _result(measured: float, predicted: float | None) -> VerifyResult:
    return VerifyResult(target=1.9, predicted_speedup=predicted, measured_speedup=measured, measured_spread=0.05,
                        met=True, tolerance=0.03, dense_time=1.0, pruned_time=1.0 / measured, rounds=30, threads=2,
                        output_error=0.0)


def test_under_prediction_is_named_only_beyond_noise() -> None:
    """A model that runs beyond UNDER_PREDICTED x its prediction gets a note that gives the factor;
    within that band, or without a prediction, nothing is said."""
    for predicted in (1.3, 1.901, 3.0):
        beyond = _result(predicted * UNDER_PREDICTED * 1.01, predicted)
        assert f"{beyond.measured_speedup / predicted:.1f}x" in beyond.under_prediction()
        assert _result(predicted * UNDER_PREDICTED * 0.99, predicted).under_prediction() == ""
        assert _result(predicted * 0.5, predicted).under_prediction() == ""
    assert _result(4.0, None).under_prediction() == ""
    note = _result(4.125, 1.901).under_prediction()
    cached = VerifyResult(**json.loads(json.dumps(_result(4.125, 1.901).to_json())))  # as `spdy run` reads it back
    assert note and cached.under_prediction() == note
