"""Robust wall-clock timing on a shared, noisy machine.

Single numbers lie here (the same layer moves ~30% between runs), so every comparison
alternates the contenders round by round, so that a slow period hits all of them alike,
and reports medians with their spread (interquartile range / median).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

# Calls this short are repeated inside one sample so the clock's resolution does not matter.
MIN_SAMPLE_S = 1e-3


@dataclass
class Stat:
    """The median of a set of timings (seconds per call) and their relative spread."""

    median: float
    spread: float
    samples: int

    @classmethod
    def of(cls, samples: list[float]) -> "Stat":
        med = statistics.median(samples)
        if len(samples) >= 4:
            q = statistics.quantiles(samples, n=4)
            spread = (q[2] - q[0]) / med if med > 0 else 0.0
        else:
            spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
        return cls(med, spread, len(samples))


def _timed(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_alternating(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Per-call times of each function over ``rounds``, calling all of them in every round.

    The order rotates each round so no contender always runs first (cache, turbo and
    scheduler effects follow the order).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    number = {}
    for name in names:
        fn = fns[name]
        for _ in range(max(warmup, 1)):
            first = _timed(fn, 1)
        number[name] = max(1, math.ceil(MIN_SAMPLE_S / max(first, 1e-9)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_timed(fns[name], number[name]))
    return samples


def alternating_stats(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2, max_spread: float = 0.15, retries: int = 2) -> dict[str, Stat]:
    """Alternating medians; while any spread exceeds ``max_spread``, add ``rounds`` more rounds.

    Extra rounds are pooled with the earlier ones (at most ``retries`` times), so a burst
    of noise is outvoted rather than discarded by hand.
    """
    samples = time_alternating(fns, rounds, warmup)
    for _ in range(retries):
        if all(Stat.of(s).spread <= max_spread for s in samples.values()):
            break
        for name, more in time_alternating(fns, rounds, warmup=1).items():
            samples[name].extend(more)
    return {name: Stat.of(s) for name, s in samples.items()}


_CLOCKS = (time.monotonic(), time.process_time())


def _own_load() -> float:
    """This process's average busy cores since the module loaded: its share of the load average."""
    wall, cpu = time.monotonic() - _CLOCKS[0], time.process_time() - _CLOCKS[1]
    return cpu / wall if wall > 1.0 else 0.0


def oversubscribed(threads: int) -> str | None:
    """A warning when other processes already keep every core busy and we want several.

    Then each multi-threaded op waits for a descheduled worker: on a 2-core machine at load
    10 a 384x384 matmul took 40 ms with 2 threads and 10 ms with 1, a LayerNorm 20 ms vs
    0.2 ms, so such timings measure the scheduler, not the layer.
    """
    if threads <= 1 or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    others = load - _own_load()  # a long job's own threads raise the load average too
    if others < cores:
        return None
    return (
        f"the machine is oversubscribed (load average {load:.1f} on {cores} cores, {others:.1f} of it other processes): "
        f"timings with {threads} threads "
        f"will mostly measure scheduling delays; use threads=1 or a quieter machine"
    )
