"""A profile is verified on the engine its table was timed on, and no engine name reaches convert().

The DeepSparse test runs in .venv-ds (`make test-deepsparse`); the others run where deepsparse
is missing (the main .venv), where `--engine deepsparse` must stop at once with the install hint.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

from spdy.cli import main
from spdy.errors import InputError
from spdy.models.digits import digits_mlp
from spdy.pipeline import prunable_units, timing_batch
from spdy.search.profile import Profile
from spdy.timing import measure
from spdy.timing.table import TimingTable
from spdy.verification import verify

HAS_DEEPSPARSE = importlib.util.find_spec("deepsparse") is not None


@pytest.fixture(scope="module")
def digits():
    bundle = digits_mlp(epochs=2)
    return bundle, prunable_units(bundle), timing_batch(bundle)


def _table(units: list[str], backend: str, fmt: str, key: str = "0.9000") -> TimingTable:
    """A recorded table as the ``backend`` writes one: every unit dense and at option ``key`` (format ``fmt``)."""
    times = {u: {"0.0000": 1e-3, key: 4e-4} for u in units}
    meta = {"backend": backend, "threads": 1, "formats": {u: {"0.0000": "dense", key: fmt} for u in units}}
    return TimingTable(times, 4e-3, 4e-3 - 1e-3 * len(units), meta)


def _uniform(units, level: str = "0.9") -> Profile:
    return Profile({u: level for u in units}, method="uniform")


def test_deepsparse_verify_digits_mlp_measures_deepsparse_against_deepsparse(digits, tmp_path: Path) -> None:
    pytest.importorskip("deepsparse", reason="deepsparse 1.8.0 is not installed in this environment (see .venv-ds)")
    from spdy.runtime.deepsparse import DeepSparseModel
    from spdy.runtime.timer import time_alternating

    bundle, units, batch = digits
    model = bundle.model
    table = measure(model, units, batch, levels=[0.9], backend="deepsparse", progress=False, threads=1, iterations=5,
                    warmup_iterations=1, workdir=str(tmp_path))
    assert table.meta["backend"] == "deepsparse"
    calls = []  # the dense torch model may be traced for export, but never timed
    hook = model.register_forward_hook(lambda m, i, o: calls.append(1) if m is model else None)
    try:
        result = verify(model, units, _uniform(units), batch, table, rounds=12)
    finally:
        hook.remove()
    assert len(calls) <= 2, f"dense torch ran {len(calls)} times during a deepsparse verify"
    assert result.baseline == "dense deepsparse" and result.threads == 1 and result.formats == {}
    assert result.output_error <= 1e-3, result.output_error
    assert len(result.ratios) == 12 and result.measured_speedup == statistics.median(result.ratios)
    # dense_time is DeepSparse's dense engine on this batch: an engine compiled here agrees within noise
    engine = DeepSparseModel(model, batch, 1, tmp_path / "check.onnx")
    alone = statistics.median(time_alternating({"engine": engine}, 12)["engine"])
    assert 1 / 3 < result.dense_time / alone < 3, (result.dense_time, alone)
    print(f"deepsparse verify, digits MLP uniform 90%: dense {result.dense_time * 1e6:.1f} us, pruned {result.pruned_time * 1e6:.1f} us, "
          f"measured {result.speedups()} (spread {result.measured_spread:.3f}), output error {result.output_error:.1e}")


def test_deepsparse_environment_solves_a_deepsparse_table(digits) -> None:
    """`make test-deepsparse`'s environment (.venv-ds, spdy installed without its dependencies) runs the
    DP too: `spdy run --engine deepsparse` there once died at the search on a missing numba."""
    from spdy.search.dp import solve

    bundle, units, batch = digits
    table = _table(list(units), "deepsparse", "deepsparse")
    solution = solve(table, 1.2)
    assert solution.predicted_speedup >= 1.2 and set(solution.profile) == set(units)


def test_engine_names_are_not_runtime_formats(digits) -> None:
    bundle, units, batch = digits
    names = list(units)
    options = {u: "0.9000" for u in names}
    assert _table(names, "deepsparse", "deepsparse").formats(options) is None
    assert _table(names, "torch-cpu", "csr").formats(options) == {u: "csr" for u in names}
    # a deepsparse table verified on the torch runtime on purpose: formats are chosen by measurement, not taken from it
    result = verify(bundle.model, units, _uniform(names), batch, _table(names, "deepsparse", "deepsparse"), rounds=3, threads=1,
                    engine="torch-cpu")
    assert result.baseline == "dense torch" and "deepsparse" not in result.formats.values()
    with pytest.raises(InputError, match="unknown engine 'onnxruntime'"):
        verify(bundle.model, units, _uniform(names), batch, engine="onnxruntime")


@pytest.mark.skipif(HAS_DEEPSPARSE, reason="deepsparse is installed here: the missing-engine message cannot be seen")
def test_engine_deepsparse_missing_stops_at_once_with_the_install_hint(digits, tmp_path: Path, capsys) -> None:
    bundle, units, batch = digits
    names = list(units)
    with pytest.raises(InputError, match=r"\.venv-ds.*spdy\[deepsparse\]"):
        verify(bundle.model, units, _uniform(names), batch, _table(names, "deepsparse", "deepsparse"))
    for argv in (["time", "digits", "--engine", "deepsparse", "-o", str(tmp_path / "t.json")],
                 ["run", "digits", "--engine", "deepsparse", "--work-dir", str(tmp_path / "work")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert "deepsparse 1.8.0" in err and ".venv-ds" in err and "pip install 'spdy[deepsparse]'" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda-2:4 verifies on it")
def test_cuda_2_4_without_a_gpu_says_it_cannot_verify(digits) -> None:
    bundle, units, batch = digits
    names = list(units)
    with pytest.raises(InputError, match="cannot be verified without a GPU"):
        verify(bundle.model, units, Profile({u: "2:4@0.5" for u in names}), batch, _table(names, "cuda-2:4", "2:4", "2:4@0.5000"))
