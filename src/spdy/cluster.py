"""Scale out on Ray: the database's unit reconstructions as Ray tasks, candidate evaluations on Ray actors.

``--cluster ray`` starts a Ray instance on this machine; ``--cluster ray:ADDRESS`` joins a running
cluster (``ray start --head`` prints the address). Ray is imported only here and only when a
cluster is asked for. The generic code sees two small hooks: `build_database`'s ``executor``
(`RayCluster.map_unordered`) and the searches' ``pool`` (`RayCluster.pool`, a `Pool`).

Workers read and write the database directory, so on several machines it must be on a file
system they share. A worker that dies mid-task costs that task only: Ray reruns it (tasks) or
restarts the actor and resends the call (pool), up to `RETRIES` times.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

import torch

import spdy
from spdy.errors import InputError
from spdy.database import Stitcher
from spdy.search.evaluate import Evaluator, Stopped
from spdy.units import Unit, set_weight_matrix

RETRIES = 3  # reruns of a task (restarts of an actor) whose worker died
FLAG = "--cluster"


def parse_cluster(spec: str) -> str | None:
    """The address in ``ray[:ADDRESS]`` (None: start Ray here); anything else is an `InputError` naming the flag."""
    kind, colon, address = spec.partition(":")
    if kind != "ray" or (colon and not address):
        raise InputError(f"{FLAG} {spec!r}: use ray (a Ray instance on this machine) or ray:ADDRESS (join a running cluster, "
                         "e.g. ray:10.0.0.5:6379 or ray:auto)")
    return address or None


def _reachable(address: str) -> None:
    """Fail in a second, naming the address, where Ray itself would retry for a minute."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"{FLAG} ray:{address}: the address needs a host and a port, e.g. ray:10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(f"{FLAG} ray:{address}: no Ray cluster is reachable there ({e.strerror or e}); start one with "
                         f"`ray start --head --port {port}` or use {FLAG} ray for a local one") from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(f"{FLAG} needs Ray, which is not installed: pip install 'spdy[ray]'") from None
    return ray


def _threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _owned(value: Any) -> Any:
    """``value`` with every tensor copied into memory torch allocated: a tensor read from the object store lies
    wherever Ray put it, and the BLAS may round differently at another alignment (results must equal a local run's)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_owned(v) for v in value)
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _owned(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    return value


def _run_task(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """A task's body on a worker: as many torch threads as the task has CPUs, no autograd (as `build_database` runs)."""
    _threads(threads)
    with torch.no_grad():
        return fn(*_owned(args))


class _Evaluating:
    """A pool actor: the calibration `Evaluator` on its own copy of the model, stitched from the database, held for the search."""

    def __init__(self, payload: tuple[Evaluator, Mapping[str, Unit], Mapping[str, torch.Tensor]], database: str, threads: int):
        from spdy.database import Database

        _threads(threads)
        evaluator, units, dense = payload  # sent together, so the units' modules are the evaluator's model's
        with torch.no_grad():
            for module in {id(u.module): u.module for u in units.values()}.values():
                for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    tensor.data = tensor.data.clone()  # see `_owned`
            for name, unit in units.items():
                set_weight_matrix(unit, dense[name])  # dense, whatever the model held when the pool was made
        evaluator.batches, evaluator.reference = _owned(evaluator.batches), _owned(evaluator.reference)
        self.evaluator = evaluator
        self.evaluator.apply = Stitcher(units, Database.open(database)).apply
        self.unwanted: set[int] = set()

    def call(self, fn: Callable[[Evaluator, Any], Any], item: Any, tag: int = -1) -> Any:
        """``fn(evaluator, item)``, or None once `stop` was called with ``tag`` (checked between batches)."""
        self.evaluator.stopped = lambda: tag in self.unwanted
        try:
            return fn(self.evaluator, item)
        except Stopped:
            return None
        finally:
            self.unwanted.discard(tag)

    def stop(self, tag: int) -> None:
        """Runs beside `call` (its own concurrency group): the call ``tag`` is no longer wanted."""
        self.unwanted.add(tag)

    def pid(self) -> int:
        return os.getpid()


class RayPool:
    """`Pool` of Ray actors, each with a copy of the calibration evaluator; `close` ends them."""

    def __init__(self, ray: Any, actors: list[Any], payload: Any):
        self.ray, self.actors, self.width = ray, actors, len(actors)
        self.tags = 0  # numbers the calls, for `_Evaluating.stop`
        self.payload = payload  # held: a restarted actor is made from it again

    def map(self, fn: Callable[[Evaluator, Any], Any], items: Sequence[Any]) -> list[Any]:
        from ray.util import ActorPool

        return list(ActorPool(self.actors).map(lambda actor, item: actor.call.remote(fn, item), list(items)))

    def imap(self, fn: Callable[[Evaluator, Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`Pool.imap`: results in item order, each free actor given the next item at once (at most two per actor
        sent ahead of the one the caller waits for); calls still running when the caller stops are stopped."""
        items, idle = iter(items), list(self.actors)
        queue: list[list] = []  # [ref, actor, done, result, tag] in item order

        def send() -> None:
            while idle and len(queue) < 2 * self.width:
                item = next(items, queue)  # the queue itself marks the end
                if item is queue:
                    return
                actor = idle.pop()
                self.tags += 1
                queue.append([actor.call.remote(fn, item, self.tags), actor, False, None, self.tags])

        try:
            send()
            while queue:
                if not queue[0][2]:
                    running = {entry[0]: entry for entry in queue if not entry[2]}
                    ready, _ = self.ray.wait(list(running), num_returns=1)
                    for ref in ready:
                        entry = running[ref]
                        entry[2:4] = True, self.ray.get(ref)
                        idle.append(entry[1])
                    send()
                    continue
                yield queue.pop(0)[3]
                send()
        finally:
            for ref, actor, done, _, tag in queue:
                if not done:
                    actor.stop.options(concurrency_group="control").remote(tag)

    def pids(self) -> list[int]:
        """The actors' worker processes (the fault tests kill one)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors, self.width = [], 0


class RayCluster:
    """A connection to Ray for the length of a ``with`` block: ``RayCluster("ray")`` or ``RayCluster("ray:HOST:PORT")``.

    ``cpus``: the CPUs a local instance gets (default: all); ``threads``: torch threads per task
    and per actor, which also take that many CPUs each. A Ray already started in this process
    (``ray.init``) is used as it is and left running.
    """

    def __init__(self, spec: str = "ray", cpus: int | None = None, threads: int = 1):
        self.address = parse_cluster(spec)
        if threads < 1:
            raise InputError(f"{FLAG}: threads per worker must be >= 1, got {threads}")
        self.cpus, self.threads = cpus, threads
        self.ray: Any = None
        self.started = False

    def __enter__(self) -> "RayCluster":
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address is not None:
                _reachable(self.address)
            code = str(Path(spdy.__file__).resolve().parents[1])  # the spdy this driver runs, not another install
            env = {"PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p),
                   "OMP_NUM_THREADS": str(self.threads), "NUMBA_NUM_THREADS": str(self.threads)}
            try:
                ray.init(address=self.address, num_cpus=self.cpus if self.address is None else None, include_dashboard=False,
                         log_to_driver=False, configure_logging=False, runtime_env={"env_vars": env})
            except ConnectionError as e:
                raise InputError(f"{FLAG} ray:{self.address}: could not join the Ray cluster there ({e})") from None
            self.started = True
        self.ray = ray
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()
        self.ray, self.started = None, False

    @property
    def workers(self) -> int:
        """How many tasks (or actors) run at once: the cluster's CPUs over the threads each takes."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)) // self.threads)

    def map_unordered(self, fn: Callable[..., Any], jobs: Iterable[tuple]) -> Generator[Any, None, None]:
        """``fn(*job)`` for every job as Ray tasks, results yielded as they finish (`build_database`'s executor).

        Arguments go through Ray's object store; at most twice as many jobs as workers are in flight, so
        the store holds a few units' statistics, not all of them. Interrupted (Ctrl-C while it waits, or a
        KeyboardInterrupt thrown in by the caller), it yields what is still running as it finishes, then
        raises; closed early, it returns once those have ended, so no task writes on after the caller."""
        ray = self.ray
        task = ray.remote(num_cpus=self.threads, max_retries=RETRIES)(_run_task)
        fn_ref = ray.put(fn)
        pending: list[Any] = []
        jobs = iter(jobs)
        interrupted = False  # once: no new job; the running ones are yielded as they finish, then it raises
        try:
            while True:
                while not interrupted and len(pending) < 2 * self.workers and (job := next(jobs, None)) is not None:
                    pending.append(task.remote(fn_ref, self.threads, *job))
                if not pending:
                    if interrupted:
                        raise KeyboardInterrupt
                    return
                try:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield ray.get(done[0])
                except KeyboardInterrupt:
                    if interrupted:  # Ctrl-C again: stop waiting
                        pending = []
                        raise
                    interrupted = True
                    print(f"spdy: interrupted; keeping the {len(pending)} unit(s) still running on the cluster as they finish "
                          "(Ctrl-C again stops waiting)", file=sys.stderr)
        finally:  # stopped another way (a task failed, or the caller closed us): no task may write on after it, so the
            # running ones end first. Not `ray.cancel`: a cancel that meets a task's completion aborts the driver in Ray 2.60
            # ("Tried to complete task that was not pending", ray-project/ray#54846); it killed a CI run of this project.
            if pending:
                print(f"spdy: waiting for the {len(pending)} unit(s) still running on the cluster to end", file=sys.stderr)
                ray.wait(pending, num_returns=len(pending))

    def pool(self, evaluator: Evaluator, stitcher: Stitcher, size: int | None = None) -> RayPool:
        """``size`` actors (default `workers`), each with a copy of ``evaluator`` whose model is made dense (from
        ``stitcher``'s snapshot) and stitched from ``stitcher``'s database, which the workers open themselves.

        The model, its batches and its dense outputs are sent once, through the object store."""
        ray = self.ray
        shipped = copy.copy(evaluator)
        shipped.apply = None  # the stitcher's open files stay here
        payload = ray.put((shipped, dict(stitcher.units), stitcher.dense))
        actor = ray.remote(num_cpus=self.threads, max_restarts=RETRIES, max_task_retries=RETRIES,
                           concurrency_groups={"control": 1})(_Evaluating)  # calls one at a time; `stop` beside them
        actors = [actor.remote(payload, str(stitcher.db.directory), self.threads) for _ in range(size or self.workers)]
        return RayPool(ray, actors, payload)


@contextmanager
def connect(cluster: str | RayCluster | None) -> Iterator[RayCluster | None]:
    """The cluster a pipeline stage runs on: None (here), a ``--cluster`` spec (connected for the block), or a
    `RayCluster` the caller already holds (used as it is)."""
    if cluster is None or isinstance(cluster, RayCluster):
        yield cluster
        return
    with RayCluster(cluster) as connected:
        yield connected
