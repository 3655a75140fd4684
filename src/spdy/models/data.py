"""Text that ships with Python, cut into fixed-length token batches.

``pydoc_data.topics`` (the help texts of the standard library, ~465k characters) is the
embedded default corpus. Topics are split by name into calibration and held-out sets
that never share a topic, so held-out quality is measured on text the pruner never saw.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

from spdy.errors import InputError

Split = Literal["calibration", "heldout"]


def pydoc_text(split: Split) -> str:
    """All pydoc topics of one split; every 5th topic (sorted by name) is held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 5 == 4) == (split == "heldout")]
    return "\n\n".join(topics[n] for n in chosen)


def token_batches(tokenizer, text: str, samples: int, seq_len: int, batch_size: int, special: bool = True) -> list[dict[str, torch.Tensor]]:
    """``samples`` full-length sequences of ``seq_len`` tokens, in batches.

    The text is tokenized once and cut into consecutive windows; with ``special`` each
    window is wrapped in the tokenizer's [CLS] ... [SEP] (encoders). Raises if the text
    is too short, naming how many sequences it can give.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    cls, sep = (tokenizer.cls_token_id, tokenizer.sep_token_id) if special else (None, None)
    inner = seq_len - (cls is not None) - (sep is not None)
    available = len(ids) // inner
    if samples > available:
        raise InputError(f"the text gives only {available} sequences of {seq_len} tokens; asked for {samples} (lower --samples or --seq-len)")
    rows = []
    for i in range(samples):
        window = ids[i * inner : (i + 1) * inner]
        rows.append(([cls] if cls is not None else []) + window + ([sep] if sep is not None else []))
    tokens = torch.tensor(rows, dtype=torch.long)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in tokens.split(batch_size)
    ]


def fingerprint_batches(batches: list) -> str:
    """A short content hash of sample batches, so caches know when the data changed."""
    h = hashlib.sha256()
    for batch in batches:
        items = sorted(batch.items()) if isinstance(batch, dict) else enumerate(batch if isinstance(batch, (list, tuple)) else [batch])
        for key, value in items:
            h.update(str(key).encode())
            if isinstance(value, torch.Tensor):
                h.update(str(tuple(value.shape)).encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()[:16]
