"""The report names the baseline of every speedup, adds the engine's dense run and the closed
loop's rounds where the summary has them, flags misses and over-delivery, and still renders
summaries written before those keys existed. The summary is built as `spdy run` writes it, from a
real timing table and real verifications of a small MLP (a `spdy run digits` table moves too much
on a loaded 2-core machine to be sure of a feasible target), then varied key by key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from spdy.pipeline import convergence, profile_json
from spdy.report import write_report
from spdy.search.profile import Profile
from spdy.timing import measure
from spdy.units import find_units
from spdy.verification import verify

NEW_VERIFY_KEYS = ("baseline", "engine_baseline", "engine_dense_time", "speedup_over_engine_dense", "engine_dense_ratios", "fused")
ENGINE_HEADER = "measured speedup over the engine's fastest dense run"


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict:
    """summary.json's keys as `spdy run` writes them: a profile at 99% in the kernel format ("spdy")
    and one at 90% in whatever format the table found fastest ("uniform"), both verified."""
    work = tmp_path_factory.mktemp("table")
    torch.manual_seed(0)
    # the excluded last layer and the norms keep a third of the time outside the units, so timing noise
    # cannot make the table's fixed cost negative
    model = nn.Sequential(nn.Linear(256, 1024), nn.LayerNorm(1024), nn.GELU(), nn.Linear(1024, 1024), nn.LayerNorm(1024), nn.GELU(),
                          nn.Linear(1024, 512)).eval()
    units, x = find_units(model, exclude=["6"]), torch.randn(64, 256)
    table = measure(model, units, x, levels=[0.9, 0.99], progress=False, threads=1, formats=("dense", "kernel"),
                    rounds=3, model_rounds=5)
    table.save(work / "timings.json")
    profiles = {"spdy": Profile({"0": "0.9900", "3": "0.9900"}, 1.5, method="spdy"),
                "uniform": Profile({"0": "0.9000", "3": "0.9000"}, 1.5, method="uniform")}
    entries = {}
    for method, profile in profiles.items():
        profile.predicted_speedup = table.predicted_speedup(profile.options)
        formats = {"0": "kernel", "3": "kernel"} if method == "spdy" else None
        result = verify(model, units, profile, x, table, rounds=5, formats=formats, threads=1, tolerance=1.0)
        entries[method] = {**profile_json(profile), "seconds": 0.1, "verify": result.to_json()}
    return {"model": "mlp", "engine": "torch-cpu", "pruner": "magnitude", "pattern": "unstructured", "loss": "mse",
            "method": "spdy", "target": 1.5, "timings": str(work / "timings.json"), "database": "", "export": "",
            "profiles": entries, "gap": None, "stages": {"verify:spdy": {"seconds": 0.5}}, "commands": ["spdy run mlp"]}


def render(summary: dict, work: Path, plots: int = 3) -> str:
    """report.md of ``summary`` written into ``work`` (the HTML must render with its ``plots`` plots too)."""
    work.mkdir()
    (work / "summary.json").write_text(json.dumps(summary))
    md, html = write_report(work)
    assert html.read_text().count("data:image/png;base64,") == plots
    return md.read_text()


def test_every_speedup_names_dense_torch(summary, tmp_path) -> None:
    md = render(summary, tmp_path / "as-run")
    v = summary["profiles"]["spdy"]["verify"]
    assert f"**Measured speedup {v['measured_speedup']:.4g}x** over dense torch" in md
    assert f"{v['measured_speedup'] / summary['target']:.3f}x the {summary['target']:g}x target" in md
    assert "| method | predicted speedup over dense torch | measured speedup over dense torch | measured / target |" in md
    assert ENGINE_HEADER in md and f"x over the engine's fastest dense run: {v['engine_baseline']})" in md  # spdy runs the kernel
    assert "## Closed loop" not in md  # no rounds in this summary


def test_a_summary_without_the_new_keys_renders(summary, tmp_path) -> None:
    """A summary written before the engine's dense run and the closed loop: no such column or section."""
    old = copy.deepcopy(summary)
    for p in old["profiles"].values():
        p.pop("rounds", None)
        for key in NEW_VERIFY_KEYS:
            p["verify"].pop(key, None)
    md = render(old, tmp_path / "old")
    assert ENGINE_HEADER not in md and "## Closed loop" not in md and "over the engine" not in md
    assert f"**Measured speedup {old['profiles']['spdy']['verify']['measured_speedup']:.4g}x** over dense torch" in md
    assert md.count("| spdy |") == 1 and md.count("| uniform |") == 1


def test_engine_dense_rounds_and_notes_are_shown(summary, tmp_path) -> None:
    """The engine's dense run gets a column and a clause in the headline, the closed loop's rounds a
    table with measured / target; a met target far exceeded is flagged, as is a miss."""
    s = copy.deepcopy(summary)
    target = s["target"]
    spdy = s["profiles"]["spdy"]
    spdy["verify"].update(measured_speedup=2 * target, met=True, speedup_over_engine_dense=1.2345,
                          engine_baseline="the kernel format at 0%", fused=[])
    spdy["rounds"] = [{"target_for_table": target, "predicted": target, "measured": 2 * target},
                      {"target_for_table": target / 2, "predicted": target / 2, "measured": 1.01 * target, "met": True}]
    s["profiles"]["uniform"].pop("rounds", None)
    md = render(s, tmp_path / "new")
    assert "over dense torch (1.234x over the engine's fastest dense run: the kernel format at 0%)" in md
    assert ENGINE_HEADER in md and "| 1.234 |" in md
    uniform_row = next(line for line in md.splitlines() if line.startswith("| uniform |"))
    if s["profiles"]["uniform"]["verify"].get("speedup_over_engine_dense") is None:
        assert "| n/a |" in uniform_row
    assert "## Closed loop" in md
    assert f"| spdy | 1 | {target:.4g} | {target:.4g} | {2 * target:.4g} | 2.000 |" in md
    assert f"| spdy | 2 | {target / 2:.4g} | {target / 2:.4g} | {1.01 * target:.4g} | 1.010 |" in md
    assert "| uniform |" not in md.split("## Closed loop")[1].split("## Profile")[0]  # no rounds, no rows
    assert "**Note**: over-delivered: measured 2.00x" in md and "MISSED" not in md

    spdy["verify"].update(measured_speedup=0.5 * target, met=False)
    md = render(s, tmp_path / "missed")
    assert "**MISSED**" in md and "target NOT met" in md and "over-delivered" not in md


def test_another_engine_names_its_own_baseline(summary, tmp_path) -> None:
    """A run verified on another engine reports its speedups over that engine's dense run, nowhere over dense torch."""
    s = copy.deepcopy(summary)
    for p in s["profiles"].values():
        p["verify"].update(baseline="dense DeepSparse", speedup_over_engine_dense=None, engine_baseline=None)
    md = render(s, tmp_path / "deepsparse")
    assert "x** over dense DeepSparse" in md and "| measured speedup over dense DeepSparse |" in md
    assert "dense torch" not in md and ENGINE_HEADER not in md


def test_search_convergence_is_plotted_and_summed_up(summary, tmp_path) -> None:
    """A search's best loss over time and evaluations: a plot, and a line saying where it ended, what
    it cost and when it came within 1% of its final loss; searches without a trace get neither."""
    s = copy.deepcopy(summary)
    trace = [{"evaluations": e, "batch_evaluations": b, "loss": loss, "phase": "local", "k": 1, "elapsed": t}
             for e, b, loss, t in ((10, 20, 0.3, 2.0), (40, 100, 0.2, 30.0), (90, 300, 0.199, 95.0))]
    searched = Profile({"0": "0.9900", "3": "0.9900"}, 1.5, method="spdy", evaluations=400, trace=trace,
                       meta={"seconds": 180.2, "batches": 8, "budget": 180.0, "stopped_by_budget": True})
    s["profiles"]["spdy"]["convergence"] = convergence(searched)
    md = render(s, tmp_path / "searched", plots=4)
    assert ("Search convergence (spdy): best calibration loss 0.199 after 400 candidates, 300 batch passes by the last "
            "improvement in 180.2 s; within 1% of it after 30 s; budget 180 s, which stopped it.") in md
    assert "![convergence](plots/convergence.png)" in md and "Search convergence (uniform)" not in md
    assert convergence(Profile({"0": "0.9000"}, method="uniform")) is None


def test_the_validation_pick_is_reported_as_the_search_made_it(summary, tmp_path) -> None:
    """The line names the finalist the search picked (recorded, not recomputed) and both losses of the
    calibration-best, so a search that fits its calibration data shows."""
    s = copy.deepcopy(summary)
    s["profiles"]["spdy"]["validation"] = [{"calibration_loss": 0.10, "validation_loss": 0.30},
                                           {"calibration_loss": 0.11, "validation_loss": 0.20},
                                           {"calibration_loss": 0.12, "validation_loss": 0.25}]
    s["profiles"]["spdy"]["picked"] = 1
    md = render(s, tmp_path / "picked")
    assert ("Validation pick (spdy): of its 3 best profiles on calibration data (calibration loss 0.1 to 0.12), number 2 did "
            "best on validation data (0.2; the calibration-best had 0.3).") in md
    assert "Validation pick (uniform)" not in md


def test_a_gpu_table_names_its_gpu_and_dtype_not_cpu_threads():
    from spdy.report import _device

    gpu = {"backend": "cuda-blocks", "gpu": "NVIDIA H200", "dtype": "float16", "cuda": "13.0", "torch": "2.11.0", "cpu": "Xeon"}
    assert _device(gpu) == "GPU NVIDIA H200 in float16 (CUDA 13.0, torch 2.11.0)"
    assert _device({"threads": 2, "cpu": "Xeon"}) == "2 threads, CPU Xeon"
