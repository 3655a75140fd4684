"""`verify` on a small real MLP: keys, formats from the table, weights sources, misses."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from spdy.levels import DENSE
from spdy.search.profile import Profile
from spdy.runtime import magnitude_mask
from spdy.timing import measure
from spdy.units import find_units, weight_matrix
from spdy.verification import SpeedupMiss, VerifyResult, pruned_copy, verify


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
    assert data["measured_speedup"] > 0 and data["measured_spread"] >= 0
    assert len(data["ratios"]) == 6 and data["threads"] == 1
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


def test_a_clear_miss_warns(mlp) -> None:
    model, units, x = mlp
    profile = Profile({"0": "0.5000"}, target=50.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = verify(model, units, profile, x, rounds=4, formats={"0": "dense"}, threads=1)
    assert isinstance(result, VerifyResult) and result.met is False
    assert any(issubclass(w.category, SpeedupMiss) and "SPEEDUP MISSED" in str(w.message) for w in caught)


def _result(measured: float, predicted: float | None) -> VerifyResult:
    return VerifyResult(target=1.9, predicted_speedup=predicted, measured_speedup=measured, measured_spread=0.05,
                        met=True, tolerance=0.03, dense_time=1.0, pruned_time=1.0 / measured, rounds=30, threads=2,
                        output_error=0.0)


def test_under_prediction_is_named_only_beyond_noise() -> None:
    """A model well beyond its prediction gets a line saying why (the table sees no fusions);
    within 25% of it, or without a prediction, nothing is said."""
    note = _result(4.125, 1.901).under_prediction()
    assert "2.2x" in note and "fuse" in note
    assert _result(2.3, 1.901).under_prediction() == ""
    assert _result(4.0, None).under_prediction() == ""
    cached = VerifyResult(**json.loads(json.dumps(_result(4.125, 1.901).to_json())))  # as `spdy run` reads it back
    assert cached.under_prediction() == note
