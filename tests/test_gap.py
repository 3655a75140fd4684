"""gAP and the N:M pipeline on the real digits MLP: masks kept, held-out loss lowered, exact resume, CLI contract."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spdy.cli import main
from spdy.database import Stitcher, build_database
from spdy.recovery.gap import GlobalAdaPrune
from spdy.levels import options_for
from spdy.models.digits import digits_mlp
from spdy.recovery.nm import HeldOut, nm_pattern_kept, prune_nm
from spdy.units import find_units


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_mlp()


@pytest.fixture(scope="module")
def magnitude_db(digits, tmp_path_factory):
    units = find_units(digits.model)
    return build_database(digits.model, units, digits.calibration, options_for("2:4"), tmp_path_factory.mktemp("db"), pruner="magnitude", progress=False)


def pruned(digits, db):
    """A fresh copy of the digits bundle with every Linear at 2:4 magnitude; and its units."""
    bundle = copy.deepcopy(digits)
    units = find_units(bundle.model)
    Stitcher(units, db).apply({name: "2:4@0.5000" for name in units})
    return bundle, units


def exactly_2_of_4(units) -> bool:
    return all(bool(((u.module.weight.reshape(u.module.weight.shape[0], -1, 4) == 0).sum(-1) == 2).all()) for u in units.values())


def test_gap_keeps_2_4_masks_and_lowers_heldout_loss(digits, magnitude_db):
    bundle, units = pruned(digits, magnitude_db)
    masks = {n: u.module.weight.detach() == 0 for n, u in units.items()}
    assert exactly_2_of_4(units)
    heldout = HeldOut(bundle, digits.model)
    before = heldout(bundle.model, "before")["heldout_before"]
    gap = GlobalAdaPrune(epochs=5, lr=1e-4, progress=False).fit(bundle.model, digits.model, bundle.calibration, units)
    after = heldout(bundle.model, "after")["heldout_after"]
    assert exactly_2_of_4(units)
    for n, u in units.items():
        assert torch.equal(u.module.weight.detach() == 0, masks[n]), n
    assert gap.steps_ == 5 * 40 and len(gap.losses_) == 5
    assert gap.losses_[-1] < gap.losses_[0]
    assert after < before - 0.01, (before, after)


def test_resume_after_interruption_gives_the_same_weights(digits, magnitude_db, tmp_path):
    reference, units = pruned(digits, magnitude_db)
    GlobalAdaPrune(epochs=2, lr=1e-4, progress=False).fit(reference.model, digits.model, reference.calibration, units)

    class Killed(Exception):
        pass

    def kill_at_step_45(step: int, loss: float) -> None:
        if step == 45:
            raise Killed

    config = dict(epochs=2, lr=1e-4, checkpoint_every=10, checkpoint_dir=tmp_path, progress=False)
    interrupted, units = pruned(digits, magnitude_db)
    with pytest.raises(Killed):
        GlobalAdaPrune(**config).fit(interrupted.model, digits.model, interrupted.calibration, units, on_step=kill_at_step_45)
    assert json.loads((tmp_path / "gap-state.json").read_text())["counters"]["step"] == 40
    resumed, units = pruned(digits, magnitude_db)  # a new process starts from the pruned model again
    gap = GlobalAdaPrune(**config).fit(resumed.model, digits.model, resumed.calibration, units)
    assert gap.steps_ == 80
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_checkpoint_of_another_fit_is_refused(digits, magnitude_db, tmp_path):
    bundle, units = pruned(digits, magnitude_db)
    GlobalAdaPrune(epochs=1, lr=1e-4, checkpoint_dir=tmp_path, progress=False).fit(bundle.model, digits.model, bundle.calibration, units)
    other, units = pruned(digits, magnitude_db)
    with pytest.raises(ValueError, match="different lr"):
        GlobalAdaPrune(epochs=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False).fit(other.model, digits.model, other.calibration, units)


def test_prune_nm_obs_without_gap_keeps_the_pattern(digits, tmp_path):
    bundle = copy.deepcopy(digits)
    units = find_units(bundle.model)
    result = prune_nm(bundle, units, "2:4", "obs", gap=False, work_dir=tmp_path, progress=False)
    assert result["pattern_kept"] and nm_pattern_kept(units, "2:4") and exactly_2_of_4(units)
    assert result["heldout_after_gap"] is None
    assert result["heldout_dense"] <= result["heldout_before_gap"] < 2 * result["heldout_dense"]


def test_cli_nm_digits_json_contract(tmp_path, capsys):
    code = main(["nm", "digits", "--pattern", "2:4", "--pruner", "magnitude", "--gap", "--epochs", "2", "--work-dir", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("pattern", "pruner", "samples", "heldout_before_gap", "heldout_after_gap"):
        assert key in result, key
    assert result["pattern"] == "2:4" and result["pruner"] == "magnitude" and result["samples"] == 1257
    assert result["gap"]["steps"] == 80 and result["pattern_kept"]


def test_cli_nm_rejects_a_non_nm_pattern(tmp_path, capsys):
    assert main(["nm", "digits", "--pattern", "4x1", "--work-dir", str(tmp_path)]) == 2
    assert "N:M" in capsys.readouterr().err
