"""`verify` on a small real MLP: keys, formats from the table, weights sources, misses, the
engine's dense baseline, and the notes on under-prediction and over-delivery."""

from __future__ import annotations

from dataclasses import replace
import json
import re
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
from spdy.verification import (BASELINE, ENGINE_BASELINE, OVER_DELIVERED, TORCH_FASTER, UNDER_PREDICTED, SpeedupMiss,
                               VerifyResult, pruned_copy, verify)


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


def _result(measured: float, predicted: float | None, fused: list[str] | None = None, target: float | None = 1.9,
            met: bool | None = True) -> VerifyResult:
    return VerifyResult(target=target, predicted_speedup=predicted, measured_speedup=measured, measured_spread=0.05,
                        met=met, tolerance=0.03, dense_time=1.0, pruned_time=1.0 / measured, rounds=30, threads=2,
                        output_error=0.0, fused=fused)


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


def test_engine_dense_baseline_is_measured_in_the_same_rounds(wide) -> None:
    """A kernel-format profile is also timed against the unpruned model in the kernel format: one
    ratio per round; the speedup over the engine's fastest dense run is their median where that
    model beats dense torch, else the speedup over dense torch; it computes what dense torch does
    (no warning). Nothing is fused in an nn.Sequential, so a prediction far below
    the measurement is blamed on the table, not on fusions."""
    model, units, x = wide
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = verify(model, units, Profile(SPARSE, predicted_speedup=1.01), x, rounds=8, formats=KERNEL, threads=1)
    assert not [w for w in caught if "engine's dense run" in str(w.message)]
    assert result.baseline == BASELINE == "dense torch" and len(result.engine_dense_ratios) == 8
    if result.engine_dense_time < result.dense_time:
        assert result.engine_baseline == ENGINE_BASELINE
        assert result.speedup_over_engine_dense == statistics.median(result.engine_dense_ratios)
    else:
        assert result.engine_baseline == TORCH_FASTER and result.speedup_over_engine_dense == result.measured_speedup
    assert result.engine_dense_time > result.pruned_time and statistics.median(result.engine_dense_ratios) > 1.5  # 99% sparse vs 0%
    assert result.fused == []
    note = result.under_prediction()
    assert "saw every block that runs fused" in note and "re-time" in note and "over dense torch" in note
    text = result.speedups()
    assert text.startswith(f"{result.measured_speedup:.3f}x over dense torch (") and \
        f"{result.speedup_over_engine_dense:.3f}x over the engine's fastest dense run: {result.engine_baseline})" in text
    assert VerifyResult(**json.loads(json.dumps(result.to_json()))) == result


def test_engine_dense_is_skipped_without_a_kernel_unit_or_when_not_asked_for(wide) -> None:
    """Without a unit in the kernel format the engine's dense run is dense torch itself: not measured;
    nor is it where the caller needs only the speedup over dense torch."""
    model, units, x = wide
    for profile, formats, asked in ((Profile(SPARSE), {"0": "csr", "2": "csr"}, True), (Profile({"0": DENSE, "2": DENSE}), KERNEL, True),
                                    (Profile(SPARSE), KERNEL, False)):
        result = verify(model, units, profile, x, rounds=4, formats=formats, threads=1, engine_dense=asked)
        assert result.engine_dense_time is None and result.speedup_over_engine_dense is None
        assert result.engine_baseline is None and result.engine_dense_ratios == []
        assert result.speedups() == f"{result.measured_speedup:.3f}x over dense torch"


def test_under_prediction_names_what_is_true() -> None:
    """Fused blocks are named when there are some; with none the table itself is blamed; a result
    saved before fusions were recorded says both are possible."""
    fused = _result(4.0, 1.5, fused=["encoder.layer.0", "encoder.layer.1.output"]).under_prediction()
    assert "2 blocks convert() fused" in fused and "encoder.layer.0" in fused and "saw every block" not in fused
    plain = _result(4.0, 1.5, fused=[]).under_prediction()
    assert "saw every block that runs fused" in plain and "re-time" in plain and "convert() fused" not in plain
    old = _result(4.0, 1.5).to_json()
    for key in ("baseline", "engine_baseline", "engine_dense_time", "speedup_over_engine_dense", "engine_dense_ratios", "fused"):
        del old[key]  # a verify JSON cached before these fields existed
    legacy = VerifyResult(**old)
    assert legacy.baseline == "dense torch" and legacy.fused is None and legacy.speedup_over_engine_dense is None
    assert "may not see" in legacy.under_prediction() and "re-time" in legacy.under_prediction()
    assert _result(1.6, 1.5, fused=["x"]).under_prediction() == ""


def test_over_delivery_is_flagged_only_beyond_the_band() -> None:
    """A met profile more than OVER_DELIVERED x faster than its target is told it gives accuracy away;
    within the band, a miss or no target says nothing."""
    beyond = _result(1.9 * OVER_DELIVERED * 1.01, 1.9).over_delivery()
    assert "over-delivered" in beyond and f"{OVER_DELIVERED * 1.01:.2f}x the 1.9x target" in beyond and "accuracy" in beyond
    assert _result(1.9 * OVER_DELIVERED * 0.99, 1.9).over_delivery() == ""
    assert _result(1.9 * 3, 1.9, met=False).over_delivery() == ""
    assert _result(3.0, 1.9, target=None, met=None).over_delivery() == ""
    free = replace(_result(3.0, 1.9), engine_baseline="the kernel format at 0%", speedup_over_engine_dense=1.01).over_delivery()
    assert "without pruning" in free and "the kernel format at 0% alone" in free and "accuracy" not in free
    pruned = replace(_result(3.0, 1.9), engine_baseline="the kernel format at 0%", speedup_over_engine_dense=1.5).over_delivery()
    assert "accuracy" in pruned


def test_cli_verify_names_its_baselines(tmp_path, capsys) -> None:
    """`spdy verify` prints the speedup over dense torch, over the engine's dense run exactly when
    that was measured (a kernel-format unit), the over-delivery note exactly when a met target is
    exceeded beyond the band; the JSON carries the new fields."""
    from spdy.cli import main
    from spdy.models import load_model
    from spdy.units import find_units

    names = list(find_units(load_model("digits").model))[:-1]
    path = tmp_path / "profile.json"
    Profile({n: "0.9500" for n in names}, target=1.01).save(path)
    args = ["verify", "digits", "--profile", str(path), "--rounds", "6", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([*args, "--json"])
        data = json.loads(capsys.readouterr().out)
        assert code == (0 if data["met"] else 1)
        assert data["baseline"] == "dense torch" and data["fused"] == []
        assert (data["speedup_over_engine_dense"] is not None) == ("kernel" in data["formats"].values())
        code = main(args)
    out = capsys.readouterr().out
    line = re.search(r"measured (\d+\.\d+)x over dense torch( \(\d+\.\d+x over the engine's fastest dense run: "
                     r"[^)]*0%\))? \(spread .*target 1\.01x: (MET|NOT MET)\n", out)
    assert line, out
    measured, met = float(line.group(1)), line.group(3) == "MET"
    assert code == (0 if met else 1)
    if abs(measured / 1.01 - OVER_DELIVERED) > 1e-3:
        assert ("note: over-delivered" in out) == (met and measured > OVER_DELIVERED * 1.01), out
