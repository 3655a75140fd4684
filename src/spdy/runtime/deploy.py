"""Export a pruned model for deployment, and load it back as a runnable sparse model.

An export directory holds ``model.safetensors`` (the pruned weights), ``profile.json`` and
``runtime.json`` (the MODEL spec to rebuild the architecture and the runtime format of
every pruned layer, as measured for this engine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from safetensors.torch import load_file, save_file
from torch import nn

from spdy.errors import InputError
from spdy.runtime import convert, kernel_status, use_kernel_attention

if TYPE_CHECKING:  # the runtime needs no search code: a profile only has to save itself
    from spdy.search.profile import Profile

RUNTIME = "runtime.json"
WEIGHTS = "model.safetensors"


def export(model: nn.Module, spec: str, profile: Profile, formats: Mapping[str, str], directory: str | os.PathLike) -> Path:
    """Write the (pruned, not yet converted) model's weights, profile and format choices."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # tied weights (e.g. embeddings and LM head) share storage; safetensors stores each once
    seen: dict[int, str] = {}
    shared = {}
    for name, tensor in list(state.items()):
        ptr = tensor.data_ptr()
        if ptr in seen:
            shared[name] = seen[ptr]
            del state[name]
        else:
            seen[ptr] = name
    save_file(state, str(directory / WEIGHTS))
    profile.save(directory / "profile.json")
    (directory / RUNTIME).write_text(json.dumps({"model": spec, "formats": dict(formats), "shared": shared}, indent=1))
    return directory


def load(directory: str | os.PathLike, model: nn.Module | None = None, attention: str = "sdpa") -> nn.Module:
    """A runnable model: the architecture (rebuilt from the MODEL spec unless given), pruned weights, sparse formats.

    ``attention="kernel"`` also runs a transformers model's attention with spdy's CPU kernel
    (`spdy.runtime.use_kernel_attention`); ``"sdpa"`` keeps the model's own.
    """
    if attention not in ("sdpa", "kernel"):
        raise InputError(f"attention must be 'sdpa' or 'kernel', got {attention!r}")
    directory = Path(directory)
    meta_path = directory / RUNTIME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a spdy export: {RUNTIME} is missing")
    meta = json.loads(meta_path.read_text())
    if model is None:
        from spdy.models import load_model

        model = load_model(meta["model"], samples=1, heldout=1).model
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
