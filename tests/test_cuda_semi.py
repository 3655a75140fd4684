"""2:4 on NVIDIA GPUs: conversion, numerics and the cuda-2:4 timing backend (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from spdy.database import Stitcher, build_database
from spdy.errors import InputError
from spdy.levels import DENSE, options_for
from spdy.models.digits import digits_mlp
from spdy.runtime.semi_structured import SemiStructuredLinear, available, check_2_4, to_semi_structured
from spdy.timing.table import TimingTable
from spdy.timing.cuda_semi import SEMI, CudaSemiBackend
from spdy.units import capture_shapes, find_units

GPU, WHY = available()
needs_gpu = pytest.mark.skipif(not GPU, reason=f"needs an NVIDIA GPU with 2:4 sparse tensor cores: {WHY}")
# digits MLP Linears whose shapes fit every 2:4 kernel (the 10-class head has 10 rows: too few).
UNITS = ["0", "3"]


@pytest.fixture(scope="module")
def pruned_digits(tmp_path_factory):
    """The digits MLP with its two hidden Linears at 2:4 (magnitude) and the dense original."""
    bundle = digits_mlp()
    dense = copy.deepcopy(bundle.model)
    units = find_units(bundle.model, UNITS)
    db = build_database(bundle.model, units, bundle.calibration, options_for("2:4"), tmp_path_factory.mktemp("db"), pruner="magnitude", progress=False)
    Stitcher(units, db).apply({n: SEMI for n in units})
    return bundle, dense, units


def test_check_2_4_names_the_weight():
    w = torch.ones(8, 8)
    with pytest.raises(ValueError, match="layer.0.fc: 16 groups"):
        check_2_4(w, "layer.0.fc")
    check_2_4(w * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(2), "ok")


@pytest.mark.skipif(GPU, reason="checks the error on machines without a GPU")
def test_without_gpu_conversion_refuses_clearly():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        to_semi_structured(model, ["0"])
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        SemiStructuredLinear(model[0])
    with pytest.raises(InputError, match="timing backend cuda-2:4: no CUDA GPU"):
        CudaSemiBackend()


@needs_gpu
def test_semi_structured_linear_matches_dense_fp16(pruned_digits):
    bundle, _, units = pruned_digits
    layer = units["3"].module
    sparse = SemiStructuredLinear(layer, torch.float16, "3")
    dense = copy.deepcopy(layer).to("cuda", torch.float16)
    x = torch.randn(3, 37, layer.in_features, device="cuda", dtype=torch.float16)  # odd row count: torch pads
    torch.testing.assert_close(sparse(x), dense(x), rtol=2e-2, atol=2e-2)


@needs_gpu
def test_converted_model_agrees_with_the_pruned_model(pruned_digits):
    bundle, _, units = pruned_digits
    deployed = to_semi_structured(bundle.model, units)
    assert all(isinstance(deployed.get_submodule(n), SemiStructuredLinear) for n in UNITS)
    x = bundle.heldout[0]
    with torch.no_grad():
        got = deployed(x.to("cuda", torch.float16)).float().cpu()
        want = bundle.model(x)
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.98
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@needs_gpu
def test_non_2_4_weight_is_refused(pruned_digits):
    _, dense, _ = pruned_digits
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        SemiStructuredLinear(dense[3], torch.float16, "3")


@needs_gpu
def test_backend_times_dense_and_2_4(pruned_digits):
    bundle, dense, _ = pruned_digits
    units = find_units(dense, UNITS)
    capture_shapes(dense, units, bundle.calibration[0])
    backend = CudaSemiBackend(rounds=5, number=5)
    backend.prepare(dense, units, bundle.calibration[0])
    timing = backend.unit_times(units["3"], [DENSE, SEMI])
    assert set(timing.times) == {DENSE, SEMI} and all(t > 0 for t in timing.times.values())
    with pytest.raises(ValueError, match="only 0.0000"):
        backend.unit_times(units["3"], [DENSE, "0.9000"])
    assert backend.model_time(dense, bundle.calibration[0]).median > 0


@needs_gpu
def test_a_2_4_profile_verifies_and_calibrates_on_the_gpu(pruned_digits, tmp_path):
    """verify runs the 2:4 model against the dense one in fp16 on the GPU; `spdy run`'s calibration fits a
    cuda-2:4 table from such runs (or says why it could not)."""
    from dataclasses import replace

    from spdy.pipeline import CALIBRATION_SHARES, calibrate
    from spdy.search.profile import Profile
    from spdy.timing import measure
    from spdy.verification import verify

    bundle, dense, _ = pruned_digits
    units = find_units(dense, UNITS)
    batch = bundle.calibration[0]
    table = measure(dense, units, batch, options=[DENSE, SEMI], backend="cuda-2:4", progress=False, rounds=5, number=5)
    assert table.meta["backend"] == "cuda-2:4" and table.meta["gpu"] and set(table.units) == set(UNITS)
    result = verify(dense, units, Profile({u: SEMI for u in UNITS}), batch, table, rounds=5)  # no target: 2:4 need not pay here
    assert result.baseline == "dense torch cuda" and len(result.ratios) == 5 and result.output_error < 1e-2
    # a table that says 2:4 halves each layer (at these small layers it may not): calibration measures what it really does
    halved = TimingTable({u: {DENSE: t[DENSE], SEMI: t[DENSE] / 2} for u, t in table.times.items()}, table.base, table.fixed, table.meta)
    calibrated, path = calibrate(replace(bundle, model=dense), units, halved, tmp_path / "timings.json", engine="cuda-2:4")
    fit = calibrated.meta["calibration"]
    assert path.is_file()
    if "points" in fit:  # one per DP profile calibrate measured, each a real time
        assert len(fit["points"]) == len(CALIBRATION_SHARES) and all(p["measured_time"] > 0 for p in fit["points"]), fit
    else:  # the runs could not be fitted: the reason is kept
        assert fit["skipped"], fit
