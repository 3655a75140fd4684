"""The closed loop between the timing table and the runtime (`pipeline.land`), driven by the exact DP
on the SPDY authors' ResNet-50 table and a runtime whose speedup differs from the table's by a factor,
as a runtime that fuses layers does."""

import pytest

from spdy.errors import InputError
from spdy.pipeline import LANDING, MAX_RESOLVES, land
from spdy.search.dp import solve
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable

from conftest import REFERENCE


@pytest.fixture(scope="module")
def table() -> TimingTable:
    path = REFERENCE / "rn50_unstr.txt"
    if not path.is_file():
        pytest.skip(f"reference timing table not found at {path}")
    return TimingTable.load(path)


def _profile(table: TimingTable, table_target: float, user_target: float) -> Profile:
    solution = solve(table, table_target)
    return Profile(solution.profile, user_target, solution.predicted_time, solution.predicted_speedup, "dp",
                   meta={"table_target": table_target})


def _runtime(factor: float, tolerance: float = 0.03):
    """Measures ``factor`` x the table's prediction; ``met`` as verify defines it."""
    def measure(profile: Profile) -> dict:
        measured = factor * profile.predicted_speedup
        return {"measured_speedup": measured, "met": measured >= profile.target * (1 - tolerance)}
    return measure


@pytest.mark.parametrize("factor", [1.6, 1.25, 0.85])
def test_a_runtime_off_by_a_factor_lands_on_the_target(table, factor):
    target = 2.0
    calls = []

    def resolve(profile, table_target):
        calls.append(table_target)
        return _profile(table, table_target, target)

    profile, result, rounds = land(_profile(table, target, target), target, table.max_speedup(), _runtime(factor), resolve)
    assert rounds[0]["target_for_table"] == target and len(calls) == len(rounds) - 1 <= MAX_RESOLVES
    assert LANDING[0] <= result["measured_speedup"] / target <= LANDING[1], rounds
    assert result["met"] and profile.meta["table_target"] == rounds[[r["measured"] for r in rounds].index(result["measured_speedup"])]["target_for_table"]
    # the table was asked for what the runtime needs: less when it over-delivers, more when it under-delivers
    assert (calls[0] < target) == (factor > 1)


def test_a_landed_profile_is_not_resolved(table):
    def resolve(profile, table_target):
        raise AssertionError("a profile inside the landing band must be kept")

    profile, result, rounds = land(_profile(table, 2.0, 2.0), 2.0, table.max_speedup(), _runtime(1.02), resolve)
    assert len(rounds) == 1 and result["met"]


def test_an_unreachable_resolve_keeps_what_was_measured(table):
    def resolve(profile, table_target):
        raise InputError(f"no profile reaches {table_target:g}x")

    said = []
    profile, result, rounds = land(_profile(table, 2.0, 2.0), 2.0, table.max_speedup(), _runtime(0.8), resolve, say=said.append)
    assert len(rounds) == 1 and not result["met"] and any("kept" in s for s in said)


def test_a_resolve_that_gives_the_same_profile_is_not_measured_again(table):
    """A coarse grid (uniform's levels) answers a nearby table target with the profile already measured."""
    measured = []

    def measure(profile):
        measured.append(profile)
        return _runtime(1.4)(profile)

    said = []
    profile, result, rounds = land(_profile(table, 2.0, 2.0), 2.0, table.max_speedup(), measure, lambda p, t: p, say=said.append)
    assert len(measured) == len(rounds) == 1 and result["met"] and any("same profile" in s for s in said)


def test_the_met_round_with_least_overshoot_is_kept(table):
    """An oscillating runtime: the loop keeps the met round closest to the target, not the last one."""
    factors = iter([2.0, 0.7, 1.3, 0.7])

    def measure(profile):
        measured = next(factors) * profile.predicted_speedup
        return {"measured_speedup": measured, "met": measured >= 2.0 * 0.97}

    profile, result, rounds = land(_profile(table, 2.0, 2.0), 2.0, table.max_speedup(), measure,
                                   lambda p, t: _profile(table, t, 2.0))
    met = [r["measured"] for r in rounds if r["met"]]
    assert len(rounds) == MAX_RESOLVES + 1 and result["measured_speedup"] == min(met)


def test_the_default_target_sits_between_dense_and_the_maximum_or_is_refused():
    from spdy.pipeline import default_target

    fast = TimingTable({"a": {"0.0000": 0.010, "0.9000": 0.002}}, base=0.012, fixed=0.002)
    assert 1 < default_target(fast) < fast.max_speedup()
    flat = TimingTable({"a": {"0.0000": 0.010, "0.9000": 0.0099}}, base=0.012, fixed=0.002)
    with pytest.raises(InputError, match=r"maximum attainable speedup on this timing table is 1\.008x"):
        default_target(flat)


def test_a_steep_runtime_is_bracketed_instead_of_overshot(table):
    """A runtime whose speedup grows faster than the table's (measured = 1.8 (predicted / 2)^3): scaling
    by the last round alone jumps from under to over and back; once two rounds bracket the target the
    loop interpolates between them and lands."""
    def measure(profile):
        measured = 1.8 * (profile.predicted_speedup / 2.0) ** 3
        return {"measured_speedup": measured, "met": measured >= 2.0 * 0.97}

    profile, result, rounds = land(_profile(table, 2.0, 2.0), 2.0, table.max_speedup(), measure,
                                   lambda p, t: _profile(table, t, 2.0))
    assert rounds[0]["measured"] < 2.0 < rounds[1]["measured"]
    assert len(rounds) == 3 and LANDING[0] <= result["measured_speedup"] / 2.0 <= LANDING[1], rounds
    assert rounds[0]["target_for_table"] < rounds[2]["target_for_table"] < rounds[1]["target_for_table"]


def test_a_miss_is_measured_again_before_anything_is_resolved(table):
    """One noisy low run of rounds (0.80x of the prediction) is pooled with a second, normal one: their
    median lands, so the profile is kept and nothing more is pruned."""
    runs = iter([[0.8 * 2.0] * 9 + [2.0], [2.0] * 10])

    def measure(profile: Profile) -> dict:
        ratios = next(runs)
        measured = sorted(ratios)[len(ratios) // 2]
        return {"measured_speedup": measured, "ratios": ratios, "met": measured >= 2.0 * 0.97, "target": 2.0, "tolerance": 0.03}

    def resolve(profile, table_target):
        raise AssertionError("a miss the second measurement does not confirm must not be re-solved")

    profile, result, rounds = land(_profile(table, 2.0, 2.0), 2.0, table.max_speedup(), measure, resolve)
    assert len(rounds) == 1 and result["rounds"] == 20 and result["met"]
    assert result["measured_speedup"] == pytest.approx(2.0) and rounds[0]["measured"] == pytest.approx(2.0)
