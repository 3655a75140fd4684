"""Search, evolution and baselines on a real small model: an MLP trained on scikit-learn digits,
a timing table measured on this machine, and an OBS database built from its calibration data."""

import json
import math

import pytest
import torch

from spdy.search import baselines
from spdy.database import Stitcher, build_database
from spdy.search.evaluate import Evaluator
from spdy.search.evolution import EvoConfig, EvolutionSearch
from spdy.levels import options_for
from spdy.models.digits import digits_mlp
from spdy.search.spdy import SpdyConfig, SpdySearch
from spdy.timing import measure
from spdy.units import find_units, weight_matrix

LEVELS = [0.5, 0.7, 0.8, 0.9, 0.95]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    bundle = digits_mlp(hidden=384, depth=5)
    units = find_units(bundle.model)
    table = measure(bundle.model, units, bundle.calibration[0], levels=LEVELS, progress=False)
    db = build_database(bundle.model, units, bundle.calibration, options_for("unstructured", LEVELS),
                        tmp_path_factory.mktemp("db"), pruner="obs", progress=False)
    stitcher = Stitcher(units, db)
    evaluator = Evaluator(bundle.model, bundle.calibration, "kl", apply=stitcher.apply)
    # a target this table can reach, whatever this machine measured
    target = 1 + 0.5 * (table.max_speedup() - 1)
    yield bundle, units, table, db, evaluator, target
    stitcher.restore()


SMALL = SpdyConfig(random_starts=6, tries=4, seed=3)


def test_spdy_is_deterministic_per_seed(setup):
    _, _, table, _, evaluator, target = setup
    a = SpdySearch(table, target, evaluator, SMALL, progress=False).run()
    b = SpdySearch(table, target, evaluator, SMALL, progress=False).run()
    assert a.options == b.options and a.calibration_loss == b.calibration_loss
    assert [t["loss"] for t in a.trace] == [t["loss"] for t in b.trace]
    assert a.meta["coefficients"] == b.meta["coefficients"]
    assert a.predicted_speedup >= target


class Interrupt(Exception):
    pass


def test_spdy_resume_after_interruption_gives_the_same_result(setup, tmp_path):
    _, _, table, _, evaluator, target = setup
    reference = SpdySearch(table, target, evaluator, SMALL, progress=False).run()
    assert reference.evaluations >= 2
    calls = {"n": 0}

    def dying(profile):
        calls["n"] += 1
        if calls["n"] == reference.evaluations // 2 + 1:
            raise Interrupt
        return evaluator(profile)

    path = tmp_path / "search.json"
    with pytest.raises(Interrupt):
        SpdySearch(table, target, dying, SMALL, checkpoint=path, progress=False).run()
    assert json.loads(path.read_text())["evaluations"] >= 1
    resumed = SpdySearch(table, target, evaluator, SMALL, checkpoint=path, progress=False).run()
    assert resumed.options == reference.options
    assert resumed.calibration_loss == reference.calibration_loss
    # a checkpoint written for another target is refused, not silently reused
    with pytest.raises(ValueError, match="other inputs"):
        SpdySearch(table, target * 0.99, evaluator, SMALL, checkpoint=path, progress=False).run()


def test_nan_loss_never_becomes_best(setup):
    _, _, table, _, evaluator, target = setup
    calls = {"n": 0}

    def flaky(profile):
        calls["n"] += 1
        return math.nan if calls["n"] % 2 else evaluator(profile)

    result = SpdySearch(table, target, flaky, SMALL, progress=False).run()
    assert math.isfinite(result.calibration_loss)
    assert result.calibration_loss == evaluator(result.options)


def test_evaluator_marks_nonfinite_losses_failed(setup):
    bundle, _, _, _, _, _ = setup
    broken = Evaluator(bundle.model, bundle.calibration[:1], lambda out, dense, batch: torch.tensor(float("nan")), apply=lambda p: None)
    with pytest.warns(RuntimeWarning, match="failed"):
        assert broken({}) == math.inf


def test_every_method_meets_the_target(setup):
    bundle, units, table, db, evaluator, target = setup
    weights = {u: weight_matrix(units[u]) for u in table.units}
    norms = {u: torch.ones(units[u].weight_shape[1]) for u in table.units}
    squared = {u: {k: e ** 2 for k, e in errs.items()} for u, errs in db.relative_errors().items()}
    profiles = [
        baselines.uniform(table, target),
        baselines.global_magnitude(table, target, weights),
        baselines.dp_errors(table, target, squared),
        baselines.owl(table, target, weights, norms),
        SpdySearch(table, target, evaluator, SMALL, progress=False).run(),
        EvolutionSearch(table, target, evaluator, len(bundle.calibration), EvoConfig(generations=3, offspring=4, seed=1), progress=False).run(),
    ]
    for p in profiles:
        assert table.predicted_time(p.options) <= table.base / target, p.method
        assert p.predicted_speedup >= target


def test_spdy_beats_uniform(setup):
    """Learning how sensitive each layer is pays: SPDY's profile loses less than one sparsity for all."""
    _, _, table, _, evaluator, target = setup
    uniform = baselines.uniform(table, target)
    spdy = SpdySearch(table, target, evaluator, SpdyConfig(random_starts=10, tries=5, seed=0), progress=False).run()
    assert spdy.calibration_loss < evaluator(uniform.options)
    assert spdy.calibration_loss == evaluator(spdy.options)


def test_local_search_improves_on_the_random_starts(setup):
    """The local phase finds a better profile than the best of the random coefficient vectors."""
    _, _, table, _, evaluator, target = setup
    result = SpdySearch(table, target, evaluator, SpdyConfig(random_starts=4, tries=10, seed=0), progress=False).run()
    best_random = min(t["loss"] for t in result.trace if t["phase"] == "random")
    assert any(t["phase"] == "local" for t in result.trace)
    assert result.calibration_loss < best_random


def test_evolution_is_deterministic_and_resumes(setup, tmp_path):
    bundle, _, table, _, evaluator, target = setup
    cfg = EvoConfig(generations=4, offspring=4, seed=2)
    n = len(bundle.calibration)
    a = EvolutionSearch(table, target, evaluator, n, cfg, progress=False).run()
    calls = {"n": 0}

    def dying(profile, limit):
        calls["n"] += 1
        if calls["n"] == 12:
            raise Interrupt
        return evaluator(profile, limit)

    path = tmp_path / "evo.json"
    with pytest.raises(Interrupt):
        EvolutionSearch(table, target, dying, n, cfg, checkpoint=path, progress=False).run()
    b = EvolutionSearch(table, target, evaluator, n, cfg, checkpoint=path, progress=False).run()
    assert a.options == b.options and a.calibration_loss == b.calibration_loss
