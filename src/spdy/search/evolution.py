"""Evolutionary search over profiles, in the style of EvoPress (Sieberling et al., 2024).

Instead of learning error coefficients, it mutates profiles directly: a mutation makes a
few units one level denser and then random others sparser until the time budget holds
again. Each generation's offspring are culled in stages on growing amounts of calibration
data, so most candidates cost a fraction of a full evaluation; the parent is replaced only
by a child that beats it on all the data.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.files import digest
from spdy.search.dp import solve
from spdy.search.profile import Profile
from spdy.search.spdy import Checkpoint
from spdy.timing.table import TimingTable

# (profile, number of batches or None for all) -> loss
StagedEvaluate = Callable[[Mapping[str, str], int | None], float]


def _worst_if_broken(loss: float) -> float:
    """NaN or inf -> inf: a broken candidate loses every comparison (NaN would also never be beaten)."""
    return loss if math.isfinite(loss) else math.inf


@dataclass(frozen=True)
class EvoConfig:
    generations: int = 50
    offspring: int = 16
    max_switches: int = 3
    stages: tuple[tuple[float, int], ...] = ((0.25, 4), (0.5, 2), (1.0, 1))  # (share of batches, survivors)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 1 or self.offspring < 1 or self.max_switches < 1 or not self.stages:
            raise InputError(f"invalid evolution settings {self}")
        if self.stages[-1][0] != 1.0:
            raise InputError("the last selection stage must use all batches (share 1.0)")


class EvolutionSearch:
    """``EvolutionSearch(table, target, evaluate, batches).run()`` -> the best :class:`Profile` found."""

    def __init__(self, table: TimingTable, target: float, evaluate: StagedEvaluate, batches: int,
                 config: EvoConfig = EvoConfig(), checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 fingerprint: str = ""):
        self.table, self.target, self.evaluate, self.batches = table, target, evaluate, batches
        self.config, self.progress = config, progress
        self.keys = [table.options(u) for u in table.units]
        self.times = [np.array([table.times[u][k] for k in ks]) for u, ks in zip(table.units, self.keys)]
        self.limit = table.base / target - table.fixed
        key = {"method": "evo", "table": digest(table.to_dict()["units"], length=16), "target": target, "config": asdict(config), "data": fingerprint}
        self.checkpoint = Checkpoint(checkpoint, key)
        self.start = solve(table, target).profile  # the prior's DP profile; raises InfeasibleTarget

    def _profile(self, genome: np.ndarray) -> dict[str, str]:
        return {u: ks[i] for u, ks, i in zip(self.table.units, self.keys, genome)}

    def _time(self, genome: np.ndarray) -> float:
        return float(sum(t[i] for t, i in zip(self.times, genome)))

    def mutate(self, parent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Make 1..max_switches units one level denser, then random others sparser until it fits."""
        child = parent.copy()
        for _ in range(rng.integers(1, self.config.max_switches + 1)):
            denser = np.flatnonzero(child > 0)
            if len(denser):
                child[rng.choice(denser)] -= 1
        while self._time(child) > self.limit:
            sparser = np.flatnonzero(child < np.array([len(k) - 1 for k in self.keys]))
            if not len(sparser):
                return parent.copy()
            child[rng.choice(sparser)] += 1
        return child

    def run(self) -> Profile:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        state = self.checkpoint.load()
        if state is None:
            parent = np.array([ks.index(self.start[u]) for u, ks in zip(self.table.units, self.keys)])
            state = {"generation": 0, "parent": parent.tolist(), "loss": _worst_if_broken(self.evaluate(self._profile(parent), None)),
                     "evaluations": 1, "batch_evaluations": self.batches, "trace": [], "elapsed": 0.0}
        else:
            rng.bit_generator.state = state["rng"]
        started = time.perf_counter() - state["elapsed"]
        bar = progress_bar(total=cfg.generations, initial=state["generation"], desc="evolution", unit="gen", disable=not self.progress, leave=False)
        while state["generation"] < cfg.generations:
            parent = np.array(state["parent"])
            pool = [self.mutate(parent, rng) for _ in range(cfg.offspring)]
            for share, survivors in cfg.stages:
                batches = max(1, round(share * self.batches))
                scores = [_worst_if_broken(self.evaluate(self._profile(g), batches)) for g in pool]
                state["evaluations"] += len(pool)
                state["batch_evaluations"] += len(pool) * batches
                order = np.argsort(scores, kind="stable")
                pool, best_score = [pool[i] for i in order[:survivors]], scores[order[0]]
            if best_score < state["loss"]:
                state["parent"], state["loss"] = pool[0].tolist(), best_score
                state["trace"].append({"generation": state["generation"], "loss": best_score, "evaluations": state["evaluations"],
                                       "elapsed": round(time.perf_counter() - started, 3)})
            state["generation"] += 1
            state["rng"], state["elapsed"] = rng.bit_generator.state, time.perf_counter() - started
            self.checkpoint.save(state)
            bar.set_postfix(best=f"{state['loss']:.5g}", evals=state["evaluations"], refresh=False)
            bar.update(1)
        bar.close()
        if not math.isfinite(state["loss"]):
            raise RuntimeError("every candidate's loss was NaN or inf: the pruned models are broken (check the database and the loss)")
        options = self._profile(np.array(state["parent"]))
        predicted = self.table.predicted_time(options)
        return Profile(options=options, target=self.target, predicted_time=predicted, predicted_speedup=self.table.base / predicted,
                       method="evo", calibration_loss=state["loss"], evaluations=state["evaluations"], trace=state["trace"],
                       meta={"config": asdict(cfg), "batch_evaluations": state["batch_evaluations"],
                             "seconds": round(time.perf_counter() - started, 2)})
