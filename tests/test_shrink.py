"""Mixed profiles (`spdy run --shrink S`): a structured stage shrinks the model, then the smaller model is
pruned unstructured; every speedup and loss is over the original model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import spdy
from spdy.cli import main
from spdy.errors import InputError
from spdy.search.evaluate import Evaluator
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable
from spdy.units import find_units
from spdy.verification import BASELINE, ORIGINAL, verify


def wide_mlp() -> tuple[nn.Module, list, list]:
    """MODEL for `spdy run`: a random-weight MLP whose first hidden layer is wide enough to shrink and to prune."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(128, 64, generator=g) for _ in range(8)]
    return model, batches[:6], batches[6:]


def test_a_rebased_table_predicts_speedups_over_the_original(tmp_path):
    times = {"a": {"0.0000": 1.0, "0.5000": 0.6, "0.9000": 0.3}, "b": {"0.0000": 2.0, "0.5000": 1.5, "0.9000": 0.5}}
    table = TimingTable(times, base=4.0, fixed=1.0)
    rebased = table.rebased(1.25, "the original")
    assert table.reference_speedup == 1.0 and rebased.reference_speedup == 1.25
    assert rebased.predicted_speedup({}) == pytest.approx(1.25)  # the smaller model, unpruned, over the original
    assert rebased.max_speedup() == pytest.approx(1.25 * table.max_speedup())
    assert rebased.budget(1.25) == pytest.approx(3.0)  # every unit dense fits that target exactly
    assert rebased.fixed == table.fixed and rebased.times == table.times and table.base == 4.0
    rebased.save(tmp_path / "t.json")
    assert TimingTable.load(tmp_path / "t.json").reference_speedup == 1.25
    # calibrated, the planning curve is anchored at the unpruned smaller model's own speedup, not at 1
    points = [({"a": "0.5000"}, 1.4), ({"a": "0.9000", "b": "0.5000"}, 1.7), ({"a": "0.9000", "b": "0.9000"}, 2.4)]
    calibrated = rebased.calibrated(points)
    assert calibrated.reference_speedup == 1.25
    assert calibrated.planning_target(1.25) == pytest.approx(calibrated.predicted_speedup({}), rel=1e-3)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(InputError, match="finite positive speedup"):
            table.rebased(bad, "the original")


def test_verify_measures_over_the_original_and_evaluates_against_its_outputs():
    """A model a quarter the width, with the same layer names: verified over the original (16x the multiply-adds in
    its first two layers), and an evaluator compares it with the original's outputs, not its own."""
    original, batches, _ = wide_mlp()
    torch.manual_seed(2)
    small = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    units = find_units(small, exclude=["4"])
    profile = Profile({"0": "0.0000", "2": "0.0000"}, target=None)
    calls = []
    original.register_forward_hook(lambda module, args, out: calls.append(1))
    over_original = verify(small, units, profile, batches[0], rounds=6, threads=1, baseline=original, engine_dense=False)
    timed_original = len(calls)
    over_itself = verify(small, units, profile, batches[0], rounds=6, threads=1, engine_dense=False)
    assert over_original.baseline == ORIGINAL and over_itself.baseline == BASELINE
    assert timed_original >= 6 and len(calls) == timed_original  # the original is the run timed as dense, and only when asked
    compared = Evaluator(small, batches[:2], "mse", reference_model=original)
    assert compared.score() > 0 and Evaluator(small, batches[:2], "mse").score() == 0.0
    assert torch.equal(compared.reference[0], original(batches[0]))
    with pytest.raises(InputError, match="reference_model"):
        Evaluator(small, batches[:2], "mse", forward=lambda b: small(b), reference_model=original)


def test_shrink_flags_refuse_what_does_not_combine():
    from spdy.pipeline import RunConfig

    assert RunConfig(shrink=1.2, target=2).command_line() == "spdy run minilm --target 2 --shrink 1.2"
    for bad, match in (({"pattern": "structured"}, "not structured"), ({"target": 1.1}, "below --target"),
                       ({"engine": "deepsparse"}, "torch-cpu"), ({"search_loss": "token-cosine"}, "--search-loss"),
                       ({"gap": True}, "--gap"), ({"shrink": 0.9}, "--shrink 0.9")):
        with pytest.raises(InputError, match=match):
            RunConfig(**{"shrink": 1.2, **bad})


def test_run_shrinks_then_prunes_and_exports_a_smaller_sparse_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    work = tmp_path / "run"
    code = main(["run", "test_shrink:wide_mlp", "--shrink", "1.2", "--target", "1.5", "--levels", "0.5,0.7,0.9,0.95",
                 "--random-starts", "4", "--tries", "2", "--rounds", "6", "--threads", "1", "--baselines", "uniform",
                 "--search-budget", "none", "--work-dir", str(work), "--json"])
    summary = json.loads((work / "summary.json").read_text())
    first = json.loads((work / "shrink" / "summary.json").read_text())
    assert first["pattern"] == "structured" and first["target"] == 1.2
    shrink = summary["shrink"]
    assert shrink["measured_speedup"] == first["profiles"]["spdy"]["verify"]["measured_speedup"]
    assert shrink["structure"] and all(kept < 1024 for kept in shrink["structure"].values())
    verified = summary["profiles"]["spdy"]["verify"]
    assert verified["baseline"] == ORIGINAL and code == (0 if verified["met"] else 1)
    assert verified["output_error"] < 1e-4
    table = TimingTable.load(summary["timings"])
    assert table.meta["reference"]["speedup"] > 1  # the smaller model, unpruned, runs faster than the original
    report = (work / "report.md").read_text()
    assert "Shrunk first, then pruned" in report and ORIGINAL in report

    original, _, heldout = wide_mlp()
    runtime = json.loads((work / "export" / "runtime.json").read_text())
    assert runtime["structured"] == shrink["structure"]
    loaded = spdy.load(work / "export", model=wide_mlp()[0])
    assert loaded.get_submodule("2").in_features == next(iter(shrink["structure"].values()))
    with torch.no_grad():
        out = loaded(heldout[0])
    assert out.shape == original(heldout[0]).shape and torch.isfinite(out).all()
    # another method's profile exports from the cached stages onto the smaller model, and loads as one
    assert main(["export", str(work), "--target", "1.5", "--method", "uniform"]) == 0
    other = spdy.load(work / "export-1.5x-uniform", model=wide_mlp()[0])
    assert other.get_submodule("2").in_features == loaded.get_submodule("2").in_features
    with torch.no_grad():
        assert other(heldout[0]).shape == out.shape
    # a rerun resumes every stage of both runs from the work directory
    assert main(["run", "test_shrink:wide_mlp", "--shrink", "1.2", "--target", "1.5", "--levels", "0.5,0.7,0.9,0.95",
                 "--random-starts", "4", "--tries", "2", "--rounds", "6", "--threads", "1", "--baselines", "uniform",
                 "--search-budget", "none", "--work-dir", str(work), "--json"]) == code
    assert json.loads((work / "summary.json").read_text())["profiles"]["spdy"]["verify"] == verified
