"""The timing-backend interface: one engine = one file implementing `Backend`.

A backend times units (each at a list of options) and the whole dense model; `measure`
(in :mod:`spdy.timing`) does the rest (options, checkpoints, de-duplication, progress,
``base``/``fixed``), identically for every engine.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from spdy.errors import InputError
from spdy.runtime.timer import Stat
from spdy.units import Unit


@dataclass
class UnitTiming:
    """One unit's measured options: seconds, the format that ran (if the engine has formats)
    and the relative spread (IQR / median) of the kept measurement."""

    times: dict[str, float]
    formats: dict[str, str] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    # the unit as the unpruned model runs it, when the dense option runs otherwise (e.g. in a faster format)
    unpruned: float | None = None


class Backend(ABC):
    """An inference engine whose times the solver optimises for."""

    name: ClassVar[str]

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        """Called once before any timing (pin threads, export the model, ...)."""

    def finish(self) -> None:
        """Called once after timing, even on errors: undo what `prepare` changed globally."""

    def signature(self, unit: Unit) -> str | None:
        """Units with equal non-None signatures take equal times, so one is measured for all."""
        return None

    @abstractmethod
    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        """Seconds of ``unit`` alone at its real input shape, for each option key."""

    def deployed_fixed(self, model: nn.Module, batch: Any, dense: dict[str, tuple[float, str]], base: float) -> dict | None:
        """The table's ``fixed`` measured on the model as the runtime deploys it, given each unit's dense
        option (seconds, format) and the dense model's time ``base``, with what it measured; None: ``fixed``
        is the dense model's time less the units' unpruned times."""
        return None

    def fused_blocks(self) -> dict[str, list[str]]:
        """Blocks the runtime fuses once their units are all in one format (name -> units), whose units this
        backend times as the fused block runs them; `unfused_time` prices each left dense, as torch runs it."""
        return {}

    def unfused_time(self, block: str) -> float:
        """Seconds the block of `fused_blocks` takes unpruned and unfused, on the scale of its units' times."""
        raise NotImplementedError(f"{self.name} fuses no blocks")

    @abstractmethod
    def model_time(self, model: nn.Module, batch: Any) -> Stat:
        """Seconds of the dense end-to-end model on ``batch`` (median and spread)."""

    def meta(self) -> dict:
        """How this backend measures: engine, versions, threads, machine; saved in the table."""
        return {"backend": self.name, **machine_meta()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to the platform string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_meta() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other processes' load is the main source of noise on shared machines.
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# name -> "module:Class", imported only when asked for (deepsparse is optional).
_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "torch-cpu": "spdy.timing.torch_cpu:TorchCpuBackend",
    "deepsparse": "spdy.timing.deepsparse:DeepSparseBackend",
    "cuda-2:4": "spdy.timing.cuda_semi:CudaSemiBackend",
    "torch-cpu-blocks": "spdy.timing.blocks:TorchCpuBlocksBackend",  # structured options (`spdy.blocks`)
    "deepsparse-blocks": "spdy.timing.deepsparse_blocks:DeepSparseBlocksBackend",
    "cuda-blocks": "spdy.timing.cuda_blocks:CudaBlocksBackend",
}


def register_backend(name: str, factory: str | Callable[..., Backend]) -> None:
    """Make a backend available by name: a ``"module:Class"`` path or a callable."""
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, **options: Any) -> Backend:
    """Instantiate the backend ``name`` with its options (e.g. ``threads=2``)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown timing backend {name!r}; backends are {', '.join(backend_names())}") from None
    if isinstance(factory, str):
        module_name, _, cls_name = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), cls_name)
    return factory(**options)
