"""The SPDY search: learn per-unit error coefficients whose DP profile loses the least.

Layer-wise errors do not add up to the model's loss, so SPDY does not trust them. Each unit
gets the prior ``(i/(n-1))^2`` over its sorted options times a coefficient ``c_l`` in
[0, 1]; a coefficient vector is scored by solving the DP and evaluating the resulting
profile on calibration data. The search is 100 random vectors, then a local search that
redraws k random coordinates (k from 10% of the units down to 1, lowered after 100 failed
tries in a row), as in the paper. Under a wall budget the random vectors are cut to what half
of it affords, so a slow model's search is not all random draws. ``anchors`` (e.g. the
uniform and global-magnitude profiles at the same target) join the random vectors as
coefficients fitted to reproduce them (`fit_coefficients`), so the local search can start
from the best of the allocations it is compared with instead of only from a random one.

Most candidates are clearly worse than the incumbent, and a few calibration batches say
so: evaluation is multi-fidelity (`MultiFidelity`). The random vectors go through
successive halving (all scored on ``first_batches`` batches, the better half on twice as
many, ... the last few on all); a local candidate is scored on growing prefixes of the data
and abandoned as soon as its loss on them exceeds the incumbent's on the same batches by
more than a margin that shrinks as the prefix grows. Only a candidate that beats the incumbent on all batches is
accepted, so every accepted loss is a full one. A wall-time budget may stop the search early.

Every constant is a parameter; without a budget the run is deterministic per seed. The
state is checkpointed after every evaluation and every loss is logged beside it, so a killed
search resumes where it stood, losing at most the evaluation in flight.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.search.budget import Clock
from spdy.search.dp import DEFAULT_BUCKETS, scaled_errors, solve
from spdy.search.evaluate import Evaluator, MultiFidelity, Objective, Pool
from spdy.files import digest, read_json, write_json
from spdy.search.profile import Profile
from spdy.search.select import Finalists
from spdy.timing.table import TimingTable


@dataclass(frozen=True)
class SpdyConfig:
    random_starts: int = 100
    tries: int = 100
    step_fraction: float = 0.1
    seed: int = 0
    buckets: int = DEFAULT_BUCKETS
    first_batches: int = 1  # the lowest fidelity; >= the number of batches makes every evaluation full
    # a local candidate above the incumbent by more than abandon_margin * sqrt((n - b) / b) (relative) on the first b of
    # n batches is dropped: the margin shrinks as the prefix grows, like the noise of a prefix's mean around the full mean
    abandon_margin: float = 0.004
    # "kind-depth": a unit's coefficient is its kind's (its name without layer indices) times its depth's (the first
    # index in its name), so the search has (kinds + depths) free directions instead of one per unit
    tie: str = "none"

    def __post_init__(self) -> None:
        if self.tie not in TIES:
            raise InputError(f"unknown tie {self.tie!r}; choose one of {', '.join(TIES)}")
        if self.random_starts < 1 or self.tries < 1 or not 0 < self.step_fraction <= 1:
            raise InputError(f"invalid search settings {self}: need random_starts >= 1, tries >= 1, 0 < step_fraction <= 1")
        if self.first_batches < 1 or not 0 <= self.abandon_margin < math.inf:
            raise InputError(f"invalid search settings {self}: need first_batches >= 1 and a finite abandon_margin >= 0")


TIES = ("none", "kind-depth")


def tie_matrix(units: list[str], tie: str) -> np.ndarray | None:
    """(units x groups) membership for ``tie`` (None: every unit its own coefficient)."""
    if tie == "none":
        return None
    groups: dict[str, int] = {}
    rows = []
    for name in units:
        depth = re.search(r"\.(\d+)(\.|$)", name)
        keys = ["kind:" + re.sub(r"\.\d+(?=\.|$)", ".#", name)] + (["depth:" + depth.group(1)] if depth else [])
        rows.append([groups.setdefault(k, len(groups)) for k in keys])
    matrix = np.zeros((len(units), len(groups)))
    for i, row in enumerate(rows):
        matrix[i, row] = 1.0
    return matrix


def fidelities(first: int, batches: int) -> list[int]:
    """Batch counts of the fidelity ladder: ``first``, doubling, ending at all ``batches``."""
    ladder = []
    b = max(1, first)
    while b < batches:
        ladder.append(b)
        b *= 2
    return ladder + [batches]


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

    @property
    def log(self) -> Path | None:
        """Where the search logs every loss it computes (see `MultiFidelity.keep_log`)."""
        return None if self.path is None else self.path.with_suffix(".evaluations.jsonl")


class SpdySearch:
    """``SpdySearch(table, target, evaluate).run()`` -> the best :class:`Profile` found.

    ``evaluate`` is an `Evaluator` (multi-fidelity) or a ``profile -> loss`` callable (every
    evaluation full); ``budget`` (seconds, None for none) bounds the search's wall time.
    ``start``: per-unit coefficients learned before (e.g. at a neighbouring target, as in
    ``Profile.meta["coefficients"]``); the search then skips the random starts and refines them
    by local search. ``pool``: copies of ``evaluate`` (an `Evaluator`) that score the random starts of a
    fidelity, and the next local-search tries, in parallel; the result is the same as without it.
    """

    def __init__(self, table: TimingTable, target: float, evaluate: Objective, config: SpdyConfig = SpdyConfig(),
                 checkpoint: str | os.PathLike | None = None, progress: bool = True, fingerprint: str = "",
                 budget: float | None = None, start: Sequence[float] | None = None, pool: Pool | None = None,
                 anchors: Sequence[Mapping[str, str]] = ()):
        self.table, self.target, self.config, self.progress, self.budget = table, target, config, progress, budget
        self.pool = pool
        self.abandoned = 0  # tries the pool was sent after a winner or the budget's end (the serial search never ran them)
        self.objective = MultiFidelity(evaluate)
        self.ladder = fidelities(config.first_batches, self.objective.batches)
        key = {"method": "spdy", "table": digest(table.solver_view(), length=16), "target": target, "config": asdict(config), "data": fingerprint,
               "start": None if start is None else digest(list(start))}
        if anchors:
            key["anchors"] = digest([dict(a) for a in anchors])
        self.checkpoint = Checkpoint(checkpoint, key)
        self.ties = tie_matrix(table.units, config.tie)
        if start is not None and len(start) != len(table.units):
            raise InputError(f"a warm start needs one coefficient per unit ({len(table.units)}), got {len(start)}")
        self.start = None if start is None else self.search_vector(np.asarray(start, dtype=float))
        solve(table, target, buckets=config.buckets)  # fail fast (InfeasibleTarget) before any evaluation
        self.anchors = [self.search_vector(fit_coefficients(table, target, a, config.buckets)) for a in anchors] if start is None else []

    def unit_coefficients(self, x: np.ndarray) -> np.ndarray:
        """Per-unit coefficients of the search vector ``x`` (the product of a unit's group coefficients when tied)."""
        return x if self.ties is None else np.exp(self.ties @ np.log(np.maximum(x, 1e-12)))

    def search_vector(self, coefficients: np.ndarray) -> np.ndarray:
        """The search vector whose `unit_coefficients` are ``coefficients`` (exactly, for coefficients a search
        with the same tie produced; else the nearest in log space)."""
        if self.ties is None:
            return coefficients
        logs = np.linalg.lstsq(self.ties, np.log(np.maximum(coefficients, 1e-12)), rcond=None)[0]
        return np.exp(logs)

    def profile_for(self, x: np.ndarray) -> dict[str, str]:
        return solve(self.table, self.target, scaled_errors(self.table, self.unit_coefficients(x)), self.config.buckets).profile

    def run(self) -> Profile:
        cfg, fid, full = self.config, self.objective, self.objective.batches
        units = len(self.table.units) if self.ties is None else self.ties.shape[1]  # free directions
        rng = np.random.default_rng(cfg.seed)
        starts = np.vstack([*self.anchors, rng.random((cfg.random_starts, units))])
        loaded = self.checkpoint.load()
        state = loaded or {
            "phase": "random", "k": max(1, round(cfg.step_fraction * units)), "tries": 0, "best": None, "best_loss": math.inf,
            "evaluations": 0, "batch_evaluations": 0, "full_evaluations": 0, "trace": [], "elapsed": 0.0, "finalists": [],
        }
        if "rng" in state:
            rng.bit_generator.state = state["rng"]
        fid.keep_log(self.checkpoint.log, fresh=loaded is None)
        fid.evaluations, fid.batch_evaluations, fid.full_evaluations = state["evaluations"], state["batch_evaluations"], state["full_evaluations"]
        best = None if state["best"] is None else np.array(state["best"])
        clock = Clock(self.budget, state["elapsed"])
        finalists = Finalists(state["finalists"])
        bar = progress_bar(desc="spdy search", unit="cand", disable=not self.progress, leave=False)

        def save(**changes) -> None:
            state.update(changes, evaluations=fid.evaluations, batch_evaluations=fid.batch_evaluations, full_evaluations=fid.full_evaluations,
                         best=None if best is None else best.tolist(), elapsed=clock.elapsed)
            self.checkpoint.save(state)

        def score(profile: Mapping[str, str], batches: int) -> float:
            """Mean loss on the first ``batches`` batches; checkpointed when it cost an evaluation."""
            paid = fid.batch_evaluations
            loss = fid.mean(profile, batches)
            if fid.batch_evaluations != paid:
                save()
                bar.set_postfix(evals=fid.evaluations, batches=fid.batch_evaluations, best=f"{state['best_loss']:.5g}",
                                k=state["k"] if state["phase"] == "local" else "-", refresh=False)
                bar.update(1)
            return loss

        def improve(candidate: np.ndarray, loss: float) -> None:
            nonlocal best
            best = candidate
            state["best_loss"] = loss
            state["trace"].append({"evaluations": fid.evaluations, "batch_evaluations": fid.batch_evaluations, "loss": loss,
                                   "phase": state["phase"], "k": state["k"], "elapsed": round(clock.elapsed, 3)})

        if state["phase"] == "random" and self.start is not None:
            state["phase"] = "start"
            profile = self.profile_for(self.start)
            loss = score(profile, full)
            finalists.offer(profile, loss, coefficients=self.unit_coefficients(self.start).tolist())
            improve(self.start, loss)
            state.update(phase="local", tries=0, rng=rng.bit_generator.state)
        if state["phase"] == "random":
            # successive halving: every start on the lowest fidelity, the better half on the next, ... the last on all
            profiles = [self.profile_for(c) for c in starts]
            if self.budget is not None and "pass_seconds" not in state:
                save(pass_seconds=self._pass_seconds(profiles, score, clock))
            state["starts"] = self._affordable_starts(state.get("pass_seconds"))  # a resumed search's own budget decides
            alive = list(range(state["starts"]))
            for b in self.ladder:
                for chunk in range(0, len(alive) if self.pool is not None else 0, self._width * 4):
                    if clock.out():
                        break
                    fid.prefetch([profiles[i] for i in alive[chunk:chunk + self._width * 4]], b, self.pool)
                    save()
                scored = []
                for i in alive:
                    if clock.out():
                        break
                    score(profiles[i], b)
                    scored.append(i)
                alive = sorted(scored, key=lambda i: fid.mean(profiles[i], b)) + alive[len(scored):]
                if clock.out():
                    break
                if b < full:
                    alive = alive[:max(1, math.ceil(len(alive) / 2))]
            complete = [i for i in range(len(starts)) if fid.known(profiles[i]) >= full]
            if not complete:  # the budget ran out before any full evaluation: finish the leader
                complete = alive[:1]
                score(profiles[complete[0]], full)
            for i in complete:  # in draw order, so the trace shows the incumbent improving
                loss = fid.mean(profiles[i], full)
                finalists.offer(profiles[i], loss, coefficients=self.unit_coefficients(starts[i]).tolist())
                if loss < state["best_loss"] or best is None:
                    improve(starts[i], loss)
            state.update(phase="local", tries=0, rng=rng.bit_generator.state)
        incumbent = self.profile_for(best)
        save()
        parallel = self.pool is not None and self.objective.incremental
        while state["k"] >= 1 and not clock.out():
            ahead: Speculation | None = None  # the next tries of this k, scored on the pool as they are drawn
            while state["tries"] < cfg.tries and not clock.out():
                if ahead is None and parallel:
                    ahead = Speculation(self, rng, best, state["k"], incumbent, cfg.tries - state["tries"])
                candidate = self._draw(rng, best, state["k"])
                if ahead is not None:  # replayed in order: losses recorded as the serial search would compute them
                    profile, start, losses = ahead.next()
                    fid.add(profile, start, losses)
                else:
                    profile = self.profile_for(candidate)
                won = self._challenge(profile, incumbent, score)
                if fid.known(profile) >= full:
                    finalists.offer(profile, fid.mean(profile), coefficients=self.unit_coefficients(candidate).tolist())
                if won:
                    improve(candidate, fid.mean(profile))
                    incumbent, state["tries"] = profile, 0
                    if ahead is not None:  # drawn against the old incumbent
                        self.abandoned += ahead.close()
                        ahead = None
                else:
                    state["tries"] += 1
                state["rng"] = rng.bit_generator.state
                save()
            if ahead is not None:
                self.abandoned += ahead.close()
            if state["tries"] >= cfg.tries:
                save(k=state["k"] - 1, tries=0)
        bar.close()
        if not math.isfinite(state["best_loss"]):
            raise RuntimeError("every candidate's loss was NaN or inf: the pruned models are broken (check the database and the loss)")
        coefficients = self.unit_coefficients(best)
        solution = solve(self.table, self.target, scaled_errors(self.table, coefficients), cfg.buckets)
        return Profile(
            options=solution.profile, target=self.target, predicted_time=solution.predicted_time,
            predicted_speedup=solution.predicted_speedup, method="spdy", calibration_loss=state["best_loss"],
            evaluations=fid.evaluations, trace=state["trace"],
            meta={"coefficients": coefficients.tolist(), "config": asdict(cfg), "seconds": round(clock.elapsed, 2),
                  "batch_evaluations": fid.batch_evaluations, "batches": full, "fidelities": self.ladder,
                  "full_evaluations": fid.full_evaluations, "budget": self.budget, "finalists": finalists.entries,
                  "starts": state.get("starts"),
                  "stopped_by_budget": clock.out() and state["k"] >= 1,
                  **({"pool": {"width": self._width, "abandoned_tries": self.abandoned}} if self.pool is not None else {})},
        )

    def _pass_seconds(self, probes: Sequence[Mapping[str, str]], score: Callable[[Mapping[str, str], int], float],
                      clock: Clock) -> float | None:
        """Seconds a batch pass costs: the cheaper of the first two starts' lowest fidelity (past any warm-up)."""
        costs = []
        for profile in probes[:2]:
            before, passes = clock.elapsed, self.objective.batch_evaluations
            score(profile, self.ladder[0])
            if self.objective.batch_evaluations > passes:
                costs.append((clock.elapsed - before) / (self.objective.batch_evaluations - passes))
        return min(costs) if costs else None  # None: resumed with the probes scored and their cost not kept

    def _affordable_starts(self, pass_seconds: float | None) -> int:
        """How many starts (anchors first) the successive halving may take: all without a budget; with one, as many
        as ``RANDOM_SHARE`` of it pays for, so that a slow model's search (SmolLM2: 2.5 s a batch pass) keeps time
        to improve on its best start."""
        total = len(self.anchors) + self.config.random_starts
        if self.budget is None or pass_seconds is None:
            return total
        per_pass = pass_seconds / self._width
        affordable = max(n for n in range(1, total + 1) if n == 1 or halving_passes(n, self.ladder) * per_pass <= RANDOM_SHARE * self.budget)
        return max(affordable, min(total, len(self.anchors) + MIN_RANDOM_STARTS))

    @property
    def _width(self) -> int:
        return 1 if self.pool is None else max(1, self.pool.width)

    def _draw(self, rng: np.random.Generator, best: np.ndarray, k: int) -> np.ndarray:
        """A local-search candidate: ``best`` with ``k`` random coordinates redrawn (the draws do not depend on ``best``'s values)."""
        candidate = best.copy()
        picked = rng.choice(len(best), size=min(k, len(best)), replace=False)
        candidate[picked] = rng.random(len(picked))
        return candidate

    def _challenge(self, profile: Mapping[str, str], incumbent: Mapping[str, str], score: Callable[[Mapping[str, str], int], float]) -> bool:
        """Does ``profile`` beat the incumbent on all batches? (`challenge`)"""
        fid = self.objective
        return challenge(self.ladder, fid.batches, self.config.abandon_margin, lambda b: score(profile, b), lambda b: fid.mean(incumbent, b))


RANDOM_SHARE = 0.5  # of a budget, at most, for the random starts; the rest is the local search's
MIN_RANDOM_STARTS = 4  # random vectors drawn beside the anchors however short the budget


def halving_passes(starts: int, ladder: Sequence[int]) -> int:
    """Batch passes successive halving spends on ``starts`` candidates (each fidelity adds the batches it lacks)."""
    passes, alive, done = 0, starts, 0
    for b in ladder:
        passes += alive * (b - done)
        alive, done = max(1, math.ceil(alive / 2)), b
    return passes


def fit_coefficients(table: TimingTable, target: float, profile: Mapping[str, str], buckets: int = DEFAULT_BUCKETS,
                     rounds: int = 120) -> np.ndarray:
    """Per-unit coefficients (max 1) whose DP profile at ``target`` is as close as found to ``profile``.

    A coefficient is raised while its unit comes out sparser than in ``profile`` and lowered while it comes out
    denser, in steps that shrink; the closest solution (mean option-index distance) wins. Exact only where the
    table's time steps allow it: a profile with spare speed (a grid that overshoots) is approached, not matched.
    """
    options = [table.options(u) for u in table.units]
    wanted = np.array([keys.index(profile[u]) for u, keys in zip(table.units, options)])
    sizes = np.array([len(keys) for keys in options])
    logs, best, closest = np.zeros(len(wanted)), np.ones(len(wanted)), math.inf
    for r in range(rounds):
        coefficients = np.exp(logs - logs.max())
        solution = solve(table, target, scaled_errors(table, coefficients), buckets).profile
        got = np.array([keys.index(solution[u]) for u, keys in zip(table.units, options)])
        distance = float(np.mean(np.abs(got - wanted) / sizes))
        if distance < closest:
            best, closest = coefficients, distance
        if distance == 0:
            break
        logs += 2.0 * 0.97 ** r * (got - wanted) / sizes
    return best


def challenge(ladder: Sequence[int], batches: int, margin: float, score: Callable[[int], float], reference: Callable[[int], float]) -> bool:
    """Does a candidate (mean loss ``score(b)`` on the first ``b`` batches) beat the incumbent (``reference(b)``) on all
    ``batches``? Abandoned at the first prefix of the ``ladder`` on which it is clearly worse (same batches for both)."""
    for b in ladder:
        loss, ref = score(b), reference(b)
        if b == batches:
            return loss < ref
        allowed = margin * math.sqrt((batches - b) / b)
        if not math.isfinite(loss) or loss > ref * (1 + allowed):
            return False
    return False


class Speculation:
    """The local search's next tries (drawn from a copy of its generator, so in the order it will draw them), each
    `challenge`d against the incumbent on the pool as soon as an evaluator is free (`Pool.imap`); `next` hands them
    back in order: (profile, losses known before, losses computed)."""

    def __init__(self, search: SpdySearch, rng: np.random.Generator, best: np.ndarray, k: int, incumbent: Mapping[str, str], tries: int):
        fid, draws = search.objective, copy.deepcopy(rng)
        reference = list(fid.memo.get(tuple(incumbent.values()), []))
        self.sent: list[tuple[dict[str, str], int]] = []
        self.taken = 0

        def items() -> Iterator[tuple]:
            for _ in range(tries):
                profile = search.profile_for(search._draw(draws, best, k))
                known = list(fid.memo.get(tuple(profile.values()), []))
                self.sent.append((profile, len(known)))
                yield profile, known, incumbent, reference, search.ladder, search.config.abandon_margin

        self.results = search.pool.imap(challenge_losses, items())

    def next(self) -> tuple[dict[str, str], int, list[float]]:
        losses = next(self.results)
        profile, known = self.sent[self.taken]
        self.taken += 1
        return profile, known, losses

    def close(self) -> int:
        """Stop; the number of tries sent that were never taken."""
        self.results.close()
        return len(self.sent) - self.taken


def challenge_losses(evaluator: Evaluator, item: tuple) -> list[float]:
    """What a `Pool` runs for a local-search try: `challenge` a candidate against the incumbent on this evaluator
    and return the candidate's losses on the batches it needed beyond those ``known`` already."""
    profile, known, incumbent, reference, ladder, margin = item
    fid = MultiFidelity(evaluator)
    fid.memo[tuple(incumbent.values())] = list(reference)
    fid.memo[tuple(profile.values())] = list(known)
    challenge(ladder, fid.batches, margin, lambda b: fid.mean(profile, b), lambda b: fid.mean(incumbent, b))
    return fid.memo[tuple(profile.values())][len(known):]
