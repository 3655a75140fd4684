"""The pruned-weight database on real MiniLM-L6 calibration data (no mocks)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from spdy.database import Database, DatabaseError, Pattern, Stitcher, build_database, capture, make_pruner, relative_error, stitch
from spdy.levels import Option, options_for
from spdy.models import load_model
from spdy.units import call_model, find_units, set_weight_matrix, weight_matrix

LEVELS = [0.4, 0.7, 0.9]
QUERY = "bert.encoder.layer.2.attention.self.query"  # 384 x 384
UP = "bert.encoder.layer.2.intermediate.dense"  # 1536 x 384
DOWN = "bert.encoder.layer.2.output.dense"  # 384 x 1536


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return load_model("minilm", samples=16)


@pytest.fixture(scope="module")
def units(bundle):
    return find_units(bundle.model, bundle.include)


@pytest.fixture(scope="module")
def stats(bundle, units):
    chosen = {n: units[n] for n in (QUERY, UP, DOWN)}
    return capture(bundle.model, chosen, bundle.calibration, rows=4096)


def layer(units, index: int, names=None) -> dict:
    prefix = f"bert.encoder.layer.{index}."
    return {n: u for n, u in units.items() if n.startswith(prefix) and (names is None or n[len(prefix):] in names)}


def pruned_tiles(w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Tile mask of tiles whose weights are all zero."""
    zero = (w == 0).float()
    return pattern.pool(zero) == pattern.pool(torch.ones_like(zero))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4x1", "16x16", "3x5"])
@pytest.mark.parametrize("pruner", ["magnitude", "obs", "adaprune"])
def test_exact_sparsity_and_nested_masks(stats, units, pattern, pruner):
    p = Pattern.parse(pattern)
    algorithm = make_pruner(pruner, passes=1, batch=4096) if pruner == "adaprune" else make_pruner(pruner)
    for name in (QUERY, UP):
        weights = algorithm.prune(weight_matrix(units[name]), stats[name], options_for(pattern, LEVELS))
        previous = None
        for key, w in weights.items():
            option = Option.parse(key)
            tiles = pruned_tiles(w, p)
            if p.nm and not option.is_dense:
                n, m = p.nm
                assert torch.equal((w == 0).reshape(w.shape[0], -1, m).sum(-1), torch.full((w.shape[0], w.shape[1] // m), n)), key
            else:
                assert int(tiles.sum()) == p.count(tuple(w.shape), option.sparsity), (name, key)
            if previous is not None:
                assert bool(tiles[previous].all()), f"{name} {key}: a zero tile of the previous level came back"
            previous = tiles


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_and_adaprune_beat_magnitude(stats, units, pattern):
    options = options_for(pattern, [0.5, 0.9])
    for name in (QUERY, UP, DOWN) if pattern == "unstructured" else (QUERY, UP):
        w, s = weight_matrix(units[name]), stats[name]
        errors = {
            pruner: {k: relative_error(w, p, s.hessian) for k, p in make_pruner(pruner, **kw).prune(w, s, options).items()}
            for pruner, kw in (("magnitude", {}), ("obs", {}), ("adaprune", {"passes": 2}))
        }
        for key in errors["magnitude"]:
            if key != "0.0000":
                assert errors["obs"][key] < errors["magnitude"][key], (name, key, errors)
                assert errors["adaprune"][key] < errors["magnitude"][key], (name, key, errors)


def test_relative_error_from_hessian_matches_outputs(stats, units):
    """sqrt(tr(D H D^T) / tr(W H W^T)) is ||W_p X - W X|| / ||W X|| on the captured inputs."""
    s = stats[UP]
    assert s.rows.shape[0] == s.count  # 16 x 128 tokens all kept
    w = weight_matrix(units[UP])
    pruned = make_pruner("obs").prune(w, s, [Option(0.7)])["0.7000"]
    direct = (s.rows.double() @ (pruned - w).double().t()).norm() / (s.rows.double() @ w.double().t()).norm()
    assert relative_error(w, pruned, s.hessian) == pytest.approx(float(direct), rel=1e-5)


def unit_outputs(model, unit, batches) -> torch.Tensor:
    """Everything ``unit`` outputs while the model runs ``batches``."""
    seen = []
    hook = unit.module.register_forward_hook(lambda module, args, out: seen.append(out.detach().flatten()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    hook.remove()
    return torch.cat(seen).double()


def test_capture_conv2d_and_hf_conv1d_layouts():
    """Unfolded conv rows and Conv1D's transposed weight give the true output error."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=False), nn.Flatten(1), Conv1D(16, 128))
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    units = find_units(model)
    assert sorted(u.kind for u in units.values()) == ["conv1d", "conv2d"]
    s = capture(model, units, batches)
    for name, unit in units.items():
        w = weight_matrix(unit).clone()
        original = unit.module.weight.detach().clone()
        dense = unit_outputs(model, unit, batches)
        pruned = make_pruner("obs").prune(w, s[name], [Option(0.6)])["0.6000"]
        set_weight_matrix(unit, pruned)
        diff = unit_outputs(model, unit, batches) - dense
        unit.module.weight.data.copy_(original)
        assert relative_error(w, pruned, s[name].hessian) == pytest.approx(float(diff.norm() / dense.norm()), rel=1e-5)


@pytest.fixture(scope="module")
def db(bundle, units, tmp_path_factory):
    return build_database(bundle.model, layer(units, 0), bundle.calibration, options_for("unstructured", LEVELS), tmp_path_factory.mktemp("db"), progress=False)


def test_database_contents_and_summary(db, units, stats):
    assert db.units == list(layer(units, 0))
    assert db.options(db.units[0]) == ["0.0000", "0.4000", "0.7000", "0.9000"]
    manifest = json.loads((db.directory / "manifest.json").read_text())
    assert manifest["pruner"] == {"name": "obs", "params": {"damp": 0.01, "block": 128, "refine": 10}}
    assert manifest["calibration"]["samples"] == 16
    for unit in db.units:
        dense = db.weight(unit, "0.0000")
        assert torch.equal(dense, weight_matrix(units[unit]))
        errors = db.relative_errors()[unit]
        assert errors["0.0000"] == 0.0 and errors["0.4000"] < errors["0.7000"] < errors["0.9000"] < 1.0
        assert int((db.weight(unit, "0.9000") == 0).sum()) == round(0.9 * dense.numel())
    summary = db.summary()
    assert summary["entries"] == 6 * 4
    assert list(summary["relative_error"]) == ["0.0000", "0.4000", "0.7000", "0.9000"]
    with pytest.raises(DatabaseError, match="no option '0.5000'"):
        db.weight(db.units[0], "0.5000")
    with pytest.raises(DatabaseError, match="not in the database"):
        db.weight("bert.pooler.dense", "0.9000")


def test_stitch_then_restore_is_bit_exact(db, units, bundle):
    chosen = layer(units, 0)
    before = {n: u.module.weight.detach().clone() for n, u in chosen.items()}
    pointers = {n: u.module.weight.data_ptr() for n, u in chosen.items()}
    profile = {n: ["0.4000", "0.7000", "0.9000"][i % 3] for i, n in enumerate(chosen)}
    batch = bundle.calibration[0]
    with torch.no_grad():
        dense_out = call_model(bundle.model, batch)
        with stitch(chosen, db, profile):
            for n, u in chosen.items():
                assert torch.equal(weight_matrix(u), db.weight(n, profile[n]))
                assert u.module.weight.data_ptr() == pointers[n]
            pruned_out = call_model(bundle.model, batch)
        assert not torch.equal(pruned_out, dense_out)
        for n, u in chosen.items():
            assert torch.equal(u.module.weight, before[n]), n
        assert torch.equal(call_model(bundle.model, batch), dense_out)

    stitcher = Stitcher(chosen, db)
    for profile in ({n: "0.9000" for n in chosen}, {next(iter(chosen)): "0.4000"}, {}):
        with stitcher(profile):
            for n, u in chosen.items():
                assert torch.equal(weight_matrix(u), db.weight(n, profile.get(n, "0.0000")))
        for n, u in chosen.items():
            assert torch.equal(u.module.weight, before[n]), n


def small_build(bundle, units, directory, **kw):
    chosen = layer(units, 1, ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"))
    return build_database(bundle.model, chosen, bundle.calibration, options_for("unstructured", [0.5, 0.9]), directory, "magnitude", progress=False, **kw)


class Interrupt(Exception):
    pass


def test_resume_after_interrupted_build(bundle, units, tmp_path):
    built = []

    def stop_after_two(name):
        built.append(name)
        if len(built) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        small_build(bundle, units, tmp_path, on_unit=stop_after_two)
    partial = Database.open(tmp_path)
    assert partial.units == built
    mtimes = {u: os.stat(partial.path(u)).st_mtime_ns for u in built}

    rebuilt = []
    db = small_build(bundle, units, tmp_path, on_unit=rebuilt.append)
    assert len(db.units) == 4 and set(rebuilt).isdisjoint(built) and len(rebuilt) == 2
    assert {u: os.stat(db.path(u)).st_mtime_ns for u in built} == mtimes
    assert db.check() == {}


def test_a_parallel_build_starts_the_longest_units_and_records_the_local_order(bundle, units, tmp_path):
    chosen = layer(units, 1, ("attention.self.query", "intermediate.dense", "output.dense", "attention.output.dense"))
    opts = options_for("unstructured", [0.5, 0.9])
    started = []

    def in_turn(fn, jobs):  # a one-worker executor: runs the jobs in the order handed over
        for job in jobs:
            started.append(job[0])
            yield fn(*job)

    parallel = build_database(bundle.model, chosen, bundle.calibration, opts, tmp_path / "parallel", "magnitude", progress=False, executor=in_turn)
    local = build_database(bundle.model, chosen, bundle.calibration, opts, tmp_path / "local", "magnitude", progress=False)
    prefix = "bert.encoder.layer.1."
    # 384 x 1536 (384 x 1536^2 = 9.1e8) before 1536 x 384 (2.3e8) and the two 384 x 384 (5.7e7), ties in model order
    assert started == [prefix + n for n in ("output.dense", "intermediate.dense", "attention.self.query", "attention.output.dense")]
    assert parallel.units == local.units == list(chosen)
    assert {u: e["sha256"] for u, e in parallel.manifest["units"].items()} == {u: e["sha256"] for u, e in local.manifest["units"].items()}


def test_corrupt_and_missing_files_are_reported_and_rebuilt(bundle, units, tmp_path):
    db = small_build(bundle, units, tmp_path)
    corrupt, missing = db.units[1], db.units[2]
    data = bytearray(db.path(corrupt).read_bytes())
    data[-100] ^= 0xFF
    db.path(corrupt).write_bytes(bytes(data))
    db.path(missing).unlink()

    reopened = Database.open(tmp_path)
    with pytest.raises(DatabaseError, match=f"{corrupt}.*corrupt"):
        reopened.weight(corrupt, "0.5000")
    with pytest.raises(DatabaseError, match=f"{missing}.*missing"):
        reopened.weight(missing, "0.5000")
    problems = reopened.check()
    assert set(problems) == {corrupt, missing}
    assert str(reopened.path(corrupt)) in problems[corrupt]

    rebuilt = []
    repaired = small_build(bundle, units, tmp_path, on_unit=rebuilt.append)
    assert sorted(rebuilt) == sorted([corrupt, missing])
    assert repaired.check() == {}
    assert repaired.weight(corrupt, "0.5000").shape == (384, 384)


def test_bad_inputs_give_clear_errors(bundle, units, tmp_path):
    chosen = layer(units, 1, ("attention.self.query",))
    options = options_for("unstructured", [0.5])
    with pytest.raises(ValueError, match="unknown pruner 'sparsegpt'.*obs"):
        build_database(bundle.model, chosen, bundle.calibration, options, tmp_path, "sparsegpt")
    with pytest.raises(ValueError, match="no parameter 'lr'.*damp"):
        build_database(bundle.model, chosen, bundle.calibration, options, tmp_path, "obs", lr=0.1)
    with pytest.raises(ValueError, match="unknown pattern"):
        Option(0.5, "diagonal")
    with pytest.raises(ValueError, match="mix patterns"):
        build_database(bundle.model, chosen, bundle.calibration, options + options_for("4x1", [0.5]), tmp_path)
    with pytest.raises(ValueError, match="not a multiple of 5"):
        build_database(bundle.model, chosen, bundle.calibration, options_for("2:5"), tmp_path)
    with pytest.raises(DatabaseError, match="manifest.json is missing"):
        Database.open(tmp_path / "nowhere")

    build_database(bundle.model, chosen, bundle.calibration, options, tmp_path, "magnitude", progress=False)
    with pytest.raises(DatabaseError, match="different pruner.*new directory"):
        build_database(bundle.model, chosen, bundle.calibration, options, tmp_path, "obs", progress=False)
    with pytest.raises(DatabaseError, match="different pattern"):
        build_database(bundle.model, chosen, bundle.calibration, options_for("4x1", [0.5]), tmp_path, "magnitude", progress=False)
    with pytest.raises(DatabaseError, match="different calibration"):
        build_database(bundle.model, chosen, bundle.calibration[:1], options, tmp_path, "magnitude", progress=False)
    weight = next(iter(chosen.values())).module.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(2)
    try:
        with pytest.raises(DatabaseError, match="different model"):
            build_database(bundle.model, chosen, bundle.calibration, options, tmp_path, "magnitude", progress=False)
    finally:
        weight.data.copy_(original)
    with pytest.raises(DatabaseError, match="not in the database"):
        Stitcher(layer(units, 1), Database.open(tmp_path))


def test_obs_kernels_match_torch(monkeypatch):
    """The numba sweep and sparse-row product give torch's results (numba-less environments run torch's)."""
    from spdy.database import obs_kernels
    from spdy.runtime import cpu

    if cpu.numba is None:
        pytest.skip("numba not installed")
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(256, 256, generator=generator)
    H = A @ A.t() / 256 + torch.eye(256)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    W = torch.randn(200, 128, generator=generator)
    mask = torch.rand(200, 128, generator=generator) < 0.7
    keep = torch.rand(200, 256, generator=generator) < 0.3
    P = torch.randn(200, 256, generator=generator) * keep
    fast_w = W.clone()
    fast_errors = obs_kernels.prune_block(fast_w, U[:128, :128], mask)
    fast_product = obs_kernels.MaskedRows(keep, H)
    assert fast_product.sparse
    torch.testing.assert_close(fast_product(P), P @ H, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu, "numba", None)
    slow_w = W.clone()
    slow_errors = obs_kernels.prune_block(slow_w, U[:128, :128], mask)
    assert not obs_kernels.MaskedRows(keep, H).sparse
    torch.testing.assert_close(fast_w, slow_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_errors, slow_errors, rtol=1e-5, atol=1e-5)
    assert bool((fast_w[mask] == 0).all())


# OBS's errors at 40/70/90% before its kernels (torch column loop, 13 products per CG level), 16 samples
OBS_BEFORE = {
    QUERY: (0.05662, 0.17415, 0.37887),
    UP: (0.04572, 0.14205, 0.29924),
    DOWN: (0.02447, 0.08032, 0.17923),
}


def test_obs_error_no_worse_than_before(stats, units):
    for name, before in OBS_BEFORE.items():
        w = weight_matrix(units[name])
        pruned = make_pruner("obs").prune(w, stats[name], options_for("unstructured", LEVELS))
        for level, old in zip(LEVELS, before):
            assert relative_error(w, pruned[Option(level).key], stats[name].hessian) <= old * 1.01, (name, level)
