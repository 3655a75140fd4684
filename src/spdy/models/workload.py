"""What a deployed model is timed and verified on: whole sequences at once, or one generated token.

An encoder serves batches of whole inputs (``prefill:BATCHxSEQ``). A causal language model on a
CPU spends its time generating one token per step against a KV cache (``decode:BATCH@CONTEXT``):
every Linear then multiplies BATCH rows, its time is the bytes of its weight streamed from
memory, and sparsity pays in bytes saved rather than in multiply-adds. The timing table, verify
and the report all run the bundle's workload, and the table records it.
"""

from __future__ import annotations

import inspect
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spdy.errors import InputError

DECODE_DEFAULT = "decode:1@512"
GENERATED = 32  # tokens each timed `generate` call produces in verify
GENERATION_ROUNDS = 5


@dataclass(frozen=True)
class Workload:
    kind: str  # "prefill" | "decode"
    batch: int
    tokens: int  # prefill: tokens per sequence; decode: tokens already in the KV cache

    @classmethod
    def parse(cls, text: str) -> "Workload":
        """``prefill:8x128`` or ``decode:1@512``; anything else is refused with the two forms."""
        match = re.fullmatch(r"\s*(prefill):(\d+)x(\d+)\s*|\s*(decode):(\d+)@(\d+)\s*", text or "")
        if match is None:
            raise InputError(f"--workload {text!r}: use prefill:BATCHxSEQ (e.g. prefill:8x128) or decode:BATCH@CONTEXT (e.g. {DECODE_DEFAULT})")
        kind, batch, tokens = match.group(1, 2, 3) if match.group(1) else match.group(4, 5, 6)
        if int(batch) < 1 or int(tokens) < 1:
            raise InputError(f"--workload {text!r}: the batch and the token count must be at least 1")
        return cls(kind, int(batch), int(tokens))

    def __str__(self) -> str:
        return f"prefill:{self.batch}x{self.tokens}" if self.kind == "prefill" else f"decode:{self.batch}@{self.tokens}"


def _token_rows(calibration: list, rows: int, length: int, flag: str) -> torch.Tensor:
    """``rows`` x ``length`` token ids cut from the calibration text, in order (real text, not random ids)."""
    if not calibration or not isinstance(calibration[0], dict) or "input_ids" not in calibration[0]:
        raise InputError(f"{flag}: a token workload needs a text model (batches with input_ids)")
    ids = torch.cat([b["input_ids"].reshape(-1) for b in calibration])
    if ids.numel() < rows * length:
        raise InputError(f"{flag}: needs {rows} x {length} = {rows * length} tokens, the calibration text has {ids.numel()}; "
                         "ask for fewer, or raise --samples")
    return ids[: rows * length].reshape(rows, length)


class DecodeStep:
    """One generated token per call: BATCH new tokens against a KV cache of CONTEXT tokens.

    The cache is filled once, by the dense model, and cut back to CONTEXT after every call, so
    each call costs what the step at that context costs inside `generate` (which also grows its
    cache by concatenation). Models that share this step (dense, pruned, its masked twin) see the
    same cache, so their outputs compare exactly. Works on a `CausalLM` wrapper (``model.lm``).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, workload: Workload):
        self.workload = workload
        self.prompt, self.next_ids = ids[:, :-1], ids[:, -1:]
        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output); 4.x knows only the old name
        self.keyword = "cache" if "cache" in inspect.signature(model.lm.forward).parameters else "past_key_values"
        with torch.no_grad():
            self.cache = getattr(model.lm(input_ids=self.prompt, use_cache=True), self.keyword)

    def run_model(self, model: nn.Module) -> torch.Tensor:
        out = model.lm(input_ids=self.next_ids, use_cache=True, **{self.keyword: self.cache})
        self._cut_back()
        return out.logits

    def _cut_back(self) -> None:
        if excess := self.cache.get_seq_length() - self.workload.tokens:
            self.cache.crop(-excess)

    def shapes(self) -> dict:
        return {"workload": str(self.workload), "input_ids": list(self.next_ids.shape), "kv_cache_tokens": self.workload.tokens}

    @torch.no_grad()
    def generation(self, dense: nn.Module, pruned: nn.Module, twin: nn.Module, rounds: int = GENERATION_ROUNDS,
                   new_tokens: int = GENERATED) -> dict:
        """Tokens per second of the models' own greedy ``generate`` (fixed length, continuing the cached
        CONTEXT tokens, so only decoding is timed), dense and pruned alternated ``rounds`` times, and
        how many greedy tokens the pruned model shares with its masked dense ``twin`` (the same weights
        run by torch, not the runtime)."""
        ids = torch.cat([self.prompt, self.next_ids], dim=1)

        def generate(model: nn.Module) -> torch.Tensor:
            try:
                return model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{self.keyword: self.cache},
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
            finally:
                self._cut_back()

        expected, produced = generate(twin), generate(pruned)
        seconds: dict[str, list[float]] = {"dense": [], "pruned": []}
        for _ in range(rounds):
            for name, model in (("dense", dense), ("pruned", pruned)):
                start = time.perf_counter()
                generate(model)
                seconds[name].append(time.perf_counter() - start)
        tokens = new_tokens * self.prompt.shape[0]
        ratios = [d / p for d, p in zip(seconds["dense"], seconds["pruned"])]
        return {"new_tokens": new_tokens, "prompt_tokens": int(self.prompt.shape[1]), "rounds": rounds,
                "dense_tokens_per_s": tokens / statistics.median(seconds["dense"]),
                "pruned_tokens_per_s": tokens / statistics.median(seconds["pruned"]),
                "speedup": statistics.median(ratios), "greedy_agreement": float((produced == expected).float().mean())}


def workload_batch(bundle: Any, workload: Workload | None) -> Any:
    """The batch that runs ``workload`` on ``bundle``'s model: the first calibration batch when None."""
    if workload is None:
        return bundle.calibration[0]
    if workload.kind == "prefill":
        ids = _token_rows(bundle.calibration, workload.batch, workload.tokens, f"--workload {workload}")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not hasattr(bundle.model, "lm"):
        raise InputError(f"--workload {workload}: decoding needs a causal language model; {bundle.name} is not one (use prefill:BATCHxSEQ)")
    ids = _token_rows(bundle.calibration, workload.batch, workload.tokens + 1, f"--workload {workload}")
    return DecodeStep(bundle.model, ids, workload)
