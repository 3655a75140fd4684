"""Structured options for convolutional networks (issue 19): output channels with the inputs that consume them."""

import copy

import pytest
import torch
from torch import nn

from spdy.blocks import block_units, disjoint, find_blocks, shrink, unit_options
from spdy.database import Stitcher
from spdy.database.structured import build_structured_database
from spdy.errors import InputError
from spdy.levels import DENSE, Option, kept_structures, structured_options
from spdy.models.digits import digits_cnn
from spdy.models.resnet import ResNet, images, seeded
from spdy.runtime.fold import fold_batchnorms
from spdy.timing import measure

from conftest import exported_resized


def tiny_resnet(seed: int = 0, width: int = 8) -> nn.Module:
    """Two Bottlenecks (``width`` and twice as many inner channels) with BatchNorms that are not the identity."""
    return seeded(ResNet((1, 1), width=width, classes=10), seed)


@pytest.fixture(scope="module")
def cnn():
    bundle = digits_cnn(width=4, hidden=128, epochs=2)
    return bundle.model, bundle.calibration[:3]


def test_channel_options_keep_at_least_one_channel():
    options = structured_options("channels", 8)
    assert [kept_structures(o, 8) for o in options] == list(range(8, 0, -1))
    assert Option.parse("channels@0.5000") == Option(0.5, "channels")
    with pytest.raises(InputError, match="channels"):
        Option(1.0, "channels")  # torch runs no convolution without channels


def test_sequential_blocks_pair_each_layer_with_its_consumer(cnn):
    model, _ = cnn  # conv 0 -> relu -> conv 2 -> relu, pool, flatten -> linear 6 -> relu -> linear 8 -> relu -> linear 10
    blocks = find_blocks(model)
    assert [(b.name, b.structure, b.producers, b.count, b.width, b.chain) for b in blocks] == [
        ("2", "channels", ("0",), 4, 9, ("0", "1")),
        ("6", "channels", ("2",), 8, 16, ("2", "3", "4", "5")),  # a channel of the 4x4 pooled map is 16 flattened columns
        ("8", "neurons", ("6",), 128, 1, ("6", "7")),
        ("10", "neurons", ("8",), 128, 1, ("8", "9")),
    ]
    assert list(block_units(model)) == ["2", "8"]  # conv 2 and linear 8 would shrink along two dimensions in "6" and "10"
    assert list(block_units(model, exclude=["2"])) == ["6", "10"]
    assert {u.kind for u in block_units(model).values()} == {"conv2d", "linear"}
    with pytest.raises(InputError, match=r"'2' and '6', which both resize '2'"):
        block_units(model, include=["2", "6"])


def test_residual_blocks_prune_inner_channels_with_their_batchnorms():
    model = tiny_resnet()
    blocks = {b.name: b for b in find_blocks(model)}
    assert list(blocks) == ["layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv2", "layer2.0.conv3"]
    assert blocks["layer1.0.conv2"].producers == ("layer1.0.conv1", "layer1.0.bn1")
    assert list(block_units(model)) == ["layer1.0.conv2", "layer2.0.conv2"]
    assert list(block_units(model, include=["*.conv3"])) == ["layer1.0.conv3", "layer2.0.conv3"]


def lite0_blocks() -> tuple[nn.Module, list, dict]:
    """The real EfficientNet-Lite0 as spdy loads it (BatchNorms folded), a batch, and two of its blocks: one whose
    depthwise conv is padded in a Sequential (stride 2), one plain."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the vision extra (efficientnet-lite-pytorch) is not installed")
    from spdy.models import load_model

    bundle = load_model("efficientnet-lite0", samples=2, heldout=1)
    units = block_units(bundle.model, include=["_blocks.1.*", "_blocks.2.*"])
    return bundle.model, [bundle.calibration[0][:2]], units


@pytest.mark.parametrize("which", ["digits", "resnet", "resnet-folded", "resnet-conv3", "efficientnet-lite0"])
def test_smaller_network_equals_masked_network(which, cnn, tmp_path):
    units = None
    if which == "digits":
        model, calibration = cnn
    elif which == "efficientnet-lite0":
        model, calibration, units = lite0_blocks()
        assert units["_blocks.1._project_conv"].extra["block"].producers[:2] == ("_blocks.1._expand_conv", "_blocks.1._depthwise_conv.1")
    else:
        model, calibration = tiny_resnet(), images(6, 2, size=32)
        if which == "resnet-folded":  # as spdy loads CNNs: BatchNorms folded into the convs, left as Identity
            fold_batchnorms(model, calibration[0])
    units = units or block_units(model, include=["*.conv3"] if which == "resnet-conv3" else None)
    db = build_structured_database(model, units, calibration, tmp_path, progress=False)
    profile = {n: db.options(n)[len(db.options(n)) // 2] for n in units}
    with torch.no_grad():
        with Stitcher(units, db)(profile):
            masked = model(calibration[0])
        small = copy.deepcopy(model)
        kept = shrink(small, units, profile, db)
        out = small(calibration[0])
    for name, block in ((n, u.extra["block"]) for n, u in units.items()):
        assert kept[name] == block.kept(profile[name]) < block.count
        assert small.get_submodule(block.producers[0]).weight.shape[0] == kept[name]
        assert small.get_submodule(name).weight[0].numel() == kept[name] * block.width
    assert torch.allclose(out, masked, atol=1e-5 * masked.abs().max())


def test_database_is_nested_and_obs_beats_magnitude(cnn, tmp_path):
    model, calibration = cnn
    units = block_units(model)
    obs = build_structured_database(model, units, calibration, tmp_path / "obs", progress=False)
    magnitude = build_structured_database(model, units, calibration, tmp_path / "magnitude", pruner="magnitude", progress=False)
    for name, unit in units.items():
        assert torch.equal(obs.weight(name, DENSE), unit.module.weight.data.reshape(unit.weight_shape))
        kept = [set(obs.kept(name, k).tolist()) for k in obs.options(name)]
        assert all(later <= earlier for earlier, later in zip(kept, kept[1:])), name
        errors, baseline = obs.relative_errors()[name], magnitude.relative_errors()[name]
        assert sum(errors.values()) < sum(baseline.values()), name


def test_timing_table_has_every_channel_option():
    # wide enough that a block's time is its work, not torch's per-call overhead: at width 8 on 32 x 32 images a 3x3 conv
    # keeping 1 of 8 channels timed 0.80-1.02x its dense self (it failed CI once); at width 32 on 64 x 64, 0.33-0.59x
    model, batch = tiny_resnet(width=32), images(2, 2, size=64)[0]
    units = block_units(model)
    table = measure(model, units, batch, options=unit_options(units), backend="torch-cpu-blocks", progress=False,
                    threads=1, rounds=5, model_rounds=5)
    assert {u: sorted(o) for u, o in table.times.items()} == {u: sorted(k) for u, k in unit_options(units).items()}
    for unit, options in table.times.items():
        assert options[max(options, key=lambda k: Option.parse(k).sparsity)] < options[DENSE], unit


@pytest.mark.parametrize("which", ["digits", "resnet"])
def test_export_of_a_smaller_network_loads_back_identical(which, cnn, tmp_path):
    if which == "digits":
        model, calibration = cnn
        model, fresh, sizes = copy.deepcopy(model), copy.deepcopy(model), {"2": 3, "8": 40}
    else:
        model, fresh, calibration = tiny_resnet(), tiny_resnet(), images(2, 2, size=32)
        sizes = {"layer1.0.conv2": 5, "layer2.0.conv2": 1}
    exported_resized(model, sizes, calibration[0], tmp_path, fresh=fresh)


def test_networks_without_blocks_are_refused_with_what_is_expected():
    with pytest.raises(InputError, match="no blocks in Sequential.*Conv2d/Linear layers"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    depthwise = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.LayerNorm(8), nn.Linear(8, 4))
    with pytest.raises(InputError, match="found no blocks"):
        find_blocks(depthwise)
    assert disjoint([]) == []


def test_block_times_out_of_order_with_their_sizes_are_measured_again():
    from spdy.blocks import Block
    from spdy.timing.blocks import out_of_order

    block = Block("project", "channels", ("expand",), "expand", 96, 1, 6)
    ratios = {"channels@0.0625": 1.0, "channels@0.1250": 0.93, "channels@0.3750": 0.26, "channels@0.4375": 0.63, "channels@0.5000": 0.35}
    # 60 channels at 0.26 of the block, 54 at 0.63: one of them caught the machine in another phase
    assert out_of_order(block, ratios) == ["channels@0.3750", "channels@0.4375", "channels@0.5000"]
    assert out_of_order(block, {"channels@0.0625": 1.05, "channels@0.1250": 1.0, "channels@0.5000": 0.5}) == []  # within the slack


def test_blocks_are_timed_inside_the_whole_model_too():
    """The hooks see each block once per run, from its first module to its consumer, inside the model's own time."""
    import time

    from spdy.blocks import block_of
    from spdy.timing.blocks import in_model_times

    model, batch = tiny_resnet(), images(2, 2, size=32)[0]
    blocks = {n: block_of(u) for n, u in block_units(model).items()}
    spans = in_model_times(model, blocks, batch, rounds=5)
    with torch.no_grad():
        started = time.perf_counter()
        model(batch)
        whole = time.perf_counter() - started
    assert set(spans) == set(blocks) and all(0 < t for t in spans.values())
    assert sum(spans.values()) < 3 * whole  # each span is a part of one run (with room for a noisy machine)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
