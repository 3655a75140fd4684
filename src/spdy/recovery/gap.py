"""Global AdaPrune (gAP): fine-tune a whole pruned model to reproduce the dense model's layer outputs.

SPDY's database prunes every layer independently, on the dense model's inputs; stitched
together, the errors of the layers compound. gAP repairs that with little data and no
labels: all parameters of the pruned model are trained (Adam) to minimise

    loss = sum over pruned units u of ||out_u(pruned) - out_u(dense)||^2 / ||out_u(dense)||^2

where both models see the same batch and the pruned model runs on its *own* activations
(so later layers learn to compensate for earlier layers' errors). The zeros of the pruned
weights are re-applied after every optimiser step, so the sparsity pattern (e.g. 2:4) is
exactly preserved. It is intermediate-feature distillation against the dense model.

Paper defaults: Adam, lr 1e-5, batches of 32 samples, ~100 passes over ~1k samples. That is
~3200 steps: hours for MiniLM on 2 CPU cores (a step with 32 x 128 tokens takes seconds),
so pass fewer ``epochs`` there and expect a smaller gain.

Both models run in eval mode (no dropout; normalisation statistics of the dense model kept),
which also makes the fit deterministic. A fit with a ``checkpoint_dir`` writes parameters
and Adam state (safetensors) plus counters (JSON) every ``checkpoint_every`` steps; running
the same fit again resumes from there and ends with the same weights as an uninterrupted fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spdy.database.build import model_fingerprint
from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.files import replace_atomically, write_json
from spdy.units import call_model

STATE = "gap-state.json"
FORMAT = "spdy.recovery.gap-checkpoint/1"


# --- data: the calibration batches as one pool of samples, re-cut into batches of any size ---

def _concat(batches: Sequence[Any]) -> Any:
    """Concatenate batches (tensors, dicts or tuples of tensors) along the sample dimension."""
    first = batches[0]
    if isinstance(first, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(torch.cat([b[i] for b in batches]) for i in range(len(first)))
    return torch.cat(list(batches))


def _take(pool: Any, idx: torch.Tensor) -> Any:
    if isinstance(pool, dict):
        return {k: v[idx] for k, v in pool.items()}
    if isinstance(pool, (tuple, list)):
        return type(pool)(v[idx] for v in pool)
    return pool[idx]


def _count(pool: Any) -> int:
    first = next(iter(pool.values())) if isinstance(pool, dict) else pool[0] if isinstance(pool, (tuple, list)) else pool
    return int(first.shape[0])


def epoch_order(samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, so a resumed fit
    replays exactly the batches an uninterrupted one would have seen."""
    return torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# --- the loss: relative output error of every unit, collected with forward hooks ---

class _Outputs:
    """Forward hooks on named modules that keep (or consume) their outputs for one batch."""

    def __init__(self, model: nn.Module, names: Sequence[str], on_output: Callable[[str, torch.Tensor], None]):
        self.hooks = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise InputError(f"gAP: unit {name!r} is not a module of the model") from None
            self.hooks.append(module.register_forward_hook(lambda m, args, out, name=name: on_output(name, out)))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def relative_output_loss(pruned: nn.Module, dense: nn.Module, batch: Any, names: Sequence[str]) -> torch.Tensor:
    """sum_u ||out_u(pruned) - out_u(dense)||^2 / ||out_u(dense)||^2 on one batch.

    The dense outputs of one batch are held; each pruned unit's term is formed as soon as
    the unit has run, so no second set of outputs is kept beyond what autograd needs.
    """
    targets: dict[str, torch.Tensor] = {}
    terms: list[torch.Tensor] = []

    def keep(name: str, out: torch.Tensor) -> None:
        targets[name] = out.detach()

    def compare(name: str, out: torch.Tensor) -> None:
        target = targets.pop(name)
        terms.append((out - target).square().sum() / target.square().sum().clamp_min(1e-12))

    hooks = _Outputs(dense, names, keep)
    try:
        with torch.no_grad():
            call_model(dense, batch)
    finally:
        hooks.remove()
    hooks = _Outputs(pruned, names, compare)
    try:
        call_model(pruned, batch)
    finally:
        hooks.remove()
    if len(terms) != len(names):
        raise InputError(f"gAP: {len(names) - len(terms)} units did not run in the pruned model, e.g. {sorted(targets)[:3]}")
    return torch.stack(terms).sum()


# --- the fit ---

class GlobalAdaPrune:
    """Global AdaPrune; configure here, then :meth:`fit` (sklearn/torch style).

    ``epochs`` passes over the calibration samples in batches of ``batch_size`` samples
    (re-cut from the given batches), Adam with ``lr`` and ``betas``; ``max_steps`` caps the
    total number of steps (a compute budget; it may stop mid-epoch). ``checkpoint_dir``
    enables checkpoint/resume every ``checkpoint_every`` steps. After ``fit``,
    ``losses_`` holds the mean training loss of each finished epoch and ``steps_`` the
    number of optimiser steps taken.
    """

    def __init__(self, epochs: int = 100, lr: float = 1e-5, batch_size: int = 32, betas: tuple[float, float] = (0.9, 0.999),
                 seed: int = 0, max_steps: int | None = None, checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 20,
                 progress: bool = True):
        if epochs < 0 or lr <= 0 or batch_size < 1 or checkpoint_every < 1 or (max_steps is not None and max_steps < 0):
            raise InputError(f"gAP needs epochs >= 0, lr > 0, batch_size >= 1, checkpoint_every >= 1, max_steps >= 0; got epochs={epochs}, "
                             f"lr={lr}, batch_size={batch_size}, checkpoint_every={checkpoint_every}, max_steps={max_steps}")
        self.epochs, self.lr, self.batch_size, self.betas, self.seed = epochs, lr, batch_size, tuple(betas), seed
        self.max_steps = max_steps
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.losses_: list[float] = []
        self.steps_ = 0

    def fit(self, pruned_model: nn.Module, dense_model: nn.Module, batches: Sequence[Any], units: Iterable[str],
            on_step: Callable[[int, float], None] | None = None) -> "GlobalAdaPrune":
        """Train ``pruned_model`` in place against ``dense_model`` on ``batches``.

        ``units`` names the pruned layers (a dict of units works); their current zeros are
        the masks kept. ``on_step(step, loss)`` runs after each step (and its checkpoint).
        """
        names = list(units)
        if not names:
            raise InputError("gAP: no units given")
        if not batches:
            raise InputError("gAP: no calibration batches")
        pool = _concat(list(batches))
        samples = _count(pool)
        params = dict(pruned_model.named_parameters())
        trainable = {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        pruned_model.eval()
        dense_model.eval()
        weights = {name: pruned_model.get_submodule(name).weight for name in names}
        masks = {name: w.detach() == 0 for name, w in weights.items()}
        optimizer = torch.optim.Adam(params.values(), lr=self.lr, betas=self.betas)
        identity = {"format": FORMAT, "lr": self.lr, "batch_size": self.batch_size, "betas": list(self.betas), "seed": self.seed,
                    "units": names, "samples": samples, "start": model_fingerprint(pruned_model)}
        counters = {"epoch": 0, "batch": 0, "step": 0, "epoch_loss_sum": 0.0, "losses": []}
        if self.checkpoint_dir is not None:
            counters = self._resume(identity, counters, params, optimizer)
        total = self.epochs * -(-samples // self.batch_size)
        total = total if self.max_steps is None else min(total, self.max_steps)
        self.losses_ = list(counters["losses"])
        bar = progress_bar(total=total, initial=min(counters["step"], total), desc="gAP", unit="step", disable=not self.progress)
        try:
            while counters["epoch"] < self.epochs and counters["step"] < total:
                order = epoch_order(samples, self.seed, counters["epoch"]).split(self.batch_size)
                for index in range(counters["batch"], len(order)):
                    if counters["step"] >= total:
                        break
                    loss = relative_output_loss(pruned_model, dense_model, _take(pool, order[index]), names)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        for name, w in weights.items():
                            w.masked_fill_(masks[name], 0.0)
                    value = float(loss.detach())
                    counters["batch"] = index + 1
                    counters["step"] += 1
                    counters["epoch_loss_sum"] += value
                    if counters["batch"] == len(order):
                        counters["losses"].append(counters["epoch_loss_sum"] / len(order))
                        counters.update(epoch=counters["epoch"] + 1, batch=0, epoch_loss_sum=0.0)
                        self.losses_ = list(counters["losses"])
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4g}", epoch=counters["epoch"], refresh=False)
                    if self.checkpoint_dir is not None and (counters["step"] % self.checkpoint_every == 0 or counters["step"] == total):
                        self._save(identity, counters, params, optimizer)
                    if on_step is not None:
                        on_step(counters["step"], value)
        finally:
            bar.close()
        self.steps_ = counters["step"]
        for n, p in params.items():
            p.requires_grad_(trainable[n])
        return self

    # --- checkpoints: safetensors for tensors, JSON for counters; never pickle ---

    def _save(self, identity: dict, counters: dict, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Write the tensors under a step-numbered name, then point the JSON at it atomically,
        so a kill at any moment leaves the previous checkpoint intact."""
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{n}": p.detach().contiguous().clone() for n, p in params.items()}
        for n, p in params.items():
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"adam.{key}.{n}"] = value.detach().contiguous().clone()
        filename = f"gap-{counters['step']:08d}.safetensors"
        replace_atomically(self.checkpoint_dir / filename, lambda tmp: save_file(tensors, str(tmp)))
        state = self.checkpoint_dir / STATE
        previous = json.loads(state.read_text())["tensors"] if state.is_file() else None
        write_json(state, {**identity, "tensors": filename, "counters": counters})
        if previous and previous != filename:
            (self.checkpoint_dir / previous).unlink(missing_ok=True)

    def _resume(self, identity: dict, counters: dict, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
        assert self.checkpoint_dir is not None
        state_path = self.checkpoint_dir / STATE
        if not state_path.is_file():
            return counters
        state = json.loads(state_path.read_text())
        for key, value in identity.items():
            if state.get(key) != value:
                raise InputError(f"gAP: {self.checkpoint_dir} holds a fit with a different {key} ({str(state.get(key))[:80]!r}, now "
                                 f"{str(value)[:80]!r}); use another --work-dir or delete it to start over")
        tensors = load_file(str(self.checkpoint_dir / state["tensors"]))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        adam_state = {}
        for i, n in enumerate(params):
            entry = {key.split(".", 2)[1]: t for key, t in tensors.items() if key.startswith("adam.") and key.split(".", 2)[2] == n}
            if entry:
                adam_state[i] = entry
        optimizer.load_state_dict({"state": adam_state, "param_groups": optimizer.state_dict()["param_groups"]})
        return state["counters"]
