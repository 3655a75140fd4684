import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdy.levels import DENSE
from spdy.search.dp import Group, InfeasibleTarget, prior, scaled_errors, solve, solve_arrays
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


def exhaustive_grouped(times, errors, budget, groups):
    """Best error when each group may also take its joint option; None when nothing fits."""
    best = None
    for taken in itertools.product([False, True], repeat=len(groups)):
        inside = {i for g, t in zip(groups, taken) if t for i in range(g.start, g.stop)}
        rest = [i for i in range(len(times)) if i not in inside]
        joint_time = sum(g.time for g, t in zip(groups, taken) if t)
        joint_error = sum(g.error for g, t in zip(groups, taken) if t)
        err = exhaustive([times[i] for i in rest], [errors[i] for i in rest], budget - joint_time) if rest else (0.0 if joint_time <= budget else None)
        if err is not None and (best is None or err + joint_error < best):
            best = err + joint_error
    return best


@st.composite
def grouped_instances(draw):
    times, errors, budget, slack = draw(integer_instances())
    groups, start = [], 0
    while start < len(times):
        stop = draw(st.integers(start + 1, len(times)))
        if draw(st.booleans()):
            fastest = int(sum(t.min() for t in times[start:stop]))
            groups.append(Group(start, stop, float(draw(st.integers(fastest, fastest + 20))), draw(st.floats(0, 10))))
        start = stop
    return times, errors, budget, slack, groups


@settings(max_examples=300, deadline=None)
@given(grouped_instances())
def test_groups_match_exhaustive_search(instance):
    """A run of units that may instead take one joint option (a block left dense, unfused) is solved exactly."""
    times, errors, budget, slack, groups = instance
    choice = solve_arrays(times, errors, budget, buckets=slack, groups=groups)
    assert choice.time <= budget
    assert choice.error == pytest.approx(exhaustive_grouped(times, errors, budget, groups), abs=1e-9)
    for g in groups:
        assert len({choice.indices[i] < 0 for i in range(g.start, g.stop)}) == 1  # a group is taken whole or not at all


def test_overlapping_groups_are_refused():
    times = [np.array([1.0, 0.5])] * 3
    with pytest.raises(ValueError, match="disjoint"):
        solve_arrays(times, times, 3.0, groups=[Group(0, 2, 1.0), Group(1, 3, 1.0)])


def test_a_dense_block_cheaper_than_its_fused_units_is_kept_whole():
    """Two units fused in the kernel cost 3 each dense; torch runs the pair dense in 4: a low target keeps
    them dense, unfused, and the table says they run in torch's format."""
    times = {u: {DENSE: 3.0, "0.5000": 2.0, "0.9000": 0.5} for u in ("a", "b", "c")}
    meta = {"formats": {u: {DENSE: "kernel", "0.5000": "kernel", "0.9000": "kernel"} for u in times}}
    table = TimingTable(times, base=10.0, fixed=1.0, meta=meta, dense_blocks={"ab": {"units": ["a", "b"], "time": 4.0}})
    assert table.predicted_time({u: DENSE for u in times}) == pytest.approx(1 + 4 + 3)
    solution = solve(table, 10 / 6)  # 6: only "ab" dense (4) + "c" at 0.9 (0.5) + fixed fits; the fused pair at 0.5 does not
    assert solution.profile == {"a": DENSE, "b": DENSE, "c": "0.9000"}
    assert solution.predicted_time == pytest.approx(5.5)
    assert table.formats(solution.profile) == {"a": "dense", "b": "dense", "c": "kernel"}
    assert table.formats({"a": DENSE, "b": "0.5000"})["a"] == "kernel"  # half the block sparse: the block stays fused
    assert table.min_time() == pytest.approx(2.5)
    again = TimingTable.from_dict(table.to_dict())
    assert again.dense_blocks == table.dense_blocks
    assert table.calibrated([({u: DENSE for u in times}, 10 / 9), ({u: "0.9000" for u in times}, 4.0)]).dense_blocks["ab"]["time"] != 4.0
    assert table.exclude(["a"]).dense_blocks == {}


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
