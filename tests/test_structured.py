"""Structured options (issue 19): heads and neurons of BERT-style blocks, their database, timing, smaller model and export."""

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

import spdy
from spdy.blocks import block_of, block_units, find_blocks, resize_to, shrink, unit_options
from spdy.cli import main
from spdy.database import Stitcher
from spdy.database.structured import build_structured_database, removal_order
from spdy.errors import InputError
from spdy.levels import DENSE, Option, kept_structures, structured_options
from spdy.models.huggingface import SentenceEncoder
from spdy.search.profile import Profile
from spdy.verify_structured import verify_structured

from conftest import exported_resized, one_layer_model
from spdy.timing import measure


def tiny_bert() -> tuple[nn.Module, list, list]:
    """A 2-layer BERT encoder (random weights; 4 heads of 16, 128 neurons) with token batches: MODEL for `spdy run`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200,
                        max_position_embeddings=64)
    model = SentenceEncoder(BertModel(config)).eval()
    g = torch.Generator().manual_seed(1)

    def batch():
        mask = torch.ones(4, 24, dtype=torch.long)
        mask[0, 18:] = 0  # padding reaches the attention as a mask
        return {"input_ids": torch.randint(0, 200, (4, 24), generator=g), "attention_mask": mask}

    return model, [batch() for _ in range(6)], [batch() for _ in range(2)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, calibration, heldout = tiny_bert()
    units = block_units(model)
    db = build_structured_database(model, units, calibration, tmp_path_factory.mktemp("db"), progress=False)
    return model, units, db, calibration


def test_structured_option_keys():
    neurons = structured_options("neurons", 1536, 64)
    assert len(neurons) == 25 and neurons[0] == Option(0.0) and neurons[-1].key == "neurons@1.0000"
    assert [kept_structures(o, 1536, 64) for o in neurons] == list(range(1536, -1, -64))
    heads = structured_options("heads", 12)
    assert [kept_structures(o, 12) for o in heads] == list(range(12, -1, -1))
    assert Option.parse("heads@0.2500") == Option(0.25, "heads")
    with pytest.raises(InputError, match="sparsity"):
        Option(1.0)  # only a whole block can go, never a whole layer


def test_blocks_of_a_bert_encoder(built):
    model, units, db, _ = built
    blocks = find_blocks(model)
    assert [(b.structure, b.count, b.width, b.step) for b in blocks] == [("heads", 4, 16, 1), ("neurons", 128, 1, 16)] * 2
    assert list(units) == [b.name for b in blocks] and list(units)[0] == "bert.encoder.layer.0.attention.output.dense"
    assert unit_options(units)[list(units)[1]][-1] == "neurons@1.0000" and len(unit_options(units)[list(units)[1]]) == 9


def test_database_is_nested_and_dense_is_exact(built):
    model, units, db, _ = built
    for name, unit in units.items():
        assert torch.equal(db.weight(name, DENSE), unit.module.weight.data)
        kept = [set(db.kept(name, k).tolist()) for k in db.options(name)]
        assert all(later <= earlier for earlier, later in zip(kept, kept[1:])), name  # fewer kept is a subset of more kept
        assert [len(k) for k in kept] == [unit.extra["block"].kept(k) for k in db.options(name)]
        assert db.relative_errors()[name][db.options(name)[-1]] == pytest.approx(1.0)  # nothing kept: the whole output is gone


def test_obs_update_beats_magnitude(built, tmp_path):
    model, units, db, calibration = built
    magnitude = build_structured_database(model, units, calibration, tmp_path, pruner="magnitude", progress=False)
    for name in units:
        obs, mag = db.relative_errors()[name], magnitude.relative_errors()[name]
        middle = [k for k in obs if 0 < Option.parse(k).sparsity < 1]
        assert sum(obs[k] for k in middle) < sum(mag[k] for k in middle), name


def test_single_columns_match_the_closed_form():
    """One removal, width 1: the cheapest column by w^T w / [H^-1]_jj, and the OBS update zeroes it and keeps the rest optimal."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    H = X.t() @ X
    _, kept, pruned = next(removal_order(W, H, 1, damp=1e-12, stops=[5]))
    Hinv = torch.linalg.inv(H)
    j = int((W.square().sum(0) / Hinv.diagonal()).argmin())
    assert j not in kept.tolist() and torch.all(pruned[:, j] == 0)
    best = torch.linalg.lstsq(X[:, kept], X @ W.t()).solution.t()  # least squares on the kept columns
    assert torch.allclose(pruned[:, kept].double(), best, atol=1e-4)


def test_smaller_model_equals_masked_model(built):
    model, units, db, calibration = built
    names = list(units)
    profile = {names[0]: "heads@1.0000", names[1]: "neurons@0.3750", names[2]: "heads@0.5000", names[3]: DENSE}
    with torch.no_grad():
        stitcher = Stitcher(units, db)
        with stitcher(profile):
            masked = model(**calibration[0])
        small = copy.deepcopy(model)
        kept = shrink(small, units, profile, db)
        out = small(**calibration[0])
    assert kept == {names[0]: 0, names[1]: 80, names[2]: 2, names[3]: 128}
    layer = small.bert.encoder.layer
    assert layer[0].attention.output.dense.in_features == 0 and layer[0].output.dense.in_features == 80
    assert layer[1].attention.self.query.out_features == 32 and layer[1].attention.self.num_attention_heads == 2
    assert torch.allclose(out, masked, atol=1e-6)


def test_timing_table_has_every_block_option(built):
    model, units, db, calibration = built
    table = measure(model, units, calibration[0], options=unit_options(units), backend="torch-cpu-blocks", progress=False,
                    threads=1, rounds=3, model_rounds=3)
    assert {u: sorted(o) for u, o in table.times.items()} == {u: sorted(k) for u, k in unit_options(units).items()}
    assert table.meta["shared"] == {names: first for names, first in zip(list(units)[2:], list(units)[:2])}
    for unit, options in table.times.items():  # an emptied block costs next to nothing next to the whole one
        assert options[max(options, key=lambda k: Option.parse(k).sparsity)] < options[DENSE], unit


def test_unrecognised_blocks_are_named():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(8, 8)

    with pytest.raises(InputError, match=r"layer 'layers.0' \(Layer\).*attention.self.query"):
        find_blocks(one_layer_model(Layer()))
    with pytest.raises(InputError, match="no blocks in Sequential.*BERT-style"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_run_structured_exports_a_smaller_model(tmp_path, monkeypatch):
    """A mild target: the tiny model's blocks are a small share of its time (its table's maximum was 1.13x on one CI run, above 1.2x on others)."""
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    work = tmp_path / "run"
    code = main(["run", "test_structured:tiny_bert", "--pattern", "structured", "--target", "1.05", "--random-starts", "4",
                 "--tries", "2", "--rounds", "5", "--threads", "1", "--baselines", "uniform", "--search-budget", "none",
                 "--work-dir", str(work), "--json"])
    summary = json.loads((work / "summary.json").read_text())
    assert code == (0 if summary["profiles"]["spdy"]["verify"]["met"] else 1)
    assert set(summary["profiles"]) == {"spdy", "uniform"}
    verified = summary["profiles"]["spdy"]["verify"]
    assert verified["output_error"] < 1e-4  # the smaller model computes what the search scored
    exported = json.loads((work / "export" / "runtime.json").read_text())["structured"]
    model, _, heldout = tiny_bert()
    loaded = spdy.load(work / "export")
    assert {n: loaded.get_submodule(n).in_features // (16 if "attention" in n else 1) for n in exported} == exported
    with torch.no_grad():
        assert loaded(**heldout[0]).shape == model(**heldout[0]).shape


def test_structured_run_config_refuses_what_does_not_apply():
    from spdy.pipeline import RunConfig

    assert RunConfig(pattern="structured").methods == ["spdy", "uniform", "dp-errors"]  # global magnitude ranks single weights
    for bad, match in (({"engine": "cuda-2:4"}, "torch-cpu, deepsparse, cuda"), ({"gap": True}, "--gap"), ({"pruner": "adaprune"}, "pruners obs"),
                       ({"method": "owl"}, "ranks single weights")):
        with pytest.raises(InputError, match=match):
            RunConfig(pattern="structured", **bad)


def test_export_of_removed_blocks_loads_back_identical(tmp_path):
    """Blocks with nothing kept leave empty weights, whose tensors share a data_ptr; they must not be taken for tied weights.
    Their ONNX graph computes no zero-size tensor: DeepSparse 1.8 and older onnxruntimes refuse those."""
    import onnx

    model, _, heldout = tiny_bert()
    exported_resized(model, dict(zip([b.name for b in find_blocks(model)], (0, 0, 2, 0))), heldout[0], tmp_path)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "model.onnx"))).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.output]}
    shapes |= {t.name: list(t.dims) for t in graph.initializer}
    assert not [name for name, dims in shapes.items() if 0 in dims and "encoder" in name]  # the encoder's; BERT has an empty constant


def test_a_model_with_blocks_removed_whole_prunes_unstructured_without_its_emptied_layers(tmp_path):
    """`--shrink` prunes the smaller model unstructured next: the consumers a removed block left without weights are no
    units (timing or reconstructing a (64, 0) layer failed), and the timing table says why they stay as they are."""
    from spdy.database import build_database
    from spdy.levels import options_for
    from spdy.units import find_units, unsupported_layers

    model, calibration, _ = tiny_bert()
    names = [b.name for b in find_blocks(model)]
    resize_to(model, dict(zip(names, (0, 0, 2, 0))))
    emptied = [names[0], names[1], names[3]]
    units = find_units(model)
    assert not set(emptied) & set(units) and names[2] in units
    assert all("removed the block" in unsupported_layers(model)[n] for n in emptied)
    options = options_for("unstructured", [0.5, 0.9])
    db = build_database(model, units, calibration[:2], options, tmp_path, progress=False)
    assert set(db.relative_errors()) == set(units)
    table = measure(model, units, calibration[0], options=[o.key for o in options], backend="torch-cpu", progress=False, threads=1,
                    rounds=3, model_rounds=3)
    assert set(table.units) == set(units) and set(emptied) <= set(table.meta["kept_dense"])


def test_a_structured_profile_verifies_on_deepsparse_as_a_smaller_dense_model(built):
    """DeepSparse runs the smaller model (exported to ONNX) against the dense one: the speedup is over dense DeepSparse."""
    pytest.importorskip("deepsparse", reason="deepsparse 1.8.0 is not installed in this environment (see .venv-ds)")
    model, units, db, calibration = built
    profile = Profile({name: db.options(name)[len(db.options(name)) // 2] for name in units}, target=1.05)
    result = verify_structured(model, units, profile, calibration[0], None, db, rounds=4, threads=1, engine="deepsparse")
    assert result.baseline == "dense deepsparse" and result.rounds == 4 and len(result.ratios) == 4
    assert result.output_error < 1e-3 and result.measured_speedup > 0
    assert set(result.formats) == set(units)  # every block runs smaller


def test_a_profile_that_removes_blocks_whole_verifies_on_deepsparse(built):
    """A block removed whole leaves its consumer's bias alone (`spdy.blocks.BiasOnly`), no zero-size layer, so DeepSparse 1.8
    (which died on those, SIGFPE) runs the smaller model and agrees with torch."""
    pytest.importorskip("deepsparse", reason="deepsparse 1.8.0 is not installed in this environment (see .venv-ds)")
    model, units, db, calibration = built
    names = list(units)
    profile = Profile({name: db.options(name)[-1 if i % 2 == 0 else 1] for i, name in enumerate(names)}, target=1.05)
    assert [block_of(units[n]).kept(profile.options[n]) for n in names[::2]] == [0] * len(names[::2])
    result = verify_structured(model, units, profile, calibration[0], None, db, rounds=4, threads=1, engine="deepsparse")
    assert result.output_error < 1e-3 and result.measured_speedup > 0


def test_block_scopes_take_the_engine_layers_of_their_modules():
    from spdy.timing.deepsparse_blocks import block_layer_times

    scopes = {"attn": ["bert/encoder/layer/0/attention/output/dense", "bert/encoder/layer/0/attention/self"],
              "ffn": ["bert/encoder/layer/0/intermediate", "bert/encoder/layer/0/output/dense"]}
    info = [{"canonical_name": "/bert/encoder/layer.0/attention/self/query/MatMul_output_0", "average_run_time_in_ms": 1.0},
            {"canonical_name": "/bert/encoder/layer.0/attention/self/MatMul_1_output_0", "average_run_time_in_ms": 2.0},
            {"canonical_name": "/bert/encoder/layer.0/attention/output/dense/MatMul_output_0,"
                               "/bert/encoder/layer.0/intermediate/dense/MatMul_output_0", "average_run_time_in_ms": 4.0},
            {"canonical_name": "<none>", "average_run_time_in_ms": 8.0},
            {"canonical_name": "/bert/encoder/layer.0/attention/selfish/MatMul_output_0", "average_run_time_in_ms": 16.0}]
    assert block_layer_times(info, scopes) == {"attn": 5.0, "ffn": 2.0}  # a fused layer split evenly; no prefix of another name


def test_a_deepsparse_table_times_blocks_in_smaller_models(built, tmp_path):
    """Every option of every block from DeepSparse's analysis of resized models, a block removed whole included (it
    leaves no zero-size layer, which DeepSparse 1.8 dies on); the smallest costs less than the whole block."""
    pytest.importorskip("deepsparse", reason="deepsparse 1.8.0 is not installed in this environment (see .venv-ds)")
    model, units, db, calibration = built
    options = unit_options(units)
    table = measure(model, units, calibration[0], options=options, backend="deepsparse-blocks", progress=False,
                    threads=1, iterations=5, warmup_iterations=1, workdir=str(tmp_path))
    assert {u: sorted(o) for u, o in table.times.items()} == {u: sorted(k) for u, k in options.items()}
    assert table.meta["backend"] == "deepsparse-blocks"
    assert table.fixed >= 0 and table.fixed + sum(table.unpruned_time(u) for u in table.units) == pytest.approx(table.base)
    smallest = sum(t[max(t, key=lambda k: Option.parse(k).sparsity)] for t in table.times.values())
    assert smallest < sum(t[DENSE] for t in table.times.values())  # per block, the tiny model's engine layers are too noisy to order


@pytest.mark.parametrize("engine", ["torch-cpu", "deepsparse"])
def test_a_resized_model_is_timed_for_calibration(built, engine):
    """Before any database: the first structures kept, the whole model timed against the dense one on the engine."""
    from spdy.verify_structured import sized_speedup

    if engine == "deepsparse":
        pytest.importorskip("deepsparse", reason="deepsparse 1.8.0 is not installed in this environment (see .venv-ds)")
    model, units, _, calibration = built
    smallest = {name: keys[-2] for name, keys in unit_options(units).items()}  # one structure kept in every block
    assert sized_speedup(model, units, smallest, calibration[0], rounds=5, threads=1, engine=engine) > 1.0
    with pytest.raises(InputError, match="torch-cpu, deepsparse, cuda"):
        sized_speedup(model, units, smallest, calibration[0], rounds=1, engine="cuda-2:4")


def test_a_structured_profile_names_the_engines_it_verifies_on(built):
    model, units, db, calibration = built
    with pytest.raises(InputError, match="torch-cpu, deepsparse, cuda"):
        verify_structured(model, units, Profile({}), calibration[0], None, db, rounds=2, engine="cuda-2:4")
    if importlib.util.find_spec("deepsparse") is None:
        with pytest.raises(InputError, match="make .venv-ds"):
            verify_structured(model, units, Profile({}), calibration[0], None, db, rounds=2, engine="deepsparse")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: dense torch on a GPU times and runs the smaller model")
def test_a_structured_profile_is_timed_and_verified_on_a_gpu(built):
    """cuda-blocks times every kept size of every block on the GPU; the smaller model then runs there against the dense one."""
    model, units, db, calibration = built
    table = measure(model, units, calibration[0], options=unit_options(units), backend="cuda-blocks", progress=False, rounds=5, number=5)
    assert table.meta["backend"] == "cuda-blocks" and table.meta["dtype"] == "float16" and "gpu" in table.meta
    assert {u: sorted(o) for u, o in table.times.items()} == {u: sorted(k) for u, k in unit_options(units).items()}
    assert table.fixed >= 0 and all(t[DENSE] > 0 for t in table.times.values())
    profile = Profile({name: db.options(name)[len(db.options(name)) // 2] for name in units}, target=1.0)
    result = verify_structured(model, units, profile, calibration[0], table, db, rounds=5, engine="cuda")
    assert result.baseline == "dense torch cuda" and len(result.ratios) == 5
    assert result.output_error < 1e-2 and set(result.formats) == set(units)


def test_the_cuda_engine_is_for_smaller_models_and_says_so_without_a_gpu(built):
    from spdy.pipeline import RunConfig, structured_engine
    from spdy.timing.cuda_blocks import CudaBlocksBackend
    from spdy.timing.table import TimingTable

    with pytest.raises(InputError, match="--engine cuda runs dense torch on a GPU.*--pattern structured"):
        RunConfig(engine="cuda")
    assert RunConfig(engine="cuda", pattern="structured").engine == "cuda"
    with pytest.raises(InputError, match="dtype must be one of float16, bfloat16, float32"):
        CudaBlocksBackend(dtype="int8")
    table = TimingTable({"a": {DENSE: 1.0}}, base=1.0, fixed=0.0, meta={"backend": "cuda-blocks"})
    assert structured_engine(table) == "cuda" and structured_engine(None) == "torch-cpu"
    if torch.cuda.is_available():
        return
    model, units, db, calibration = built
    with pytest.raises(InputError, match="timing backend cuda-blocks: no CUDA GPU"):
        measure(model, units, calibration[0], options=unit_options(units), backend="cuda-blocks", progress=False)
    with pytest.raises(InputError, match="runs on a GPU: no CUDA GPU"):
        verify_structured(model, units, Profile({}), calibration[0], None, db, rounds=2, engine="cuda")


def test_an_encoder_with_one_feed_forward_width_loads_with_from_pretrained(tmp_path):
    """Every head kept, every layer at 48 neurons: `huggingface/` is a BERT that transformers loads on its own."""
    model, _, heldout = tiny_bert()
    exported_resized(model, dict(zip([b.name for b in find_blocks(model)], (4, 48, 4, 48))), heldout[0], tmp_path)
    record = json.loads((tmp_path / "runtime.json").read_text())["pretrained"]
    assert record == {"directory": "huggingface", "class": "BertModel"}
    assert json.loads((tmp_path / "huggingface" / "config.json").read_text())["intermediate_size"] == 48


def test_an_encoder_with_heads_removed_says_why_it_has_no_pretrained_directory(tmp_path):
    model, _, heldout = tiny_bert()
    exported_resized(model, dict(zip([b.name for b in find_blocks(model)], (2, 48, 4, 48))), heldout[0], tmp_path)
    assert "num_attention_heads" in json.loads((tmp_path / "runtime.json").read_text())["pretrained"]["skipped"]
