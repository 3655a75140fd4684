"""Hugging Face models as spdy bundles: sentence encoders and causal language models on pydoc text."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spdy.models.bundle import ModelBundle
from spdy.models.data import pydoc_text, token_batches
from spdy.models.workload import DECODE_DEFAULT, Workload


class SentenceEncoder(nn.Module):
    """A transformer encoder + mean pooling + L2 norm: a sentence-transformers embedding."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.token_states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's state of every token: what the pooled embedding averages, 128x the signal per sequence."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class CausalLM(nn.Module):
    """Returns logits only, so every model in spdy maps a batch to one tensor."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
        if head is not None and embedding is not None and head.weight is embedding.weight:
            # A tied head (SmolLM2's) is the decoder's largest matrix (vocabulary x hidden): to prune it
            # (`--include 'lm.lm_head'`) it needs weights of its own, or the token embeddings would be pruned too.
            head.weight = nn.Parameter(embedding.weight.detach().clone())
            lm.config.tie_word_embeddings = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _text_bundle(name: str, model: nn.Module, tokenizer, samples: int, heldout: int, seq_len: int, batch_size: int, loss: str, include,
                 special: bool, validation: int, database: int) -> ModelBundle:
    calibration, valid, statistics = token_batches(tokenizer, pydoc_text("calibration"), samples, seq_len, batch_size, special, validation,
                                                   database)
    held, _, _ = token_batches(tokenizer, pydoc_text("heldout"), heldout, seq_len, batch_size, special)
    return ModelBundle(name, model.eval(), calibration, held, loss, include, {"seq_len": seq_len, "batch_size": batch_size}, tokenizer=tokenizer,
                       validation=valid, database=statistics)


def load_directory(path: Path, samples: int, heldout: int, seq_len: int, batch_size: int, gguf_file: str | None = None,
                   validation: int = 0, database: int = 0) -> ModelBundle:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    # GGUF checkpoints are language models but their configs carry no `architectures`.
    causal = gguf_file is not None or any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    if causal:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
        bundle = _text_bundle(path.name, CausalLM(lm), tokenizer, samples, heldout, seq_len, batch_size, "next-token", ["lm.model.layers.*"],
                              special=False, validation=validation, database=database)
        bundle.workload = Workload.parse(DECODE_DEFAULT)  # served token by token
        return bundle
    encoder = SentenceEncoder(AutoModel.from_pretrained(str(path), **kwargs))
    bundle = _text_bundle(path.name, encoder, tokenizer, samples, heldout, seq_len, batch_size, "cosine", ["bert.encoder.*"],
                          special=True, validation=validation, database=database)
    bundle.signals["token-cosine"] = lambda batch: encoder.token_states(**batch)
    return bundle
