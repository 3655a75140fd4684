"""Search, evolution and baselines on a real small model: an MLP trained on scikit-learn digits and
an OBS database built from its calibration data. The timing table is synthetic (time proportional to
the weights kept, plus a fixed part): these tests check the searches, and a table measured on a
loaded machine made them fail for reasons of its own."""

import json
from dataclasses import replace
import math

import pytest
import torch

from spdy.search import baselines
from spdy.database import Stitcher, build_database
from spdy.errors import InputError
from spdy.search.budget import parse_budget
from spdy.search.evaluate import Evaluator, MultiFidelity
from spdy.search.evolution import EvoConfig, EvolutionSearch
from spdy.levels import DENSE, Option, options_for
from spdy.models.digits import digits_mlp
from spdy.search.select import FINALISTS, pick_on_validation, pooled, with_baselines
from spdy.search.dp import scaled_errors, solve
from spdy.search.spdy import MIN_RANDOM_STARTS, SpdyConfig, SpdySearch, fidelities, fit_coefficients, halving_passes
from spdy.timing.table import TimingTable
from spdy.units import find_units, weight_matrix

LEVELS = [0.5, 0.7, 0.8, 0.9, 0.95]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    bundle = digits_mlp(hidden=384, depth=5)
    units = find_units(bundle.model)
    keys = [DENSE] + [o.key for o in options_for("unstructured", LEVELS)]
    # units differ in how their time falls with sparsity, so the DP has real trade-offs to make
    times = {u: {k: unit.weight_shape[0] * unit.weight_shape[1] * 1e-9 * (0.2 + 0.8 * (1 - Option.parse(k).sparsity) ** (0.5 + 0.3 * i))
                 for k in keys} for i, (u, unit) in enumerate(units.items())}
    dense = sum(t[DENSE] for t in times.values())
    table = TimingTable(times, base=1.25 * dense, fixed=0.25 * dense)
    db = build_database(bundle.model, units, bundle.calibration, options_for("unstructured", LEVELS),
                        tmp_path_factory.mktemp("db"), pruner="obs", progress=False)
    stitcher = Stitcher(units, db)
    evaluator = Evaluator(bundle.model, bundle.calibration, "kl", apply=stitcher.apply)
    # a target this table can reach, whatever this machine measured
    target = 1 + 0.5 * (table.max_speedup() - 1)
    yield bundle, units, table, db, evaluator, target
    stitcher.restore()


SMALL = SpdyConfig(random_starts=6, tries=4, seed=3)
LONGER = SpdyConfig(random_starts=8, tries=20, step_fraction=0.5, seed=3)


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


def dying_after(evaluator: Evaluator, calls: int, monkeypatch) -> None:
    """Make ``evaluator`` raise Interrupt when it puts its ``calls``-th candidate in place (a kill)."""
    apply, seen = evaluator.apply, {"n": 0}

    def dying(profile):
        seen["n"] += 1
        if seen["n"] == calls:
            raise Interrupt
        return apply(profile)

    monkeypatch.setattr(evaluator, "apply", dying)


def test_spdy_resume_after_interruption_gives_the_same_result(setup, tmp_path, monkeypatch):
    _, _, table, _, evaluator, target = setup
    before = evaluator.calls
    reference = SpdySearch(table, target, evaluator, LONGER, progress=False).run()
    calls = evaluator.calls - before
    assert reference.evaluations >= 2 and calls > 20, calls
    path = tmp_path / "search.json"
    for kill in (5, calls - 6):  # in the successive halving of the random starts, then (after the 4 paid) in the local search
        with monkeypatch.context() as m:
            dying_after(evaluator, kill, m)
            with pytest.raises(Interrupt):
                SpdySearch(table, target, evaluator, LONGER, checkpoint=path, progress=False).run()
        assert json.loads(path.read_text())["batch_evaluations"] >= 1
    phase = json.loads(path.read_text())["phase"]
    resumed = SpdySearch(table, target, evaluator, LONGER, checkpoint=path, progress=False).run()
    assert phase == "local"
    assert resumed.options == reference.options
    assert resumed.calibration_loss == reference.calibration_loss
    assert resumed.trace == [dict(t, elapsed=r["elapsed"]) for t, r in zip(reference.trace, resumed.trace)]
    # every loss computed before the kills was logged: the three runs together paid what one run pays
    assert resumed.meta["batch_evaluations"] == reference.meta["batch_evaluations"]
    # a checkpoint written for another target is refused, not silently reused
    with pytest.raises(ValueError, match="other inputs"):
        SpdySearch(table, target * 0.99, evaluator, LONGER, checkpoint=path, progress=False).run()


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
    result = SpdySearch(table, target, evaluator, SpdyConfig(random_starts=4, tries=20, step_fraction=0.5, seed=0), progress=False).run()
    best_random = min(t["loss"] for t in result.trace if t["phase"] == "random")
    assert any(t["phase"] == "local" for t in result.trace)
    assert result.calibration_loss < best_random


def test_evolution_is_deterministic_and_resumes(setup, tmp_path, monkeypatch):
    bundle, _, table, _, evaluator, target = setup
    cfg = EvoConfig(generations=4, offspring=4, seed=2)
    n = len(bundle.calibration)
    a = EvolutionSearch(table, target, evaluator, n, cfg, progress=False).run()
    path = tmp_path / "evo.json"
    with monkeypatch.context() as m:
        dying_after(evaluator, 12, m)
        with pytest.raises(Interrupt):
            EvolutionSearch(table, target, evaluator, n, cfg, checkpoint=path, progress=False).run()
    b = EvolutionSearch(table, target, evaluator, n, cfg, checkpoint=path, progress=False).run()
    assert a.options == b.options and a.calibration_loss == b.calibration_loss
    assert b.meta["batch_evaluations"] == a.meta["batch_evaluations"]  # nothing scored before the kill was paid again
    # the convergence curve starts at the DP prior's profile and only goes down
    assert a.trace[0]["generation"] is None and [t["loss"] for t in a.trace] == sorted((t["loss"] for t in a.trace), reverse=True)
    assert [dict(t, elapsed=0) for t in a.trace] == [dict(t, elapsed=0) for t in b.trace]


FULL = 10**6  # first_batches beyond the batch count: every evaluation on all batches, the search before multi-fidelity


def test_multi_fidelity_pays_each_batch_once(setup):
    """Scoring on 2 batches, then all: each batch is run once, and the means are the evaluator's own."""
    _, _, table, _, evaluator, target = setup
    profile = baselines.uniform(table, target).options
    fid = MultiFidelity(evaluator)
    assert fid.batches == len(evaluator.batches) >= 4
    assert fid.mean(profile, 2) == evaluator(profile, 2)
    assert fid.mean(profile) == evaluator(profile) and fid.mean(profile, 2) == evaluator(profile, 2)
    assert (fid.evaluations, fid.batch_evaluations, fid.full_evaluations) == (1, fid.batches, 1)
    assert fidelities(1, 10) == [1, 2, 4, 8, 10] and fidelities(FULL, 10) == [10] and fidelities(3, 3) == [3]


def test_multi_fidelity_search_costs_less_and_reports_full_losses(setup):
    """Successive halving and early abandonment spend far fewer batch passes than scoring every
    candidate on everything, and the loss the search returns is still the loss on all the data."""
    _, _, table, _, evaluator, target = setup
    cfg = dict(random_starts=12, tries=10, step_fraction=0.5, seed=1)
    full = SpdySearch(table, target, evaluator, SpdyConfig(**cfg, first_batches=FULL), progress=False).run()
    fast = SpdySearch(table, target, evaluator, SpdyConfig(**cfg), progress=False).run()
    assert full.meta["batch_evaluations"] == full.evaluations * len(evaluator.batches)
    assert fast.meta["batch_evaluations"] < 0.6 * full.meta["batch_evaluations"]
    assert fast.meta["full_evaluations"] < fast.evaluations
    assert fast.calibration_loss == evaluator(fast.options)
    assert [t["loss"] for t in fast.trace] == sorted((t["loss"] for t in fast.trace), reverse=True)


def test_a_wall_budget_stops_the_search_with_a_full_loss(setup):
    """A budget too small for even the random starts still returns a profile scored on all batches."""
    _, _, table, _, evaluator, target = setup
    result = SpdySearch(table, target, evaluator, SpdyConfig(random_starts=50, seed=0), progress=False, budget=1e-3).run()
    assert result.meta["stopped_by_budget"] and result.meta["full_evaluations"] == 1
    assert result.calibration_loss == evaluator(result.options) and result.predicted_speedup >= target
    evo = EvolutionSearch(table, target, evaluator, len(evaluator.batches), EvoConfig(generations=50, offspring=4), progress=False,
                          budget=1e-3).run()
    assert evo.meta["stopped_by_budget"] and evo.calibration_loss == evaluator(evo.options)


@pytest.mark.parametrize("text, seconds", [("300", 300.0), ("300s", 300.0), ("5m", 300.0), ("1h", 3600.0), ("1.5h", 5400.0),
                                           (" 90 S ", 90.0), (45, 45.0), ("none", None), (None, None)])
def test_budget_spellings(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "-3", "0", "0s", "1e3", "5 minutes", "inf", float("nan"), True])
def test_bad_budgets_name_the_flag_and_what_is_valid(text):
    with pytest.raises(InputError, match=r"--search-budget .*(300s, 5m|positive, finite)"):
        parse_budget(text)


def test_a_rerun_with_a_larger_budget_resumes_the_cut_search(setup, tmp_path):
    """The budget is left out of the checkpoint's key: the cut search's state is taken up, not redone."""
    _, _, table, _, evaluator, target = setup
    path = tmp_path / "search.json"
    cut = SpdySearch(table, target, evaluator, LONGER, checkpoint=path, progress=False, budget=1e-3).run()
    assert cut.meta["stopped_by_budget"]
    done = SpdySearch(table, target, evaluator, LONGER, checkpoint=path, progress=False, budget=None).run()
    assert not done.meta["stopped_by_budget"] and done.calibration_loss <= cut.calibration_loss
    assert done.trace[:len(cut.trace)] == cut.trace and done.meta["batch_evaluations"] > cut.meta["batch_evaluations"]
    assert done.calibration_loss == evaluator(done.options)


def test_finalists_keep_the_best_distinct_full_scores_and_validation_picks_among_them(setup):
    bundle, units, table, db, evaluator, target = setup
    every_one_full = SpdyConfig(random_starts=6, tries=4, seed=3, first_batches=100)
    profile = SpdySearch(table, target, evaluator, every_one_full, progress=False).run()
    finalists = profile.meta["finalists"]
    losses = [f["loss"] for f in finalists]
    assert 1 < len(finalists) <= FINALISTS and losses == sorted(losses)
    assert losses[0] == profile.calibration_loss and finalists[0]["options"] == profile.options
    assert len({tuple(f["options"].values()) for f in finalists}) == len(finalists)
    # validation on other data: the pick is the finalist with the least validation loss, with its own coefficients
    stitcher = Stitcher(units, db)
    validation = Evaluator(bundle.model, bundle.heldout[:2], "kl", apply=stitcher.apply)
    try:
        picked = pick_on_validation(profile, table, validation)
        scores = [validation(f["options"]) for f in finalists]
    finally:
        stitcher.restore()
    best = min(range(len(scores)), key=lambda i: (scores[i], losses[i]))
    assert picked.options == finalists[best]["options"] and picked.meta["picked"] == best
    assert picked.validation_loss == pytest.approx(scores[best]) and picked.calibration_loss == losses[best]
    assert picked.meta["coefficients"] == finalists[best]["coefficients"] and "finalists" not in picked.meta
    assert [v["validation_loss"] for v in picked.meta["validation"]] == pytest.approx(scores)
    assert picked.predicted_speedup == pytest.approx(table.predicted_speedup(picked.options)) and picked.predicted_speedup >= target


def test_spdy_is_never_handed_back_worse_than_a_baseline_it_was_given(setup):
    """The baselines' profiles at the same target join a search's finalists: the best is taken when it scores better
    on the calibration data than what the search found, left to the validation pick otherwise."""
    _, _, table, db, evaluator, target = setup
    searched = SpdySearch(table, target, evaluator, SpdyConfig(random_starts=4, tries=2, seed=1), progress=False).run()
    given = {"uniform": baselines.uniform(table, target),
             "dp-errors": baselines.dp_errors(table, target, {u: {k: e ** 2 for k, e in errs.items()} for u, errs in db.relative_errors().items()})}
    even, ranked = given["uniform"].options, given["dp-errors"].options
    assert len({tuple(searched.options.values()), tuple(even.values()), tuple(ranked.values())}) == 3
    real = with_baselines(searched, given, evaluator)
    losses = real.meta["baseline_calibration_losses"]
    assert losses == pytest.approx({"uniform": evaluator(even), "dp-errors": evaluator(ranked)}) and real.evaluations == searched.evaluations + 2
    assert real.calibration_loss == min(searched.calibration_loss, *losses.values())
    favours = with_baselines(searched, given, lambda options: 0.0 if options == ranked else searched.calibration_loss / 2)
    assert favours.options == ranked and favours.calibration_loss == 0.0 and favours.meta["baseline"] == "dp-errors"
    assert favours.predicted_speedup == pytest.approx(table.predicted_speedup(ranked)) and favours.predicted_speedup >= target
    shuns = with_baselines(searched, given, lambda options: 9.0 if options in (even, ranked) else 1.0)
    assert shuns.options == searched.options and [f.get("baseline") for f in shuns.meta["finalists"][-2:]] == ["uniform", "dp-errors"]
    picked = pick_on_validation(shuns, table, lambda options: 0.0 if options == even else 1.0)  # validation decides
    assert picked.options == even and picked.meta["baseline"] == "uniform" and picked.meta["coefficients"] == searched.meta["coefficients"]
    assert with_baselines(replace(searched, options=even), {"uniform": given["uniform"]}, evaluator) == replace(searched, options=even)
    # a baseline the search already scored (among its finalists) keeps that loss and costs no evaluation
    seen = replace(searched, meta={**searched.meta, "finalists": [*searched.meta["finalists"], {"options": ranked, "loss": 0.5}]})
    again = with_baselines(seen, given, lambda options: 0.7 if options == even else pytest.fail("scored twice"))
    assert again.meta["baseline_calibration_losses"] == {"uniform": 0.7, "dp-errors": 0.5} and again.evaluations == searched.evaluations + 1


def test_restarts_pool_every_seeds_finalists_for_the_validation_pick(setup, tmp_path):
    """Seeds end on different profiles; all their finalists reach the validation pick, which may take one that
    calibration ranks second."""
    from spdy.pipeline import Evaluators, SearchSettings, find_profile

    bundle, units, table, db, evaluator, target = setup
    runs = [SpdySearch(table, target, evaluator, SpdyConfig(random_starts=4, tries=2, seed=s), progress=False).run() for s in (1, 2)]
    assert runs[0].options != runs[1].options
    one = pooled(runs)
    assert one.calibration_loss == min(r.calibration_loss for r in runs) and one.evaluations == sum(r.evaluations for r in runs)
    assert [r["seed"] for r in one.meta["restarts"]] == [1, 2] and pooled(runs[:1]) is runs[0]
    every = {tuple(f["options"].values()) for r in runs for f in r.meta["finalists"]}
    assert {tuple(f["options"].values()) for f in one.meta["finalists"]} == every  # room for every seed's finalists
    second = max(runs, key=lambda r: r.calibration_loss)
    assert pick_on_validation(one, table, lambda options: 0.0 if options == second.options else 1.0).options == second.options
    # through find_profile (on the dense model, with an evaluator of its own): one checkpoint per seed, the same pooled search
    evaluator.apply({u: DENSE for u in table.units})
    settings = SearchSettings("spdy", 1, random_starts=4, tries=2, anchors=(), restarts=2)
    own = Evaluators(Evaluator(bundle.model, bundle.calibration, "kl"), None, None)
    found = find_profile(bundle, units, table, db, target, settings, tmp_path, progress=False, evaluation=own)
    assert len(list(tmp_path.glob("search-spdy-*.json"))) == 2 and [r["seed"] for r in found.meta["restarts"]] == [1, 2]
    assert found.calibration_loss <= one.calibration_loss
    with pytest.raises(InputError, match="--restarts 0"):
        SearchSettings(restarts=0)


def _index_distance(table, a, b):
    return sum(abs(table.options(u).index(a[u]) - table.options(u).index(b[u])) for u in table.units)


def test_fitted_coefficients_reproduce_a_profile_the_dp_makes_and_approach_one_it_cannot(setup):
    _, _, table, _, _, target = setup
    made = solve(table, target, scaled_errors(table, [0.9, 0.05, 0.6, 0.3, 1.0, 0.2][:len(table.units)])).profile
    fitted = fit_coefficients(table, target, made)
    assert fitted.max() == pytest.approx(1.0) and (fitted > 0).all()
    assert solve(table, target, scaled_errors(table, fitted)).profile == made
    even = baselines.uniform(table, target).options  # the grid overshoots the target: not a DP solution at it
    near = solve(table, target, scaled_errors(table, fit_coefficients(table, target, even))).profile
    plain = solve(table, target).profile  # every coefficient equal
    assert _index_distance(table, near, even) <= _index_distance(table, plain, even)
    assert table.predicted_speedup(near) >= target


def test_anchors_join_the_random_starts_first_and_the_search_never_ends_worse_than_them(setup):
    _, _, table, _, evaluator, target = setup
    made = solve(table, target, scaled_errors(table, [0.9, 0.05, 0.6, 0.3, 1.0, 0.2][:len(table.units)])).profile
    cfg = SpdyConfig(random_starts=2, tries=2, seed=4, first_batches=1000)  # every start scored on all batches
    anchored = SpdySearch(table, target, evaluator, cfg, progress=False, anchors=[made]).run()
    assert anchored.trace[0]["phase"] == "random" and anchored.trace[0]["loss"] == pytest.approx(evaluator(made))
    assert anchored.calibration_loss <= evaluator(made)
    assert any(f["options"] == made for f in anchored.meta["finalists"])
    plain = SpdySearch(table, target, evaluator, cfg, progress=False)
    assert plain.checkpoint.key != SpdySearch(table, target, evaluator, cfg, progress=False, anchors=[made]).checkpoint.key


def test_evolution_keeps_finalists_too(setup):
    _, _, table, _, evaluator, target = setup
    profile = EvolutionSearch(table, target, evaluator, len(evaluator.batches), EvoConfig(generations=3, offspring=4), progress=False).run()
    losses = [f["loss"] for f in profile.meta["finalists"]]
    assert losses and losses == sorted(losses) and losses[0] <= profile.calibration_loss


def test_token_cosine_compares_every_kept_token():
    dense = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    evaluate = Evaluator(torch.nn.Identity(), [{"x": dense, "attention_mask": mask}], "token-cosine", forward=lambda b: b["x"])
    assert evaluate.score() == pytest.approx(0.0, abs=1e-12)
    changed = dense.clone()
    changed[0, 3:] = -changed[0, 3:]  # masked-out tokens: no effect
    evaluate.forward = lambda b: changed
    assert evaluate.score() == pytest.approx(0.0, abs=1e-12)
    changed[1, 0] = -changed[1, 0]  # one of 8 kept tokens reversed: cosine -1, loss 2 / 8
    assert evaluate.score() == pytest.approx(2 / 8)


def test_a_tied_search_warm_starts_from_the_per_unit_coefficients_it_produced(setup):
    """Coefficients shared by kind and depth: the per-unit coefficients a tied search returns are what a
    warm start (e.g. the curve's next target) takes, and they give back exactly its profile."""
    _, _, table, _, evaluator, target = setup
    tied = SpdyConfig(random_starts=4, tries=2, seed=3, tie="kind-depth")
    first = SpdySearch(table, target, evaluator, tied, progress=False).run()
    warm = SpdySearch(table, target, evaluator, tied, progress=False, start=first.meta["coefficients"])
    assert warm.profile_for(warm.start) == first.options
    again = warm.run()
    assert again.trace[0]["phase"] == "start" and again.trace[0]["loss"] == pytest.approx(first.calibration_loss)
    assert again.calibration_loss <= first.calibration_loss
    with pytest.raises(InputError, match="one coefficient per unit"):
        SpdySearch(table, target, evaluator, tied, progress=False, start=[0.5])


def test_a_short_budget_cuts_the_random_starts_to_half_of_it_and_leaves_the_rest_to_the_local_search(setup):
    """SmolLM2 at 2.5 s a batch pass spent a 3-minute budget inside 100 random starts' lowest fidelity."""
    _, _, table, _, evaluator, target = setup
    cfg = SpdyConfig(random_starts=100, seed=0, first_batches=1)
    ladder = fidelities(1, 8)
    assert halving_passes(100, ladder) == 100 + 50 * 1 + 25 * 2 + 13 * 4 and halving_passes(1, [1]) == 1
    search = SpdySearch(table, target, evaluator, cfg, progress=False, budget=180.0)
    search.ladder = ladder  # SmolLM2's 8 batches
    affordable = search._affordable_starts(2.5)
    assert halving_passes(affordable, ladder) * 2.5 <= 90 < halving_passes(affordable + 1, ladder) * 2.5
    assert search._affordable_starts(1e-6) == 100 and search._affordable_starts(None) == 100
    assert search._affordable_starts(1e3) == MIN_RANDOM_STARTS  # however short, a few random vectors are drawn
    assert SpdySearch(table, target, evaluator, cfg, progress=False)._affordable_starts(2.5) == 100  # no budget: the paper's 100
    anchored = SpdySearch(table, target, evaluator, cfg, progress=False, budget=180.0, anchors=[solve(table, target).profile])
    assert anchored._affordable_starts(1e3) == 1 + MIN_RANDOM_STARTS
    run = SpdySearch(table, target, evaluator, cfg, progress=False, budget=60.0).run()  # the digits MLP: ms a pass, all afforded
    assert run.meta["starts"] == 100


def test_the_uniform_level_short_of_the_target_anchors_a_profile_the_dp_brings_up_to_it(setup):
    """On a coarse grid the uniform level that meets the target may overshoot by far; the one short of it, brought up to
    the target by the DP (`fit_coefficients`), keeps nearer to even."""
    _, _, table, _, _, target = setup
    met = baselines.uniform(table, target).options
    short = baselines.uniform_short_of(table, target)
    assert short is not None and table.predicted_speedup(short) < target <= table.predicted_speedup(met)
    assert all(table.options(u).index(short[u]) < table.options(u).index(met[u]) for u in table.units)  # one level denser
    near = solve(table, target, scaled_errors(table, fit_coefficients(table, target, short))).profile
    assert table.predicted_speedup(near) >= target
    assert _index_distance(table, near, short) < _index_distance(table, met, short)
    assert baselines.uniform_short_of(table, 1.0) is None  # dense meets it: nothing falls short


def test_a_landing_resolve_searches_from_the_coefficients_and_never_ends_worse_than_their_dp_profile(setup):
    """Where a measured speedup sends the table to another target, the DP's profile for the coefficients found can
    be far worse than the one they were found for: the re-solve searches from them (``start``), so it starts on
    that profile and can only improve on it."""
    _, _, table, _, evaluator, target = setup
    first = SpdySearch(table, target, evaluator, SMALL, progress=False).run()
    other = 1 + 0.8 * (table.max_speedup() - 1)  # as if the runtime had measured the first profile short of the target
    coefficients = first.meta["coefficients"]
    dp_only = solve(table, other, scaled_errors(table, coefficients)).profile
    resolved = SpdySearch(table, other, evaluator, replace(SMALL, tries=2), progress=False, start=coefficients).run()
    assert resolved.trace[0]["phase"] == "start" and resolved.trace[0]["loss"] == pytest.approx(evaluator(dp_only))
    assert resolved.calibration_loss <= evaluator(dp_only) and resolved.predicted_speedup >= other
