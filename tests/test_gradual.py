"""Gradual pruning on real models and data (scikit-learn digits): schedule, masks, resume, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spdy.recovery.distill import DistillLoss
from spdy.recovery.gradual import GradualPruner, Recipe, cubic_sparsity
from spdy.levels import Option
from spdy.models.digits import digits_mlp
from spdy.search.profile import Profile
from spdy.recovery.train import TrainConfig, fine_tune, gradual_prune
from spdy.units import find_units
from spdy.models.digits import digits_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn():
    torch.set_num_threads(1)
    return digits_cnn(width=8, hidden=256, epochs=6)


def fresh(bundle):
    model = copy.deepcopy(bundle.model)
    return model, find_units(model)


def mixed_profile(units) -> Profile:
    """Different sparsities per unit, including dense and off-grid levels."""
    levels = [0.5, 0.7333, 0.0, 0.9, 0.6127]
    return Profile({u: Option(levels[i % len(levels)]).key for i, u in enumerate(units)})


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.9, 0.0, 0, 10) == 0.0
    assert cubic_sparsity(10, 0.9, 0.0, 0, 10) == pytest.approx(0.9)
    assert cubic_sparsity(50, 0.9, 0.0, 0, 10) == pytest.approx(0.9)
    values = [cubic_sparsity(t, 0.8, 0.2, 3, 10) for t in range(0, 15)]
    assert values[:4] == [0.2] * 4 and all(a <= b for a, b in zip(values, values[1:]))
    # fastest early: the first half of the schedule does most of the pruning
    assert cubic_sparsity(8, 0.8, 0.2, 3, 10) - 0.2 > 0.8 * 0.6
    assert cubic_sparsity(0, 0.3, 0.5) == 0.3  # initial is capped at the target


def test_final_sparsity_equals_profile_exactly(cnn):
    model, units = fresh(cnn)
    profile = mixed_profile(units)
    recipe = Recipe.from_profile(profile, total_steps=12, prune_fraction=0.6, update_every=3)
    pruner = fine_tune(model, units, recipe, cnn.calibration, cnn.calibration_labels, TrainConfig(lr=1e-3), progress=False)
    for name, sparsity in profile.sparsities.items():
        weight = units[name].module.weight
        assert int((weight == 0).sum()) == round(sparsity * weight.numel()), name
        assert int((~pruner.masks[name]).sum()) == round(sparsity * weight.numel()), name


@pytest.mark.parametrize("criterion", ["magnitude", "obs"])
def test_masks_never_regrow_and_adam_state_is_reset(cnn, criterion):
    model, units = fresh(cnn)
    recipe = Recipe({u: 0.8 for u in units}, total_steps=10, steps=6, update_every=2, criterion=criterion)
    teacher = copy.deepcopy(model)
    pruner = GradualPruner(units, recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = DistillLoss(model, teacher, list(units), "kl", layer=1.0)
    pruned_before = {u: torch.zeros_like(m) for u, m in pruner.masks.items()}
    seen_growth = False
    for step in range(recipe.total_steps):
        changed = pruner.update(step, optimizer)
        for u, mask in pruner.masks.items():
            assert not (pruned_before[u] & mask).any(), f"unit {u} regrew at step {step}"
            seen_growth |= bool((~mask & ~pruned_before[u]).any())
            pruned_before[u] = ~mask
            if changed:
                for value in optimizer.state.get(units[u].module.weight, {}).values():
                    if value.shape == mask.shape:
                        assert (value[~mask] == 0).all(), f"stale optimizer state for pruned weights of {u}"
        i = step % len(cnn.calibration)
        optimizer.zero_grad()
        loss_fn(cnn.calibration[i], cnn.calibration_labels[i]).backward()
        for u in units:
            assert (units[u].module.weight.grad[~pruner.masks[u]] == 0).all(), f"gradient reaches pruned weights of {u}"
        optimizer.step()
        pruner.enforce()
        for u in units:
            assert (units[u].module.weight[~pruner.masks[u]] == 0).all()
    assert seen_growth
    loss_fn.remove()
    pruner.remove()


def test_resume_is_bit_exact(cnn, tmp_path):
    recipe = Recipe({u: 0.75 for u in find_units(cnn.model)}, total_steps=14, steps=8, update_every=2, criterion="obs")
    config = TrainConfig(lr=1e-3, layer=0.5, checkpoint_every=4)

    whole, whole_units = fresh(cnn)
    fine_tune(whole, whole_units, recipe, cnn.calibration, cnn.calibration_labels, config, tmp_path / "whole", progress=False)

    first, first_units = fresh(cnn)
    fine_tune(first, first_units, recipe, cnn.calibration, cnn.calibration_labels, config, tmp_path / "cut", until=6, progress=False)
    assert json.loads((tmp_path / "cut" / "progress.json").read_text())["step"] == 6
    resumed, resumed_units = fresh(cnn)  # a new process: dense weights, state from the work dir
    fine_tune(resumed, resumed_units, recipe, cnn.calibration, cnn.calibration_labels, config, tmp_path / "cut",
              teacher=copy.deepcopy(cnn.model), progress=False)

    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_refuses_another_recipe(cnn, tmp_path):
    model, units = fresh(cnn)
    recipe = Recipe({u: 0.5 for u in units}, total_steps=4, steps=2)
    fine_tune(model, units, recipe, cnn.calibration, cnn.calibration_labels, work_dir=tmp_path, until=2, progress=False)
    other = Recipe({u: 0.6 for u in units}, total_steps=4, steps=2)
    with pytest.raises(ValueError, match="another recipe"):
        fine_tune(model, units, other, cnn.calibration, cnn.calibration_labels, work_dir=tmp_path, progress=False)


def test_fine_tuning_recovers_one_shot_pruned_cnn(cnn):
    bundle = copy.copy(cnn)
    bundle.model, units = fresh(cnn)
    recipe = Recipe({u: 0.8 for u in units}, total_steps=40, steps=1, initial=0.8)  # one-shot at step 0, then recovery
    result = gradual_prune(bundle, units, recipe, TrainConfig(lr=1e-3), progress=False)
    assert result["heldout_after"] < 0.7 * result["heldout_before"]
    assert result["accuracy_after"] > result["accuracy_before"]
    assert result["sparsity"] == {u: round(0.8 * units[u].module.weight.numel()) / units[u].module.weight.numel() for u in units}


def test_recipe_round_trip_and_errors(tmp_path):
    recipe = Recipe({"a": 0.5, "b": 0.9}, total_steps=20, steps=10, start=2, initial=0.1, update_every=4, training={"lr": 0.01})
    recipe.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == recipe
    with pytest.raises(ValueError, match="unit 'a'"):
        Recipe({"a": 1.5}, total_steps=20, steps=10)
    with pytest.raises(ValueError, match="before"):
        Recipe({"a": 0.5}, total_steps=10, steps=10)
    (tmp_path / "bad.json").write_text('{"targets": {}}')
    with pytest.raises(ValueError, match="not a gradual recipe"):
        Recipe.load(tmp_path / "bad.json")


def test_cli_contract(tmp_path, capsys):
    from spdy.cli import main

    units = find_units(digits_mlp(epochs=1).model)  # the names only: the CLI trains its own
    profile = {"profile": {u: s for u, s in zip(units, [0.6, 0.8, 0.0])}}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    work = tmp_path / "work"
    args = ["gradual", "digits", "--profile", str(tmp_path / "p.json"), "--steps", "6", "--update-every", "2", "--lr", "1e-3",
            "--distill", "kl", "--work-dir", str(work), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"heldout_before", "heldout_after", "sparsity"} <= set(out)
    assert out["sparsity"] == pytest.approx(profile["profile"], abs=1e-4)
    assert main(["gradual", "digits", "--recipe", str(work / "recipe.json"), "--work-dir", str(work), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["heldout_after"] == out["heldout_after"]
    assert main(["gradual", "digits", "--steps", "5", "--work-dir", str(work)]) == 2
    assert "exactly one of --profile, --recipe, --sparsity" in capsys.readouterr().err
