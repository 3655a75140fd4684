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


def spread(available: int, count: int) -> list[int]:
    """``count`` indices evenly spaced over ``range(available)`` (the middle of ``count`` equal strides)."""
    return [(2 * i + 1) * available // (2 * count) for i in range(count)]


Batches = list[dict[str, torch.Tensor]]


def token_batches(tokenizer, text: str, samples: int, seq_len: int, batch_size: int, special: bool = True,
                  validation: int = 0, database: int = 0) -> tuple[Batches, Batches, Batches]:
    """``samples`` full-length sequences of ``seq_len`` tokens, in batches; ``validation`` and ``database`` more.

    The text is tokenized once and cut into consecutive windows; the sequences are windows
    spread evenly over the whole text, so a few dozen samples see every part of it rather than
    its first pages. With ``special`` each window is wrapped in the tokenizer's [CLS] ... [SEP]
    (encoders). The ``validation`` windows (second list) are spread over the windows not picked,
    and the ``database`` windows (third list) over those left after that: no two lists overlap,
    and a list does not depend on the ones after it. Empty lists for 0.
    Raises if the text is too short, naming how many sequences it can give.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    cls, sep = (tokenizer.cls_token_id, tokenizer.sep_token_id) if special else (None, None)
    inner = seq_len - (cls is not None) - (sep is not None)
    available = len(ids) // inner
    if samples + validation + database > available:
        asked = " + ".join([f"{samples}"] + [f"{n} {name}" for n, name in ((validation, "validation"), (database, "database")) if n])
        raise InputError(f"the text gives only {available} sequences of {seq_len} tokens; asked for {asked} "
                         "(lower --samples, --validation, --database-samples or --seq-len)")
    picked = spread(available, samples)
    rest = sorted(set(range(available)) - set(picked))
    checking = [rest[k] for k in spread(len(rest), validation)]
    rest = sorted(set(rest) - set(checking))

    def batches(windows: list[int]) -> Batches:
        if not windows:
            return []
        rows = [([cls] if cls is not None else []) + ids[w * inner:(w + 1) * inner] + ([sep] if sep is not None else []) for w in windows]
        tokens = torch.tensor(rows, dtype=torch.long)
        return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in tokens.split(batch_size)]

    return batches(picked), batches(checking), batches([rest[k] for k in spread(len(rest), database)])


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
