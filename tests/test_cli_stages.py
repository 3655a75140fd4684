"""The stage subcommands end to end on the digits MLP, chained like a user would:
`spdy time` -> `spdy database` -> `spdy search` -> `spdy verify`, and `spdy report` on a
`spdy run` work directory; their exit codes, and interruption (Ctrl-C, a kill mid-write)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spdy.cli import main
from spdy.database import Database
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable
from spdy.verification import SpeedupMiss

LEVELS = ["--levels", "0.5,0.9"]
SEARCH = ["--random-starts", "3", "--tries", "2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args: str) -> tuple[int, str, str]:
    """`spdy ARGS` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(err: str, *words: str) -> None:
    """Bad input is reported on one stderr line that says what was wrong, without a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """time -> database -> search, each command reading the files the previous one wrote."""
    work = tmp_path_factory.mktemp("stages")
    timings, db, profile = work / "out" / "timings.json", work / "db", work / "out" / "profile.json"
    code, out, _ = cli("time", "digits", *LEVELS, "--threads", "1", "-o", timings, "--json")
    assert code == 0
    timed = json.loads(out)
    code, out, _ = cli("database", "digits", *LEVELS, "-o", db, "--json")
    assert code == 0
    built = json.loads(out)
    table = TimingTable.load(timings)
    target = round(1 + 0.5 * (table.max_speedup() - 1), 3)
    code, out, _ = cli("search", "digits", "--timings", timings, "--database", db, "--target", target, *SEARCH, "-o", profile, "--json")
    assert code == 0
    found = json.loads(out)
    return {"work": work, "timings": timings, "db": db, "profile": profile, "target": target,
            "time": timed, "database": built, "search": found}


def test_time_writes_the_table_it_reports(chain):
    timed, table = chain["time"], TimingTable.load(chain["timings"])
    assert timed["output"] == str(chain["timings"])
    assert timed["units"] == len(table.units) == 3 and timed["options"] == 3  # dense, 0.5, 0.9
    assert timed["base"] == table.base and timed["fixed"] == table.fixed
    assert timed["max_speedup"] == pytest.approx(table.max_speedup())
    # the time outside the units: the dense model's less their unpruned times, or, where unpruned units run in the kernel
    # format (faster than torch on some CPUs), the model converted that way less their dense options' times
    deployed = table.meta.get("deployed_fixed")
    outside = (table.base - sum(table.unpruned_time(u) for u in table.units) if deployed is None
               else max(deployed["reference_model"] - sum(table.dense_time(u) for u in table.units), 0.0))
    assert table.fixed == pytest.approx(outside)
    assert (deployed is None) == (not table.dense_formats())
    assert table.meta["threads"] == 1
    assert not list(chain["timings"].parent.glob("*checkpoint*")), "the checkpoint goes once the table is written"


def test_database_reports_its_manifest(chain):
    built, db = chain["database"], Database.open(chain["db"])
    assert built["units"] == len(db.units) == 3 and built["entries"] == 3 * 3
    assert set(built["relative_error"]) == {"0.5000", "0.9000"}
    errors = db.relative_errors()
    for level, mean in built["relative_error"].items():
        assert mean == pytest.approx(statistics.mean(errors[u][level] for u in db.units))
    # pruning more of every layer loses more of its output
    assert all(0 < errors[u]["0.5000"] < errors[u]["0.9000"] < 1 for u in db.units)


def test_search_meets_the_target_on_the_table(chain):
    found, table = chain["search"], TimingTable.load(chain["timings"])
    saved = Profile.load(chain["profile"])
    assert found["options"] == saved.options and set(saved.options) == set(table.units)
    assert found["target"] == chain["target"]
    assert found["predicted_speedup"] == pytest.approx(table.predicted_speedup(saved.options))
    assert found["predicted_speedup"] >= chain["target"]
    assert found["calibration_loss"] == saved.calibration_loss and found["heldout_loss"] is not None


def test_verify_measures_the_searched_profile(chain):
    code, out, _ = cli("verify", "digits", "--profile", chain["profile"], "--timings", chain["timings"],
                       "--database", chain["db"], "--rounds", "10", "--json")
    result = json.loads(out)
    table, profile = TimingTable.load(chain["timings"]), Profile.load(chain["profile"])
    assert result["target"] == chain["target"]
    assert result["predicted_speedup"] == pytest.approx(table.predicted_speedup(profile.options))
    assert result["measured_speedup"] == statistics.median(result["ratios"]) and len(result["ratios"]) == 10
    assert result["met"] == (result["measured_speedup"] >= result["target"] * (1 - result["tolerance"]))
    assert code == (0 if result["met"] else 1)
    # the pruned model runs in the formats the table timed, and computes what its masked dense twin does
    timed = table.meta["formats"]
    assert result["formats"] == {u: timed[u][k] for u, k in profile.options.items() if timed[u][k] != "dense"}
    assert result["output_error"] < 1e-4


def test_verify_exits_1_on_a_missed_target(chain):
    table = TimingTable.load(chain["timings"])
    target = 10 * table.max_speedup()  # no profile of this table comes near it
    with pytest.warns(SpeedupMiss):
        code, out, _ = cli("verify", "digits", "--profile", chain["profile"], "--timings", chain["timings"],
                           "--target", target, "--rounds", "4", "--json")
    assert code == 1
    result = json.loads(out)
    assert result["met"] is False and result["target"] == target


def test_report_rewrites_a_run_directory(tmp_path):
    work = tmp_path / "run"
    code, out, _ = cli("run", "digits", *LEVELS, *SEARCH, "--threads", "1", "--baselines", "uniform", "--rounds", "5",
                       "--work-dir", work, "--json")
    summary = json.loads((work / "summary.json").read_text())
    assert code == (0 if summary["profiles"]["spdy"]["verify"]["met"] else 1)
    for name in ("report.md", "report.html"):
        (work / name).unlink()
    code, out, _ = cli("report", work)
    assert code == 0 and str(work / "report.md") in out
    md = (work / "report.md").read_text()
    measured = summary["profiles"]["spdy"]["verify"]["measured_speedup"]
    assert f"**Measured speedup {measured:.4g}x**" in md
    # the closed loop's table lists each method once per round, the held-out quality table once more
    methods_table = md.split("## Methods at the same target")[1].split("## Closed loop")[0].split("### Held-out quality")[0]
    assert methods_table.count("| spdy |") == 1 and methods_table.count("| uniform |") == 1
    rounds = len(summary["profiles"]["spdy"]["rounds"])
    quality_rows = 1 if "### Held-out quality" in md else 0
    after_methods = md.split("## Methods at the same target")[1]
    assert after_methods.count("| spdy | ") - 1 - quality_rows == (rounds if "## Closed loop" in md else 0)
    # the curve: a row per target and method, before the methods at the exported target
    curve = md.split("## Speed against quality")[1].split("## Methods at the same target")[0]
    assert curve.count("| spdy |") == len(summary["targets"]) == 5 and curve.count("| uniform |") == 5
    assert (work / "report.html").read_text().count("data:image/png;base64,") == 5  # with the curve and the search's convergence


def test_report_without_a_run_exits_2(tmp_path):
    code, _, err = cli("report", tmp_path)
    assert code == 2
    one_line_error(err, "summary.json", "spdy run")


@pytest.fixture()
def bad_files(tmp_path, chain):
    truncated = tmp_path / "cut.json"
    truncated.write_text(chain["timings"].read_text()[:200])
    strangers = tmp_path / "strangers.json"
    strangers.write_text(json.dumps({"profile": {"0": 0.5, "no.such.layer": 0.9}}))
    return {"cut": truncated, "strangers": strangers}


def test_missing_timings_file_exits_2(chain, tmp_path):
    code, _, err = cli("search", "digits", "--timings", tmp_path / "none.json", "--database", chain["db"], "--target", "1.2")
    assert code == 2
    one_line_error(err, "none.json", "does not exist")


def test_malformed_json_names_its_line(bad_files):
    code, _, err = cli("solve", bad_files["cut"], "--target", "1.2")
    assert code == 2
    one_line_error(err, "cut.json", "line ", "invalid JSON")


def test_profile_with_unknown_units_exits_2(bad_files):
    code, _, err = cli("verify", "digits", "--profile", bad_files["strangers"], "--rounds", "2")
    assert code == 2
    one_line_error(err, "no.such.layer")


@pytest.mark.parametrize("command", ["solve", "search", "verify", "run"])
@pytest.mark.parametrize("target", ["1", "0.5"])
def test_target_of_at_most_1_exits_2(chain, tmp_path, command, target):
    args = {
        "solve": [chain["timings"]],
        "search": ["digits", "--timings", chain["timings"], "--database", chain["db"], *SEARCH],
        "verify": ["digits", "--profile", chain["profile"], "--rounds", "2"],
        "run": ["digits", *LEVELS, "--work-dir", tmp_path / "w"],
    }[command]
    code, _, err = cli(command, *args, "--target", target)
    assert code == 2
    one_line_error(err, "--target", "greater than 1")


def spdy(*args: str, cwd: Path) -> subprocess.Popen:
    """The real command line in a process of its own."""
    # SIGINT back to its default in the child: a shell's background jobs inherit it ignored, and Python
    # then installs no KeyboardInterrupt handler, so the Ctrl-C test would test the launcher, not spdy
    return subprocess.Popen([sys.executable, "-m", "spdy.cli", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_unknown_model_exits_2_without_traceback(tmp_path):
    proc = spdy("time", "no-such-model", "-o", "t.json", cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    one_line_error(err, "no-such-model", "not found")


def test_time_names_what_the_cuda_engine_times_before_the_model_loads(tmp_path):
    code, out, err = cli("time", "no-such-model", "--engine", "cuda", "-o", tmp_path / "t.json")
    assert code == 2 and out == ""
    one_line_error(err, "--engine cuda runs dense torch on a GPU", "--pattern structured")


@pytest.mark.parametrize("engine, pattern", [("cuda-2:4", "2:4"), ("cuda", "structured")])
def test_a_gpu_engine_without_a_gpu_stops_before_the_model_loads(tmp_path, engine, pattern):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the engine runs")
    code, out, err = cli("run", "no-such-model", "--engine", engine, "--pattern", pattern, "--work-dir", tmp_path)
    assert code == 2 and out == ""
    one_line_error(err, "timing backend cuda", "no CUDA GPU")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before writing {path}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    """The full default grid keeps `spdy database` busy for seconds after its manifest appears."""
    proc = spdy("database", "digits", "-o", "db", cwd=tmp_path)
    wait_for(tmp_path / "db" / "manifest.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "rerun the same command to resume" in err
    assert not list((tmp_path / "db").rglob("*.tmp"))


# Runs `spdy database` and SIGKILLs it halfway through writing its second unit file: the file
# stays a half-written temporary, the manifest names only the first unit.
KILLED_MID_WRITE = """
import os, signal, sys
from spdy.cli import main
from spdy.database import build

real, written = build.replace_atomically, []

def replace_atomically(path, write):
    if path.suffix == ".safetensors":
        written.append(path)
        if len(written) == 2:
            def half_then_killed(tmp):
                write(tmp)
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half_then_killed)
    return real(path, write)

build.replace_atomically = replace_atomically
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_a_kill_mid_write_matches_an_uninterrupted_build(chain, tmp_path):
    args = ["database", "digits", *LEVELS, "-o", tmp_path / "db", "--json"]
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((tmp_path / "db").rglob("*.tmp"))) == 1
    assert len(json.loads((tmp_path / "db" / "manifest.json").read_text())["units"]) == 1

    code, out, err = cli(*args)
    assert code == 0, err
    assert json.loads(out) == {**chain["database"], "directory": str(tmp_path / "db")}
    assert not list((tmp_path / "db").rglob("*.tmp"))
    resumed = json.loads((tmp_path / "db" / "manifest.json").read_text())
    reference = json.loads((chain["db"] / "manifest.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "units"} == {k: v for k, v in reference.items() if k != "units"}
    assert set(resumed["units"]) == set(reference["units"])
    for unit, entry in reference["units"].items():
        assert resumed["units"][unit]["sha256"] == entry["sha256"], unit
        assert resumed["units"][unit]["relative_error"] == entry["relative_error"], unit
    assert Database.open(tmp_path / "db").check() == {}
