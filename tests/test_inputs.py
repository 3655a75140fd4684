"""Inputs that cannot hurt: broken data, impossible targets, empty unit selections, odd option
spellings and databases or profiles of another model are refused up front with a message that
names the place, on small real digits MLPs (no mocks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from spdy.cli import main
from spdy.database import DatabaseError, build_database, model_fingerprint
from spdy.errors import InputError
from spdy.levels import options_for
from spdy.pipeline import SearchSettings, find_profile, load_bundle, options_of
from spdy.search.dp import solve
from spdy.search.evaluate import Evaluator
from spdy.search.evolution import EvoConfig, EvolutionSearch
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable
from spdy.units import find_units

MODULE = "spdy_test_inputs_models"
LEVELS = "0.5,0.9"

pytestmark = pytest.mark.usefixtures("one_thread")  # steady on a shared machine; the MLPs train the same each time

# Models as `module:function` specs: small digits MLPs (one epoch) that share shapes and data but
# not weights, and models whose data or dense output is broken.
SOURCE = '''
import copy
import functools

import torch
from torch import nn
from spdy.models.digits import digits_data, digits_mlp

(train, _), (test, _) = digits_data(0, 32, images=False)
CALIBRATION, HELDOUT = train[:4], test[:2]


@functools.lru_cache
def _trained(seed):
    return digits_mlp(hidden=32, depth=1, epochs=1, batch_size=32, seed=seed).model


def mlp(seed):
    return copy.deepcopy(_trained(seed))


def seed0():
    return mlp(0), CALIBRATION, HELDOUT


def seed1():
    return mlp(1), CALIBRATION, HELDOUT


def nan_calibration():
    calibration = [b.clone() for b in CALIBRATION]
    calibration[2][5, 7] = float("nan")
    return mlp(0), calibration, HELDOUT


def inf_heldout():
    heldout = [b.clone() for b in HELDOUT]
    heldout[1][0, 0] = float("inf")
    return mlp(0), CALIBRATION, heldout


def nan_output():
    model = mlp(0)
    with torch.no_grad():
        model[0].weight[3, 0] = float("inf")  # the first input pixel is 0 somewhere: inf * 0 = NaN
    return model, CALIBRATION, HELDOUT


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids)).mean(1)


def token_batches():
    ids = torch.arange(64).reshape(4, 16) % 40
    return [{"input_ids": ids, "attention_mask": torch.ones(4, 16)} for _ in range(3)]


def tokens_inf_embedding():
    torch.manual_seed(0)
    model = Tokens()
    with torch.no_grad():
        model.embed.weight[7] = float("inf")
    return model.eval(), token_batches()


def tokens_nan_mask():
    torch.manual_seed(0)
    batches = token_batches()
    batches[1]["attention_mask"] = batches[1]["attention_mask"].clone()
    batches[1]["attention_mask"][0, 3] = float("nan")
    return Tokens().eval(), batches
'''


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    sys.path.insert(0, str(folder))
    yield lambda name: f"{MODULE}:{name}"
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def built(specs, tmp_path_factory, one_thread):
    """Both MLPs, a database of each, and a timing table every search can meet 1.5x on."""
    work = tmp_path_factory.mktemp("built")
    bundles, dbs = {}, {}
    for seed in (0, 1):
        bundle, units = load_bundle(specs(f"seed{seed}"))
        bundles[seed] = (bundle, units)
        dbs[seed] = build_database(bundle.model, units, bundle.calibration, options_of("unstructured", [0.5, 0.9]),
                                   work / f"db{seed}", pruner="magnitude", progress=False)
    times = {u: {"0.0000": 1.0, "0.5000": 0.6, "0.9000": 0.2} for u in bundles[0][1]}
    table = TimingTable(times, base=3.5, fixed=0.5)
    table.save(work / "timings.json")
    return bundles, dbs, table, work


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# -- 1. non-finite data or dense outputs -------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("nan_calibration", r"calibration batch 2 \(of 4\): input holds 1 NaN or inf value"),
    ("inf_heldout", r"heldout batch 1 \(of 2\): input holds 1 NaN or inf value"),
    ("nan_output", r"dense model's output on calibration batch 0 \(of 4\) is already non-finite"),
    ("tokens_inf_embedding", r"dense model's output on calibration batch 0 \(of 3\)"),
    ("tokens_nan_mask", r"calibration batch 1 \(of 3\): input\['attention_mask'\] holds 1 NaN"),
])
def test_non_finite_data_or_dense_output_is_refused_when_loading(specs, name, expected):
    with pytest.raises(InputError, match=expected):
        load_bundle(specs(name))


def test_the_cli_refuses_broken_data_before_any_stage(specs, tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["run", specs("nan_calibration"), "--target", "1.5", "--work-dir", str(work)]) == 2
    assert "calibration batch 2" in error_line(capsys)
    assert not (work / "run.json").exists() or json.loads((work / "run.json").read_text())["last"] == []
    assert not list(work.glob("timings-*")) and not list(work.glob("database-*"))


def test_evaluator_refuses_a_non_finite_dense_reference(specs):
    bundle, _ = load_bundle(specs("seed0"))
    broken = [b.clone() for b in bundle.calibration]
    broken[3][0, 0] = float("nan")
    with pytest.raises(InputError, match=r"heldout batch 3 \(of 4\) holds NaN"):
        Evaluator(bundle.model, broken, "mse", split="heldout")
    with pytest.raises(InputError, match=r"labels for evaluation batch 0"):
        Evaluator(bundle.model, broken[:1], "ce", labels=[torch.tensor([[float("nan")] * 10] * 32)])


def _table() -> TimingTable:
    times = {u: {"0.0000": 1.0, "0.5000": 0.6, "0.9000": 0.2} for u in ("a", "b", "c")}
    return TimingTable(times, base=3.5, fixed=0.5)


def test_evolution_replaces_a_nan_start():
    """NaN < x is False: a NaN incumbent used to be kept forever and returned as the result."""
    table = _table()
    search = EvolutionSearch(table, 1.5, lambda profile, batches: 0.0, 4, EvoConfig(generations=3, offspring=4), progress=False)
    start = dict(search.start)

    def evaluate(profile, batches):
        return math.nan if dict(profile) == start else sum(float(k) for k in profile.values())

    search.evaluate = evaluate
    result = search.run()
    assert result.options != start and math.isfinite(result.calibration_loss)
    assert result.predicted_speedup >= 1.5


def test_evolution_with_only_broken_candidates_says_so():
    search = EvolutionSearch(_table(), 1.5, lambda profile, batches: math.nan, 4, EvoConfig(generations=2, offspring=2), progress=False)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        search.run()


# -- 2. targets that are no speedup -------------------------------------------------------------

@pytest.mark.parametrize("target", ["1", "0.5", "0", "-2", "nan", "inf"])
@pytest.mark.parametrize("command", ["solve", "search", "verify", "run"])
def test_a_bad_target_is_refused_before_any_work(command, target, tmp_path, capsys):
    missing, work = str(tmp_path / "missing.json"), tmp_path / "work"
    argv = {
        "solve": ["solve", missing],
        "search": ["search", "no-such-model", "--timings", missing, "--database", missing, "--checkpoint-dir", str(work)],
        "verify": ["verify", "no-such-model", "--profile", missing],
        "run": ["run", "no-such-model", "--work-dir", str(work)],
    }[command]
    started = time.perf_counter()
    assert main([*argv, "--target", target]) == 2
    assert time.perf_counter() - started < 1.0
    line = error_line(capsys)
    assert f"--target {float(target)!r}: a target speedup must be greater than 1" in line, line
    assert "not found" not in line and "does not exist" not in line  # checked before the model or files
    assert not work.exists()


def test_the_python_api_refuses_a_bad_target(built):
    bundles, dbs, table, _ = built
    bundle, units = bundles[0]
    for target in (1.0, 0.5, -1.0, math.nan):
        with pytest.raises(InputError, match="greater than 1"):
            solve(table, target)
        with pytest.raises(InputError, match="greater than 1"):
            table.budget(target)
        with pytest.raises(InputError, match="greater than 1"):
            find_profile(bundle, units, table, dbs[0], target, SearchSettings("uniform"), progress=False)


# -- 3. include/exclude that leave nothing ------------------------------------------------------

def test_patterns_that_leave_no_unit_are_refused(specs, tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match=r"--include \['0', '2'\] with --exclude \['\*'\] leaves no prunable layer"):
        find_units(model, ["0", "2"], ["*"])
    with pytest.raises(InputError, match=r"--include all with --exclude \['0', '2'\]"):
        find_units(model, None, ["0", "2"])
    out = tmp_path / "db"
    assert main(["database", specs("seed0"), "--include", "0", "--exclude", "0", "--levels", LEVELS, "-o", str(out)]) == 2
    assert "--include ['0'] with --exclude ['0'] leaves no prunable layer" in error_line(capsys)
    assert not out.exists()


# -- 4. one option, one key ----------------------------------------------------------------------

def test_profile_option_spellings_become_one_key(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"options": {"a": "0.9", "b": "0.9000", "c": "0.90", "d": "4x1@0.5"}}))
    loaded = Profile.load(path)
    assert loaded.options == {"a": "0.9000", "b": "0.9000", "c": "0.9000", "d": "4x1@0.5000"}
    assert Profile({"a": "0.90", "b": "0"}).options == {"a": "0.9000", "b": "0.0000"}
    assert Profile({"a": "0.9"}).options == Profile({"a": "0.9000"}).options


@pytest.mark.parametrize("options, expected", [
    ({"a": "0.9", "fc2": "ninety"}, r"unit 'fc2': option key 'ninety'"),
    ({"fc2": "1.5"}, r"unit 'fc2': sparsity must be in \[0, 1\)"),
    ({"fc2": "nan"}, r"unit 'fc2': sparsity must be in \[0, 1\)"),
    ({"fc2": 0.9}, r"unit 'fc2': option key 0.9: expected a string"),
])
def test_profile_values_that_are_no_option_name_the_unit(options, expected, tmp_path):
    with pytest.raises(InputError, match=expected):
        Profile(options)
    if isinstance(options["fc2"], str):
        path = tmp_path / "profile.json"
        path.write_text(json.dumps({"options": options}))
        with pytest.raises(InputError, match=f"{path}: {expected}"):
            Profile.load(path)


# -- 5. databases and profiles of another model ---------------------------------------------------

def test_the_weight_fingerprint_is_stable_and_tells_seeds_apart(built, tmp_path):
    bundles, _, _, _ = built
    a, b = bundles[0][0].model, bundles[1][0].model
    fingerprint = model_fingerprint(a)
    assert fingerprint == model_fingerprint(a) and fingerprint != model_fingerprint(b)
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    with torch.no_grad():
        a[0].weight.mul_(-1)
    try:
        assert model_fingerprint(a) != fingerprint
    finally:
        with torch.no_grad():
            a[0].weight.mul_(-1)
    assert model_fingerprint(a) == fingerprint
    # Another process (another memory layout, hash seed, thread count) reads the same weights the same.
    # Weights go by file: the MLP's training itself rounds differently on other thread counts.
    save_file(a.state_dict(), str(tmp_path / "weights.safetensors"))
    code = ("import torch; from torch import nn; from safetensors.torch import load_file; "
            "from spdy.database import model_fingerprint; "
            "m = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 10)); "
            f"m.load_state_dict(load_file({str(tmp_path / 'weights.safetensors')!r})); print(model_fingerprint(m))")
    other_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert other_run.stdout.strip() == fingerprint


def test_a_resumed_build_refuses_another_models_weights(built):
    bundles, dbs, _, _ = built
    bundle, units = bundles[0]
    with pytest.raises(DatabaseError, match=r"different model: the weights differ.*spdy database MODEL -o NEW_DIR"):
        build_database(bundle.model, units, bundle.calibration, options_for("unstructured", [0.5, 0.9]), dbs[1].directory,
                       pruner="magnitude", progress=False)


def test_search_refuses_another_models_database(built):
    bundles, dbs, table, _ = built
    bundle, units = bundles[0]
    with pytest.raises(DatabaseError, match="the weights differ"):
        find_profile(bundle, units, table, dbs[1], 1.5, SearchSettings("uniform"), progress=False)
    profile = find_profile(bundle, units, table, dbs[0], 1.5, SearchSettings("uniform"), progress=False)
    assert profile.meta["model_fingerprint"] == model_fingerprint(bundle.model)


@pytest.mark.filterwarnings("ignore:SPEEDUP MISSED")  # a made-up timing table: only the refusals matter here
def test_cli_search_and_verify_refuse_another_models_database_and_profile(built, specs, capsys):
    _, dbs, _, work = built
    timings, seed0 = str(work / "timings.json"), specs("seed0")
    search = ["search", seed0, "--timings", timings, "--target", "1.5", "--method", "uniform"]
    assert main([*search, "--database", str(dbs[1].directory)]) == 2
    assert "the weights differ" in error_line(capsys)
    assert main([*search, "--database", str(dbs[0].directory), "-o", str(work / "p0.json")]) == 0
    assert main(["search", specs("seed1"), "--timings", timings, "--target", "1.5", "--method", "uniform",
                 "--database", str(dbs[1].directory), "-o", str(work / "p1.json")]) == 0
    capsys.readouterr()

    verify = ["verify", seed0, "--rounds", "1", "--json"]
    assert main([*verify, "--profile", str(work / "p0.json"), "--database", str(dbs[1].directory)]) == 2
    assert "the weights differ" in error_line(capsys)
    assert main([*verify, "--profile", str(work / "p1.json")]) == 2
    assert f"--profile {work / 'p1.json'} was found for a different model: the weights differ" in error_line(capsys)
    assert main([*verify, "--profile", str(work / "p0.json"), "--database", str(dbs[0].directory)]) in (0, 1)
    plain = work / "plain.json"  # a profile without a fingerprint (spdy solve's) is still accepted
    plain.write_text(json.dumps({"profile": Profile.load(work / "p1.json").sparsities}))
    assert main([*verify, "--profile", str(plain)]) in (0, 1)


def test_spdy_anchors_are_checked_and_none_spells_random_starts_only():
    from spdy.pipeline import ANCHORS, RunConfig

    with pytest.raises(InputError, match=r"SPDY anchors \['evo'\]: choose among uniform, global-magnitude, dp-errors, owl \(or none\)"):
        SearchSettings(anchors="uniform,evo")
    assert SearchSettings(anchors="uniform,owl").anchors == ("uniform", "owl")
    assert SearchSettings(anchors=" none ").anchors == () and SearchSettings().anchors == ANCHORS
    cfg = RunConfig(model="digits", target=1.5, anchors="none")
    assert cfg.anchors == () and cfg.settings("spdy").anchors == () and "--anchors none" in cfg.command_line()
    assert RunConfig(model="digits", target=1.5, anchors=["dp-errors"]).command_line().endswith("--anchors dp-errors")


@pytest.mark.parametrize("restarts", [0, -1, 1.5, "2"])
def test_restarts_need_a_whole_number_of_searches(restarts):
    from spdy.pipeline import RunConfig

    with pytest.raises(InputError, match=rf"--restarts {restarts!r}: need a whole number of searches, 1 or more"):
        RunConfig(model="digits", target=1.5, restarts=restarts)
    cfg = RunConfig(model="digits", target=1.5, restarts=3)
    assert cfg.settings("spdy").restarts == 3 and cfg.command_line().endswith("--restarts 3")
