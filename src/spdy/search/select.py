"""Choosing a search's final profile on validation data, not on the data it was fitted to.

A search ranks candidates on the calibration batches, and past some point it only fits them:
the best calibration loss is not the best model. The searches keep their few best fully
scored profiles (`Finalists`); `pick_on_validation` scores those on validation batches
(drawn like the calibration data, disjoint from it, never the held-out set) and keeps the
best there, recording every finalist's two losses so an overfit search shows.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Mapping

from spdy.search.profile import Profile
from spdy.timing.table import TimingTable

FINALISTS = 8
VALIDATION = 32  # validation samples spdy run draws by default


class Finalists:
    """The ``size`` best distinct fully scored profiles, as a JSON-ready list kept in a search's state."""

    def __init__(self, entries: list[dict], size: int = FINALISTS):
        self.entries, self.size = entries, size

    def offer(self, options: Mapping[str, str], loss: float, **extra: Any) -> None:
        if not math.isfinite(loss) or any(e["options"] == dict(options) for e in self.entries):
            return
        self.entries.append({"options": dict(options), "loss": loss, **extra})
        self.entries.sort(key=lambda e: e["loss"])
        del self.entries[self.size:]


def pick_on_validation(profile: Profile, table: TimingTable, validation: Callable[[Mapping[str, str]], float]) -> Profile:
    """The finalist of ``profile.meta["finalists"]`` with the least validation loss (ties: the better
    calibration loss); every finalist's losses go to ``meta["validation"]``. A profile without
    finalists (a baseline) just gets its validation loss."""
    finalists = profile.meta.get("finalists") or [{"options": profile.options, "loss": profile.calibration_loss}]
    scored = [{**f, "validation_loss": validation(f["options"])} for f in finalists]
    best = min(scored, key=lambda f: (f["validation_loss"], f["loss"]))
    predicted = table.predicted_time(best["options"])
    meta = {**profile.meta, "validation": [{"calibration_loss": f["loss"], "validation_loss": f["validation_loss"]} for f in scored],
            "picked": scored.index(best)}
    meta.pop("finalists", None)
    if "coefficients" in best:
        meta["coefficients"] = best["coefficients"]
    meta.pop("baseline", None)
    if "baseline" in best:
        meta["baseline"] = best["baseline"]
    return replace(profile, options=dict(best["options"]), calibration_loss=best["loss"], validation_loss=best["validation_loss"],
                   predicted_time=predicted, predicted_speedup=table.base / predicted, meta=meta)


def _finalists(profile: Profile) -> list[dict]:
    """A search's finalists, or the profile itself as the one finalist."""
    if profile.meta.get("finalists"):
        return [dict(f) for f in profile.meta["finalists"]]
    own = {"options": profile.options, "loss": profile.calibration_loss}
    if "coefficients" in profile.meta:
        own["coefficients"] = profile.meta["coefficients"]
    return [own]


def pooled(runs: list[Profile]) -> Profile:
    """Independent searches (e.g. seeds) as one: the best on calibration data, with every run's finalists so
    `pick_on_validation` chooses among them all. Seeds end on different profiles whose held-out losses
    spread more than their calibration losses do; validation data tells them apart, calibration data cannot."""
    if len(runs) == 1:
        return runs[0]
    best = min(runs, key=lambda p: p.calibration_loss)
    finalists = Finalists([], FINALISTS * len(runs))
    for run in runs:
        for f in _finalists(run):
            finalists.offer(f.pop("options"), f.pop("loss"), **f)
    restarts = [{"seed": run.meta.get("config", {}).get("seed"), "calibration_loss": run.calibration_loss, "evaluations": run.evaluations} for run in runs]
    return replace(best, evaluations=sum(run.evaluations for run in runs),
                   meta={**best.meta, "finalists": finalists.entries, "restarts": restarts})


def with_baselines(profile: Profile, baselines: Mapping[str, Profile], calibration: Callable[[Mapping[str, str]], float]) -> Profile:
    """A search's ``profile`` with the ``baselines``' profiles (name -> a profile meeting the same target) among its
    finalists, one taken here when it scores better on the calibration data (`pick_on_validation` then decides on
    validation data). A search short of evaluations (many units, a slow model, whole blocks as options) can miss
    profiles as good as a one-shot allocation's; the run measures those anyway, and a user should never be handed
    a worse one."""
    entries = _finalists(profile)
    finalists = Finalists(entries, max(FINALISTS, len(entries)))
    known = {tuple(f["options"].values()): f["loss"] for f in finalists.entries}  # the search's own scores are reused
    losses: dict[str, float] = {}
    scored = 0
    for name, baseline in baselines.items():
        if baseline.options != profile.options:
            key = tuple(baseline.options.values())
            if key not in known:
                known[key], scored = calibration(baseline.options), scored + 1
                finalists.offer(baseline.options, known[key], baseline=name)
            losses[name] = known[key]
    if not losses:
        return profile
    meta = {**profile.meta, "finalists": finalists.entries, "baseline_calibration_losses": losses}
    profile = replace(profile, meta=meta, evaluations=profile.evaluations + scored)
    best = min(losses, key=losses.get)
    if profile.calibration_loss is not None and losses[best] >= profile.calibration_loss:
        return profile
    chosen = baselines[best]
    return replace(profile, options=dict(chosen.options), calibration_loss=losses[best], predicted_time=chosen.predicted_time,
                   predicted_speedup=chosen.predicted_speedup, meta={**meta, "baseline": best})
