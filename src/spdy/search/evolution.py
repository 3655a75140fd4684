"""Evolutionary search over profiles, in the style of EvoPress (Sieberling et al., 2024).

Instead of learning error coefficients, it mutates profiles directly: a mutation makes a
few units one level denser and then random others sparser until the time budget holds
again. Each generation's offspring are culled in stages on growing amounts of calibration
data (successive halving), so most candidates cost a fraction of a full evaluation, and a
survivor's next stage only scores the batches it has not seen (`MultiFidelity`); the parent
is replaced only by a child that beats it on all the data.

A wall-time budget may stop the search between evaluations (the generation in flight is
then dropped). The state is checkpointed after every evaluation and every loss is logged
beside it, so a killed search resumes losing at most the evaluation in flight; without a
budget the run is deterministic per seed.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.files import digest
from spdy.search.budget import Clock
from spdy.search.dp import solve
from spdy.search.evaluate import MultiFidelity, Pool
from spdy.search.profile import Profile
from spdy.search.select import Finalists
from spdy.search.spdy import Checkpoint
from spdy.timing.table import TimingTable

# an Evaluator, or (profile, number of batches or None for all) -> loss
StagedEvaluate = Callable[[Mapping[str, str], int | None], float]


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
    """``EvolutionSearch(table, target, evaluate, batches).run()`` -> the best :class:`Profile` found.

    ``batches``: how many calibration batches ``evaluate`` has (an `Evaluator` knows its own);
    ``budget``: seconds of wall time, None for none; ``pool``: copies of ``evaluate`` (an `Evaluator`) that
    score each stage's offspring in parallel, with the same result as without it.
    """

    def __init__(self, table: TimingTable, target: float, evaluate: StagedEvaluate, batches: int,
                 config: EvoConfig = EvoConfig(), checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 fingerprint: str = "", budget: float | None = None, pool: Pool | None = None):
        self.table, self.target, self.evaluate, self.batches = table, target, evaluate, batches
        self.pool = pool
        self.config, self.progress, self.budget = config, progress, budget
        self.keys = [table.options(u) for u in table.units]
        self.limit = table.base / target - table.fixed
        key = {"method": "evo", "table": digest(table.solver_view(), length=16), "target": target, "config": asdict(config), "data": fingerprint}
        self.checkpoint = Checkpoint(checkpoint, key)
        self.start = solve(table, target).profile  # the prior's DP profile; raises InfeasibleTarget

    def _profile(self, genome: np.ndarray) -> dict[str, str]:
        return {u: ks[i] for u, ks, i in zip(self.table.units, self.keys, genome)}

    def _time(self, genome: np.ndarray) -> float:
        return self.table.predicted_time(self._profile(genome)) - self.table.fixed

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
        fid = MultiFidelity(self.evaluate, self.batches, staged=True)
        rng = np.random.default_rng(cfg.seed)
        loaded = self.checkpoint.load()
        state = loaded or {"generation": 0, "parent": [ks.index(self.start[u]) for u, ks in zip(self.table.units, self.keys)],
                           "loss": None, "evaluations": 0, "batch_evaluations": 0, "full_evaluations": 0, "trace": [], "elapsed": 0.0,
                           "rng": rng.bit_generator.state, "finalists": []}
        rng.bit_generator.state = state["rng"]  # as at the start of the generation in flight
        fid.keep_log(self.checkpoint.log, fresh=loaded is None)
        fid.evaluations, fid.batch_evaluations, fid.full_evaluations = state["evaluations"], state["batch_evaluations"], state["full_evaluations"]
        clock = Clock(self.budget, state["elapsed"])
        finalists = Finalists(state["finalists"])

        def save() -> None:
            state.update(evaluations=fid.evaluations, batch_evaluations=fid.batch_evaluations, full_evaluations=fid.full_evaluations,
                         elapsed=clock.elapsed)
            self.checkpoint.save(state)

        def score(genome: np.ndarray, batches: int | None) -> float:
            paid, options = fid.batch_evaluations, self._profile(genome)
            loss = fid.mean(options, batches)
            if fid.known(options) >= fid.batches:
                finalists.offer(options, fid.mean(options))
            if fid.batch_evaluations != paid:
                save()
            return loss

        if state["loss"] is None:  # the DP prior's profile, the first parent: where the convergence curve starts
            state["loss"] = score(np.array(state["parent"]), None)
            state["trace"].append({"generation": None, "loss": state["loss"], "evaluations": fid.evaluations,
                                   "batch_evaluations": fid.batch_evaluations, "elapsed": round(clock.elapsed, 3)})
        bar = progress_bar(total=cfg.generations, initial=state["generation"], desc="evolution", unit="gen", disable=not self.progress, leave=False)
        while state["generation"] < cfg.generations and not clock.out():
            parent = np.array(state["parent"])
            pool = [self.mutate(parent, rng) for _ in range(cfg.offspring)]
            cut = False
            for share, survivors in cfg.stages:
                batches = max(1, round(share * fid.batches))
                if self.pool is not None and not clock.out():
                    fid.prefetch([self._profile(g) for g in pool], batches, self.pool)
                    save()
                scores = []
                for g in pool:
                    cut = clock.out()
                    if cut:
                        break
                    scores.append(score(g, batches))
                if cut:
                    break
                order = np.argsort(scores, kind="stable")
                pool, best_score = [pool[i] for i in order[:survivors]], scores[order[0]]
            if cut:
                break  # the generation in flight is dropped; a rerun with more budget resumes it
            if best_score < state["loss"]:
                state["parent"], state["loss"] = pool[0].tolist(), best_score
                state["trace"].append({"generation": state["generation"], "loss": best_score, "evaluations": fid.evaluations,
                                       "batch_evaluations": fid.batch_evaluations, "elapsed": round(clock.elapsed, 3)})
            state["generation"] += 1
            state["rng"] = rng.bit_generator.state
            save()
            bar.set_postfix(best=f"{state['loss']:.5g}", evals=fid.evaluations, refresh=False)
            bar.update(1)
        bar.close()
        if not math.isfinite(state["loss"]):
            raise RuntimeError("every candidate's loss was NaN or inf: the pruned models are broken (check the database and the loss)")
        options = self._profile(np.array(state["parent"]))
        predicted = self.table.predicted_time(options)
        return Profile(options=options, target=self.target, predicted_time=predicted, predicted_speedup=self.table.base / predicted,
                       method="evo", calibration_loss=state["loss"], evaluations=fid.evaluations, trace=state["trace"],
                       meta={"config": asdict(cfg), "batch_evaluations": fid.batch_evaluations, "full_evaluations": fid.full_evaluations,
                             "batches": fid.batches, "seconds": round(clock.elapsed, 2), "budget": self.budget, "finalists": finalists.entries,
                             "stopped_by_budget": state["generation"] < cfg.generations})
