import json

import pytest

from spdy.cli import main
from spdy.timing.table import TimingTable


@pytest.fixture
def table_path(tmp_path):
    t = TimingTable({
        "l1": {"0.0000": 2.0, "0.5000": 1.2, "0.9000": 0.5},
        "l2": {"0.0000": 1.0, "0.5000": 0.8, "0.9000": 0.3},
    }, base=4.0, fixed=1.0)
    path = tmp_path / "t.json"
    t.save(path)
    return path


def test_solve_json_contract(table_path, capsys):
    assert main(["solve", str(table_path), "--target", "1.6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"target", "budget", "predicted_time", "predicted_speedup", "max_speedup", "profile"}
    assert out["target"] == 1.6 and out["budget"] == pytest.approx(1.5)
    assert out["predicted_speedup"] >= 1.6
    assert out["max_speedup"] == pytest.approx(4.0 / 1.8)
    assert all(isinstance(v, float) for v in out["profile"].values())


def test_solve_table_output(table_path, capsys):
    assert main(["solve", str(table_path), "--target", "1.6"]) == 0
    out = capsys.readouterr().out
    assert "predicted speedup" in out and "maximum attainable speedup" in out and "l1" in out


def test_infeasible_exits_2_with_max(table_path, capsys):
    assert main(["solve", str(table_path), "--target", "3", "--json"]) == 2
    err = capsys.readouterr().err
    assert "maximum attainable speedup is 2.2222x" in err


def test_errors_file_changes_the_choice(table_path, tmp_path, capsys):
    errors = tmp_path / "e.json"
    # l1 is very sensitive, l2 is not: l2 takes the pruning
    errors.write_text(json.dumps({"l1": {"0": 0, "0.5": 100, "0.9": 1000}, "l2": {"0.0": 0, "0.5": 0.1, "0.9": 0.2}}))
    assert main(["solve", str(table_path), "--target", "1.2", "--errors", str(errors), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == {"l1": 0.0, "l2": 0.9}


def test_exclude_keeps_unit_out(table_path, capsys):
    assert main(["solve", str(table_path), "--target", "1.3", "--exclude", "l2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["profile"]) == ["l1"]


@pytest.mark.parametrize("args, message", [
    (["--errors", "missing.json"], "does not exist"),
    (["--exclude", "nope"], "unknown units"),
])
def test_bad_input_exits_2(table_path, capsys, args, message):
    assert main(["solve", str(table_path), "--target", "1.2", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_errors_file_names_unit(table_path, tmp_path, capsys):
    errors = tmp_path / "e.json"
    errors.write_text(json.dumps({"l1": {"0": 0}, "zz": {"0": 0}}))
    assert main(["solve", str(table_path), "--target", "1.2", "--errors", str(errors)]) == 2
    assert "unknown unit 'zz'" in capsys.readouterr().err


def test_reference_table_via_cli(reference_tables, capsys):
    path = next(p for p in reference_tables if p.name == "rn50_unstr.txt")
    assert main(["solve", str(path), "--target", "2.0", "--exclude", "conv1", "fc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted_speedup"] >= 2.0 and len(out["profile"]) == 52


def test_a_block_left_dense_is_named(tmp_path, capsys):
    """A table whose fused pair runs faster left dense in torch: a low target keeps it so, and says it."""
    t = TimingTable({
        "a": {"0.0000": 3.0, "0.9000": 0.5},
        "b": {"0.0000": 3.0, "0.9000": 0.5},
        "c": {"0.0000": 3.0, "0.9000": 0.5},
    }, base=10.0, fixed=1.0, dense_blocks={"ab": {"units": ["a", "b"], "time": 4.0}})
    path = tmp_path / "t.json"
    t.save(path)
    assert main(["solve", str(path), "--target", str(10 / 6), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dense_blocks"] == ["ab"] and out["profile"] == {"a": 0.0, "b": 0.0, "c": 0.9}
    assert out["predicted_time"] == pytest.approx(5.5)
    assert main(["solve", str(path), "--target", str(10 / 6)]) == 0
    assert "left dense, unfused in torch: ab" in capsys.readouterr().out
