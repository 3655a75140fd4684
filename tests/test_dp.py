import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdy.search.dp import InfeasibleTarget, prior, scaled_errors, solve, solve_arrays
from spdy.timing.table import TimingTable


def exhaustive(times, errors, budget):
    """Best (error, time) by trying every combination; None when nothing fits."""
    best = None
    for picks in itertools.product(*[range(len(t)) for t in times]):
        total = sum(t[p] for t, p in zip(times, picks))
        if total <= budget:
            err = sum(e[p] for e, p in zip(errors, picks))
            if best is None or err < best:
                best = err
    return best


@st.composite
def integer_instances(draw):
    units = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 4)) for _ in range(units)]
    times = [np.array(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)), float) for n in sizes]
    errors = [np.array(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n))) for n in sizes]
    extra = draw(st.integers(1, 30))
    budget = sum(t.min() for t in times) + extra
    return times, errors, budget, extra


@settings(max_examples=300, deadline=None)
@given(integer_instances())
def test_matches_exhaustive_search_when_times_are_whole_buckets(instance):
    times, errors, budget, slack = instance
    choice = solve_arrays(times, errors, budget, buckets=slack)
    assert choice.time <= budget
    assert choice.error == pytest.approx(exhaustive(times, errors, budget), abs=1e-9)


@st.composite
def float_instances(draw):
    units = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 5)) for _ in range(units)]
    times = [np.array(draw(st.lists(st.floats(0.001, 1.0), min_size=n, max_size=n))) for n in sizes]
    errors = [np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))) for n in sizes]
    fraction = draw(st.floats(0.0, 1.0))
    lo, hi = sum(t.min() for t in times), sum(t.max() for t in times)
    return times, errors, lo + fraction * (hi - lo)


@settings(max_examples=300, deadline=None)
@given(float_instances(), st.sampled_from([7, 100, 10_000]))
def test_never_exceeds_budget_and_is_optimal_up_to_rounding(instance, buckets):
    times, errors, budget = instance
    choice = solve_arrays(times, errors, budget, buckets)
    assert choice.time <= budget  # the un-rounded time, no tolerance
    # Rounding up costs at most one bucket per unit: no worse than the optimum of that tighter budget.
    # Less a relative hair: a float sum can land exactly on the budget with an option one ulp
    # slower than the fastest, which the DP (exact about "above the fastest") rightly refuses.
    slack = budget - sum(t.min() for t in times)
    tighter = budget - len(times) * slack / buckets - 1e-12 * budget
    assert choice.error >= exhaustive(times, errors, budget) - 1e-9
    bound = exhaustive(times, errors, tighter)
    if bound is not None:
        assert choice.error <= bound + 1e-9


def test_infeasible_reports_max_speedup():
    t = TimingTable({"a": {"0.0000": 1.0, "0.9000": 0.5}}, base=2.0, fixed=1.0)
    with pytest.raises(InfeasibleTarget, match=r"maximum attainable speedup is 1\.3333x") as err:
        solve(t, 1.5)
    assert err.value.max_speedup == pytest.approx(2.0 / 1.5)
    assert solve(t, 2.0 / 1.5).profile == {"a": "0.9000"}


def test_prior_prefers_denser_options_where_time_allows():
    t = TimingTable({
        "slow": {"0.0000": 4.0, "0.5000": 2.0, "0.9000": 1.0},
        "cheap": {"0.0000": 1.0, "0.5000": 0.9, "0.9000": 0.8},
    }, base=5.0, fixed=0.0)
    s = solve(t, 1.6)  # budget 3.125
    assert s.profile == {"slow": "0.5000", "cheap": "0.0000"}
    assert s.predicted_speedup >= 1.6
    assert s.total_error == pytest.approx(prior(3)[1])


def test_scaled_errors_are_coefficient_times_prior():
    t = TimingTable({"a": {"0.0000": 1.0, "0.5000": 0.5, "0.9000": 0.1}, "b": {"0.0000": 1.0, "0.9000": 0.2}}, base=2.0, fixed=0.0)
    e = scaled_errors(t, [0.5, 2.0])
    assert e == {"a": {"0.0000": 0.0, "0.5000": 0.125, "0.9000": 0.5}, "b": {"0.0000": 0.0, "0.9000": 2.0}}


@pytest.mark.parametrize("target", [1.2, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_every_reference_profile_meets_its_target(reference_tables, target):
    for path in reference_tables:
        for exclude in ([], None):
            table = TimingTable.load(path)
            if exclude is None:  # the paper keeps first and last layers dense
                table = table.exclude([u for u in (table.units[0], table.units[-1])])
            if target > table.max_speedup():
                with pytest.raises(InfeasibleTarget):
                    solve(table, target)
                continue
            s = solve(table, target)
            assert set(s.profile) == set(table.units)
            assert s.predicted_time - table.fixed <= s.budget
            assert table.base / table.predicted_time(s.profile) >= target * (1 - 1e-12)
            # tight: at 10k buckets the profile wastes well under 1% of the budget
            assert s.predicted_speedup <= target * 1.01
