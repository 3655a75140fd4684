"""Scale-out on a real local Ray instance (2 CPUs, no mocks): the database's units as Ray tasks and the
searches' candidates on a pool of Ray actors give exactly what a local run gives, also when a
worker process is killed mid-task; without --cluster nothing imports Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

import spdy  # noqa: E402
from spdy.cli import main  # noqa: E402
from spdy.cluster import RayCluster, parse_cluster  # noqa: E402
from spdy.database import Stitcher, build_database  # noqa: E402
from spdy.errors import InputError  # noqa: E402
from spdy.levels import DENSE, Option, options_for  # noqa: E402
from spdy.models.digits import digits_mlp  # noqa: E402
from spdy.search.evaluate import Evaluator  # noqa: E402
from spdy.search.evolution import EvoConfig, EvolutionSearch  # noqa: E402
from spdy.search.spdy import SpdyConfig, SpdySearch  # noqa: E402
from spdy.timing.table import TimingTable  # noqa: E402
from spdy.units import find_units  # noqa: E402

LEVELS = [0.5, 0.7, 0.8, 0.9, 0.95]
SRC = str(Path(spdy.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def cluster(one_thread):
    """One local Ray instance for the module, stopped after it (no raylet left behind)."""
    with RayCluster("ray", cpus=2) as connected:
        yield connected


def synthetic_table(units) -> TimingTable:
    keys = [DENSE] + [o.key for o in options_for("unstructured", LEVELS)]
    times = {u: {k: unit.weight_shape[0] * unit.weight_shape[1] * 1e-9 * (0.2 + 0.8 * (1 - Option.parse(k).sparsity) ** (0.5 + 0.3 * i))
                 for k in keys} for i, (u, unit) in enumerate(units.items())}
    dense = sum(t[DENSE] for t in times.values())
    return TimingTable(times, base=1.25 * dense, fixed=0.25 * dense)


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory):
    """The digits MLP, a synthetic timing table with real trade-offs (as in test_search) and a local OBS database."""
    bundle = digits_mlp(hidden=384, depth=5)
    units = find_units(bundle.model)
    table = synthetic_table(units)
    db = build_database(bundle.model, units, bundle.calibration, options_for("unstructured", LEVELS),
                        tmp_path_factory.mktemp("local"), progress=False)
    stitcher = Stitcher(units, db)
    evaluator = Evaluator(bundle.model, bundle.calibration, "kl", apply=stitcher.apply)
    yield bundle, units, table, db, evaluator, 1 + 0.5 * (table.max_speedup() - 1), stitcher
    stitcher.restore()


def kill_busy(title: str, timeout: float = 30.0) -> int | None:
    """SIGKILL the first Ray worker process found running ``title`` (Ray names a busy worker ``ray::<task>``,
    an idle one ``ray::IDLE``); its pid, or None if none was busy within ``timeout`` seconds."""
    deadline, workers, scanned = time.monotonic() + timeout, [], 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - scanned > 0.2:  # a full scan finds new workers; in between, only theirs is read
            workers = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::")]
            scanned = time.monotonic()
        for p in workers:
            try:
                busy = p.cmdline()[0].startswith(title)
            except (psutil.Error, IndexError):
                continue
            if busy:
                os.kill(p.pid, signal.SIGKILL)
                return p.pid
        time.sleep(0.001)
    return None


def killer(title: str) -> tuple[threading.Thread, list[int]]:
    """`kill_busy` in a thread, while the test runs a search; the killed pid lands in the list."""
    killed: list[int] = []
    thread = threading.Thread(target=lambda: killed.extend(p for p in [kill_busy(title)] if p), daemon=True)
    thread.start()
    return thread, killed


def same_database(a, b) -> None:
    assert list(a.manifest["units"]) == list(b.manifest["units"])  # recorded in the local build's order
    for unit, entry in a.manifest["units"].items():
        other = b.manifest["units"][unit]
        assert (other["sha256"], other["size"]) == (entry["sha256"], entry["size"]), unit  # the same bytes
        # computed from the same bytes; a BLAS may still round the float64 error differently in another process
        assert other["relative_error"] == pytest.approx(entry["relative_error"], rel=1e-12, abs=0), unit


def test_workers_run_this_code(cluster):
    where = ray.remote(lambda: __import__("spdy").__file__)
    assert str(Path(ray.get(where.remote())).resolve().parents[1]) == SRC


def test_database_on_ray_is_the_local_database(setup, cluster, tmp_path):
    bundle, units, _, local, _, _, _ = setup
    db = build_database(bundle.model, units, bundle.calibration, options_for("unstructured", LEVELS), tmp_path, progress=False,
                        executor=cluster.map_unordered)
    same_database(local, db)
    assert not db.check()


def test_an_interrupted_ray_build_resumes(setup, cluster, tmp_path, capsys):
    bundle, units, _, local, _, _, _ = setup
    opts = options_for("unstructured", LEVELS)

    def stop(name: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_database(bundle.model, units, bundle.calibration, opts, tmp_path, progress=False, executor=cluster.map_unordered, on_unit=stop)
    # the units in flight (two per worker, one of them the first in) ran to their end and were kept, not cancelled (a cancel
    # racing a task's completion aborted the driver on Ray 2.60), and it said so
    assert not [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::_run_task")]
    assert "keeping the 3 unit(s) still running on the cluster" in capsys.readouterr().err
    kept = json.loads((tmp_path / "manifest.json").read_text())["units"]
    assert len(kept) == 2 * cluster.workers < len(units)
    built = []
    db = build_database(bundle.model, units, bundle.calibration, opts, tmp_path, progress=False, executor=cluster.map_unordered,
                        on_unit=built.append)
    assert sorted(built) == sorted(set(units) - set(kept))
    same_database(local, db)


def test_a_worker_killed_mid_build_costs_only_its_task(setup, cluster, tmp_path):
    bundle, units, _, local, _, _, _ = setup
    killed = []

    def kill(name: str) -> None:  # when the first unit is in, the next tasks are running on both workers
        if not killed:
            killed.append(kill_busy("ray::_run_task", timeout=5))

    db = build_database(bundle.model, units, bundle.calibration, options_for("unstructured", LEVELS), tmp_path, progress=False,
                        executor=cluster.map_unordered, on_unit=kill)
    assert killed[0], "no build task was caught running"
    same_database(local, db)


SMALL = SpdyConfig(random_starts=6, tries=4, seed=3)


def same_search(a, b) -> None:
    assert a.options == b.options and a.calibration_loss == b.calibration_loss
    assert [dict(t, elapsed=0) for t in a.trace] == [dict(t, elapsed=0) for t in b.trace]
    for key in ("batch_evaluations", "full_evaluations"):
        assert a.meta[key] == b.meta[key]
    assert a.evaluations == b.evaluations


def test_spdy_on_a_ray_pool_is_the_serial_search(setup, cluster, tmp_path):
    _, units, table, db, evaluator, target, stitcher = setup
    serial = SpdySearch(table, target, evaluator, SMALL, progress=False).run()
    pool = cluster.pool(evaluator, stitcher)
    try:
        assert pool.width == 2
        parallel = SpdySearch(table, target, evaluator, SMALL, checkpoint=tmp_path / "s.json", progress=False, pool=pool).run()
    finally:
        pool.close()
    same_search(serial, parallel)
    assert parallel.meta["pool"]["width"] == 2
    # the loss log a resumed search reads back holds exactly what the serial search computed
    assert sum(len(json.loads(line)[3]) for line in (tmp_path / "s.evaluations.jsonl").read_text().splitlines()) == serial.meta["batch_evaluations"]


def test_evolution_on_a_ray_pool_is_the_serial_search(setup, cluster):
    bundle, units, table, db, evaluator, target, stitcher = setup
    cfg = EvoConfig(generations=3, offspring=4, seed=2)
    serial = EvolutionSearch(table, target, evaluator, len(bundle.calibration), cfg, progress=False).run()
    pool = cluster.pool(evaluator, stitcher)
    try:
        parallel = EvolutionSearch(table, target, evaluator, len(bundle.calibration), cfg, progress=False, pool=pool).run()
    finally:
        pool.close()
    same_search(serial, parallel)


def test_an_actor_killed_mid_search_costs_only_its_call(setup, cluster):
    _, units, table, db, evaluator, target, stitcher = setup
    cfg = SpdyConfig(random_starts=24, tries=12, seed=5)
    serial = SpdySearch(table, target, evaluator, cfg, progress=False).run()
    pool = cluster.pool(evaluator, stitcher)
    try:
        pids = pool.pids()  # the actors are up
        thread, killed = killer("ray::_Evaluating.call")
        parallel = SpdySearch(table, target, evaluator, cfg, progress=False, pool=pool).run()
        thread.join()
        assert killed and killed[0] in pids, "no evaluation was caught running"
        assert len(set(pool.pids()) - set(pids)) == 1  # Ray restarted the killed actor
    finally:
        pool.close()
    same_search(serial, parallel)


def test_calls_the_caller_gave_up_on_stop_at_their_next_batch(setup, cluster):
    """A local-search try sent ahead is dropped when an earlier one wins; its actor must not finish it first."""
    _, units, _, _, evaluator, _, stitcher = setup
    profile = {u: DENSE for u in units}

    def endless(ev, item):  # only a stop ends a call after the first
        while item:
            ev.losses(profile, 0, 1)
        return "first"

    pool = cluster.pool(evaluator, stitcher)
    try:
        results = pool.imap(endless, range(4))
        assert next(results) == "first"
        results.close()  # items 1 and 2 are running on the two actors
        done = ray.get([actor.call.remote(lambda ev, _: ev.passes, None) for actor in pool.actors], timeout=60)
        assert all(passes > 0 for passes in done)  # each actor ran its endless call, and left it
    finally:
        pool.close()


def test_cli_database_and_search_take_the_cluster_flag(cluster, tmp_path, capsys):
    table = synthetic_table(find_units(digits_mlp().model))  # the CLI's digits model
    target = 1 + 0.5 * (table.max_speedup() - 1)
    flags = ["--samples", "64", "--heldout", "0", "--validation", "0", "--quiet", "--json"]
    assert main(["database", "digits", "--levels", ",".join(map(str, LEVELS)), "-o", str(tmp_path / "db"), "--cluster", "ray", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["units"] == len(table.units)
    table.save(tmp_path / "t.json")
    assert main(["search", "digits", "--timings", str(tmp_path / "t.json"), "--database", str(tmp_path / "db"), "--target", f"{target:.3f}",
                 "--random-starts", "4", "--tries", "2", "--cluster", "ray", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_speedup"] >= round(target, 3) - 1e-9
    assert ray.is_initialized()  # the module's instance was used, not stopped


@pytest.mark.parametrize("spec", ["", "rya", "ray:", "dask:host:1"])
def test_bad_cluster_specs_name_the_flag(spec):
    with pytest.raises(InputError, match="--cluster"):
        parse_cluster(spec)


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_without_the_flag_nothing_imports_ray():
    out = python("import sys, spdy.cli, spdy.pipeline, spdy.cluster; from spdy.cli import build_parser; "
                 "build_parser().parse_args(['database', 'digits']); print('ray' in sys.modules)")
    assert out.stdout.strip() == "False", out.stderr


def test_absent_or_unreachable_ray_is_a_clear_error():
    absent = python("import sys; sys.modules['ray'] = None\nfrom spdy.cli import main\n"
                    "sys.exit(main(['database', 'digits', '--cluster', 'ray']))")
    assert absent.returncode == 2 and "pip install 'spdy[ray]'" in absent.stderr, absent.stderr
    unreachable = python("import sys\nfrom spdy.cli import main\nsys.exit(main(['database', 'digits', '--cluster', 'ray:127.0.0.1:1']))")
    assert unreachable.returncode == 2 and "no Ray cluster is reachable there" in unreachable.stderr, unreachable.stderr
