"""Export a pruned model for deployment, and load it back as a runnable sparse model.

An export directory holds ``model.safetensors`` (the pruned weights), ``profile.json`` and
``runtime.json`` (the MODEL spec, the runtime format of every pruned layer as measured for
this engine; for a structured export, how many heads or neurons each block kept). A Hugging Face model also gets its ``config.json`` and tokenizer files, and
``runtime.json`` names the classes to rebuild it with, so `load` needs neither the original
model directory nor the MODEL spec on the machine it runs on. A structured export whose sizes a
config can hold (one feed-forward width for every layer, BERT heads all kept; Llama key/value groups
and neurons each one number) also gets ``huggingface/``, which ``from_pretrained`` loads as it is. Every file is replaced
atomically: a killed export leaves whole files, never half of one.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from safetensors.torch import load_file, save_file
from torch import nn

from spdy.errors import InputError
from spdy.files import read_json, replace_atomically, write_json
from spdy.runtime import convert, kernel_status, use_kernel_attention
from spdy.runtime.onnx import write_onnx

if TYPE_CHECKING:  # the runtime needs no search code: a profile only has to save itself
    from spdy.search.profile import Profile

RUNTIME = "runtime.json"
WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
PRETRAINED = "huggingface"  # a structured export's smaller model as `from_pretrained` loads it, where its config can say so
_STAGING = "huggingface.tmp"  # config and tokenizer are saved here, then moved in file by file


def _huggingface_part(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model itself or its direct child that carries a savable Hugging Face config, when
    the model can be rebuilt from it (a wrapper whose constructor takes just that child)."""
    for name, module in model.named_modules():
        if "." in name or not hasattr(getattr(module, "config", None), "save_pretrained"):
            continue
        if name:
            try:
                inspect.signature(type(model)).bind(module)
            except TypeError:
                return None
        return name, module
    return None


def _save_huggingface(directory: Path, name: str, module: nn.Module, model: nn.Module, tokenizer: Any) -> dict:
    """Write config.json (and the tokenizer's files) into ``directory``; return how to rebuild the model."""
    staging = directory / _STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
    try:
        module.config.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for path in sorted(p for p in staging.iterdir() if p.is_file()):
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wrapper = f"{type(model).__module__}:{type(model).__qualname__}" if name else None
    return {"class": type(module).__name__, "attribute": name, "wrapper": wrapper}


def _save_pretrained(directory: Path, module: nn.Module, tokenizer: Any, structure: Mapping[str, int]) -> dict:
    """The smaller Hugging Face model with a config of its sizes, in its own directory (replaced whole), so
    ``from_pretrained`` loads it with no spdy at all; or why its family's config cannot hold them."""
    from spdy.blocks import pretrained_config

    config = copy.deepcopy(module.config)
    if why := pretrained_config(config, structure):
        return {"skipped": why}
    quantizer = getattr(module, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", None)
        if getattr(method, "value", method) != "gguf":
            return {"skipped": f"the model is quantized ({getattr(method, 'value', method)}); spdy writes float weights only"}
        # a GGUF file is dequantized as it loads: the weights are plain floats, saved as such
        vars(config).pop("quantization_config", None)
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    original = module.config
    module.config, module.hf_quantizer = config, None
    try:
        module.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    finally:
        module.config, module.hf_quantizer = original, quantizer
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return {"directory": directory.name, "class": type(module).__name__}


def export(model: nn.Module, spec: str, profile: Profile, formats: Mapping[str, str], directory: str | os.PathLike,
           tokenizer: Any = None, structure: Mapping[str, int] | None = None, example: Any = None) -> Path:
    """Write the (pruned, not yet converted) model's weights, profile and format choices, plus a
    Hugging Face model's config and ``tokenizer`` so the export loads on its own. ``structure``: the
    structures each block of a physically smaller model kept (`spdy.blocks.shrink`), so `load` resizes
    the architecture its config builds before loading the weights. ``example``: a batch to trace the
    model on for ``model.onnx`` (the pruned weights as dense tensors, or the smaller model; ONNX
    runtimes and DeepSparse load it); ``runtime.json`` says what was written or why not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # tied weights (e.g. embeddings and LM head) share storage; safetensors stores each once
    seen: dict[int, str] = {}
    shared = {}
    for name, tensor in list(state.items()):
        if not tensor.numel():  # empty tensors (a block pruned away) share no storage, whatever their data_ptr says
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:
            shared[name] = seen[ptr]
            del state[name]
        else:
            seen[ptr] = name
    replace_atomically(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    profile.save(directory / "profile.json")
    meta: dict[str, Any] = {"model": spec, "formats": dict(formats), "shared": shared}
    if structure:
        meta["structured"] = dict(structure)
    part = _huggingface_part(model)
    if part is not None:
        meta["huggingface"] = _save_huggingface(directory, *part, model, tokenizer)
        if structure:
            meta["pretrained"] = _save_pretrained(directory / PRETRAINED, part[1], tokenizer, structure)
    if example is not None:
        meta["onnx"] = write_onnx(model, example, directory / ONNX)
    write_json(directory / RUNTIME, meta)
    return directory


def _rebuild(directory: Path, record: dict) -> nn.Module:
    """The architecture from the export's own config.json and the classes runtime.json names (weights not loaded)."""
    import transformers

    cls = getattr(transformers, record["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"{directory / RUNTIME}: transformers {transformers.__version__} has no model class {record['class']!r}")
    inner = cls(transformers.AutoConfig.from_pretrained(str(directory)))
    if not record["attribute"]:
        return inner
    module_name, _, qualname = record["wrapper"].partition(":")
    try:
        wrapper = importlib.import_module(module_name)
        for part in qualname.split("."):
            wrapper = getattr(wrapper, part)
    except (ImportError, AttributeError) as e:
        raise InputError(f"{directory / RUNTIME}: cannot import the model wrapper {record['wrapper']!r} ({e})") from None
    return wrapper(inner)


def load(directory: str | os.PathLike, model: nn.Module | None = None, attention: str = "sdpa") -> nn.Module:
    """A runnable model: the architecture (given, rebuilt from the export's Hugging Face config,
    or else from the MODEL spec), pruned weights, sparse formats.

    ``attention="kernel"`` also runs a transformers model's attention with spdy's CPU kernel
    (`spdy.runtime.use_kernel_attention`); ``"sdpa"`` keeps the model's own.
    """
    if attention not in ("sdpa", "kernel"):
        raise InputError(f"attention must be 'sdpa' or 'kernel', got {attention!r}")
    directory = Path(directory)
    meta_path = directory / RUNTIME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a spdy export: {RUNTIME} is missing")
    meta = read_json(meta_path, "export runtime file")
    if model is None and "huggingface" in meta:
        model = _rebuild(directory, meta["huggingface"])
    elif model is None:
        from spdy.models import load_model

        model = load_model(meta["model"], samples=1, heldout=1).model
    if meta.get("structured"):
        from spdy.blocks import resize_to

        resize_to(model, meta["structured"])
    state = load_file(str(directory / WEIGHTS))
    for name, source in meta.get("shared", {}).items():
        state[name] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise InputError(f"{directory}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = convert(model.eval(), meta["formats"])
    if attention == "kernel" and not use_kernel_attention(model):
        _, why = kernel_status()
        raise InputError(f"attention='kernel': {why or 'the model has no transformers attention that can switch implementation'}")
    return model
