"""The SPDY search: learn per-unit error coefficients whose DP profile loses the least.

Layer-wise errors do not add up to the model's loss, so SPDY does not trust them. Each unit
gets the prior ``(i/(n-1))^2`` over its sorted options times a coefficient ``c_l`` in
[0, 1]; a coefficient vector is scored by solving the DP and evaluating the resulting
profile on calibration data. The search is 100 random vectors, then a local search that
redraws k random coordinates (k from 10% of the units down to 1, lowered after 100 failed
tries in a row). Every constant is a parameter; the run is deterministic per seed and
checkpoints after each accepted step, so a killed search resumes where it stood.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.search.dp import DEFAULT_BUCKETS, scaled_errors, solve
from spdy.files import digest, read_json, write_json
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable

Evaluate = Callable[[Mapping[str, str]], float]


@dataclass(frozen=True)
class SpdyConfig:
    random_starts: int = 100
    tries: int = 100
    step_fraction: float = 0.1
    seed: int = 0
    buckets: int = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        if self.random_starts < 1 or self.tries < 1 or not 0 < self.step_fraction <= 1:
            raise InputError(f"invalid search settings {self}: need random_starts >= 1, tries >= 1, 0 < step_fraction <= 1")


class Checkpoint:
    """A JSON state file written atomically; refuses a file written for other inputs."""

    def __init__(self, path: str | os.PathLike | None, key: dict):
        self.path = Path(path) if path else None
        self.key = json.loads(json.dumps(key))  # as it reads back (tuples become lists)

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        state = read_json(self.path, "search checkpoint")
        if state.get("key") != self.key:
            raise InputError(f"checkpoint {self.path} was written for other inputs ({state.get('key')} vs {self.key}); delete it or use another work directory")
        return state

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        write_json(self.path, {**state, "key": self.key}, indent=None)


class CachedObjective:
    """Profile -> loss, remembering profiles already scored (different c often give one profile)."""

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate
        self.cache: dict[tuple, float] = {}
        self.evaluations = 0

    def __call__(self, profile: Mapping[str, str]) -> float:
        key = tuple(profile.values())
        if key not in self.cache:
            loss = self.evaluate(profile)
            self.cache[key] = math.inf if not math.isfinite(loss) else loss
            self.evaluations += 1
        return self.cache[key]


class SpdySearch:
    """``SpdySearch(table, target, evaluate).run()`` -> the best :class:`Profile` found."""

    def __init__(self, table: TimingTable, target: float, evaluate: Evaluate, config: SpdyConfig = SpdyConfig(),
                 checkpoint: str | os.PathLike | None = None, progress: bool = True, fingerprint: str = ""):
        self.table, self.target, self.config, self.progress = table, target, config, progress
        self.objective = CachedObjective(evaluate)
        key = {"method": "spdy", "table": digest(table.to_dict()["units"], length=16), "target": target, "config": asdict(config), "data": fingerprint}
        self.checkpoint = Checkpoint(checkpoint, key)
        solve(table, target, buckets=config.buckets)  # fail fast (InfeasibleTarget) before any evaluation

    def profile_for(self, coefficients: np.ndarray) -> dict[str, str]:
        return solve(self.table, self.target, scaled_errors(self.table, coefficients), self.config.buckets).profile

    def run(self) -> Profile:
        cfg, units = self.config, len(self.table.units)
        rng = np.random.default_rng(cfg.seed)
        state = self.checkpoint.load() or {
            "phase": "random", "next": 0, "k": max(1, round(cfg.step_fraction * units)), "tries": 0,
            "best": None, "best_loss": math.inf, "evaluations": 0, "trace": [], "elapsed": 0.0,
        }
        if "rng" in state:
            rng.bit_generator.state = state["rng"]
        self.objective.evaluations = state["evaluations"]
        best = None if state["best"] is None else np.array(state["best"])
        started = time.perf_counter() - state["elapsed"]
        bar = progress_bar(desc="spdy search", unit="cand", disable=not self.progress, leave=False)

        def save(**changes) -> None:
            state.update(changes, rng=rng.bit_generator.state, evaluations=self.objective.evaluations,
                         best=None if best is None else best.tolist(), elapsed=time.perf_counter() - started)
            self.checkpoint.save(state)

        def improve(candidate: np.ndarray, loss: float) -> None:
            nonlocal best
            best = candidate
            state["best_loss"] = loss
            state["trace"].append({"evaluations": self.objective.evaluations, "loss": loss, "phase": state["phase"],
                                   "k": state["k"], "elapsed": round(time.perf_counter() - started, 3)})

        def show() -> None:
            bar.set_postfix(evals=self.objective.evaluations, best=f"{state['best_loss']:.5g}", k=state["k"] if state["phase"] == "local" else "-", refresh=False)
            bar.update(1)

        while state["phase"] == "random" and state["next"] < cfg.random_starts:
            candidate = rng.random(units)
            loss = self.objective(self.profile_for(candidate))
            state["next"] += 1
            if loss < state["best_loss"] or best is None:
                improve(candidate, loss)
                save()
            show()
        if state["phase"] == "random":
            save(phase="local", tries=0)
        while state["k"] >= 1:
            while state["tries"] < cfg.tries:
                candidate = best.copy()
                picked = rng.choice(units, size=min(state["k"], units), replace=False)
                candidate[picked] = rng.random(len(picked))
                loss = self.objective(self.profile_for(candidate))
                if loss < state["best_loss"]:
                    improve(candidate, loss)
                    save(tries=0)
                else:
                    state["tries"] += 1
                show()
            save(k=state["k"] - 1, tries=0)
        bar.close()
        if not math.isfinite(state["best_loss"]):
            raise RuntimeError("every candidate's loss was NaN or inf: the pruned models are broken (check the database and the loss)")
        solution = solve(self.table, self.target, scaled_errors(self.table, best), cfg.buckets)
        return Profile(
            options=solution.profile, target=self.target, predicted_time=solution.predicted_time,
            predicted_speedup=solution.predicted_speedup, method="spdy", calibration_loss=state["best_loss"],
            evaluations=self.objective.evaluations, trace=state["trace"],
            meta={"coefficients": best.tolist(), "config": asdict(cfg), "seconds": round(time.perf_counter() - started, 2)},
        )
