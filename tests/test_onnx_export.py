"""``model.onnx`` beside an export (`spdy.runtime.onnx.write_onnx`): real MiniLM weights, run by onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch

from spdy.runtime.deploy import export
from spdy.runtime.onnx import write_onnx
from spdy.search.profile import Profile
from spdy.units import weight_matrix

from conftest import check_onnx, magnitude_pruned_minilm

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'spdy[onnx]')")


@pytest.fixture(scope="module")
def pruned_minilm():
    return magnitude_pruned_minilm("0.7000", samples=2, heldout=0, seq_len=16, batch_size=2)


def test_an_unstructured_export_writes_onnx_with_its_zeros(pruned_minilm, tmp_path):
    import onnx
    from onnx import numpy_helper

    bundle, units = pruned_minilm
    batch = bundle.calibration[0]
    export(bundle.model, "minilm", Profile({u: "0.7000" for u in units}), {u: "kernel" for u in units}, tmp_path, example=batch)
    record = json.loads((tmp_path / "runtime.json").read_text())["onnx"]
    assert record["opset"] == 13 and record["inputs"] == {k: list(v.shape) for k, v in batch.items()}
    check_onnx(tmp_path, bundle.model, batch)
    # the pruned weights travel as dense tensors with their zeros (what DeepSparse and sparse ONNX runtimes skip)
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer)
    assert zeros >= sum(int((weight_matrix(u) == 0).sum()) for u in units.values()) > 0
    assert not list(tmp_path.glob("*.tmp*"))


def test_what_cannot_be_traced_is_said_not_raised(pruned_minilm, tmp_path, monkeypatch):
    import importlib.util

    bundle, _ = pruned_minilm
    step = type("DecodeStep", (), {})()
    assert "not tensors" in write_onnx(bundle.model, step, tmp_path / "m.onnx")["skipped"]
    assert "failed" in write_onnx(torch.nn.Linear(4, 2), torch.zeros(3, 5), tmp_path / "m.onnx")["skipped"]  # wrong width
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.iterdir())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert "pip install 'spdy[onnx]'" in write_onnx(bundle.model, bundle.calibration[0], tmp_path / "m.onnx")["skipped"]
