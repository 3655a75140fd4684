"""`Profile`: the option chosen for every unit, with what we predicted and measured for it.

Saved as JSON. ``profile`` maps unit -> sparsity (a float, the contract scripts read);
``options`` keeps the exact option keys (pattern included) the tools use.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from spdy.errors import InputError
from spdy.levels import Option
from spdy.files import read_json, write_json

FORMAT = "spdy.search.profile/1"
METHODS = ("spdy", "evo", "uniform", "global-magnitude", "dp-errors", "owl")
ANCHORS = ("uniform", "global-magnitude", "dp-errors")  # one-shot allocations SPDY also starts from by default
ANCHOR_CHOICES = METHODS[2:]  # every one-shot allocation (OWL's needs a pass over the data, so it is asked for)


@dataclass
class Profile:
    options: dict[str, str]
    target: float | None = None
    predicted_time: float | None = None
    predicted_speedup: float | None = None
    method: str = "dp"
    calibration_loss: float | None = None
    heldout_loss: float | None = None
    validation_loss: float | None = None
    evaluations: int = 0
    trace: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Spellings of one option ("0.9", "0.90", "0.9000") become its one canonical key, so tools that
        look keys up in tables and databases find them; anything else is refused, naming the unit."""
        options = {}
        for unit, key in self.options.items():
            try:
                options[unit] = Option.parse(key).key
            except InputError as e:
                raise InputError(f"unit {unit!r}: {e}") from None
        self.options = options

    @property
    def sparsities(self) -> dict[str, float]:
        return {u: Option.parse(k).sparsity for u, k in self.options.items()}

    def to_dict(self) -> dict:
        data = asdict(self)
        data = {"format": FORMAT, "profile": self.sparsities, **data}
        return data

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: str = "<profile>") -> "Profile":
        """Accept our format, or any object with ``profile`` (unit -> sparsity) like `spdy solve --json`."""
        if not isinstance(data, dict) or not isinstance(data.get("profile", data.get("options")), dict):
            raise InputError(f"{source}: expected a JSON object with 'profile' (unit -> sparsity) or 'options' (unit -> option key)")
        if isinstance(data.get("options"), dict):
            options = {u: str(k) for u, k in data["options"].items()}
        else:
            options = {}
            for unit, sparsity in data["profile"].items():
                if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
                    raise InputError(f"{source}: unit {unit!r}: sparsity must be a number in [0, 1), got {sparsity!r}")
                options[unit] = Option(float(sparsity)).key
        known = {f for f in cls.__dataclass_fields__ if f != "options"}
        try:
            return cls(options=options, **{k: v for k, v in data.items() if k in known})
        except ValueError as e:
            raise InputError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        return cls.from_dict(read_json(path, "profile"), str(path))
