"""Run one function over many items, in this process or on a Ray cluster: per-item error capture,
items whose worker died retried by Ray, a callback as each item finishes.

    from klip_med.pipeline.engine import EngineOptions, run_items

    outcomes = run_items(make_worker, [("a", item_a), ("b", item_b)],
                         EngineOptions("ray", workers=4, gpus_per_worker=1), on_outcome=print)

``make_worker`` is a picklable zero-argument callable, run once per worker (load the prior there, so
each worker loads it once and keeps it on its device); it returns the item function, called once per
item in that worker. An exception raised by the item function becomes that item's
:attr:`Outcome.error` and the other items go on; it is not retried (a corrupt input fails the same
way every time).

Engines:

``local``
    One worker in this process, items in order. No Ray needed.
``ray``
    ``workers`` Ray actors (``num_cpus=cpus_per_worker``, ``num_gpus=gpus_per_worker``; fractional
    GPUs share one), each fed one item at a time as it becomes free. Ray's own fault tolerance handles
    a worker that dies (killed, out of host memory, node lost): the actor is restarted
    (``max_restarts=-1``, rerunning ``make_worker``) and the item it held is run again on it
    (``max_task_retries=retries``). An item that kills its worker ``retries + 1`` times is recorded
    as failed and the others go on. Results come back as they finish, in any order. Ray starts a
    local cluster unless it is already initialised or ``address`` names one (``"auto"``,
    ``"ray://host:10001"``).

Why actors rather than Ray Data ``map_batches``: an item here is a whole series (minutes of compute
that writes its own files), not rows to stream; what comes back is a small record. Actors give the
same "load once per worker" and the same retry machinery, bound retries per item, report which item
failed, and can be named (the index records which worker ran an item; tests kill one by name with
``ray.kill``), without pyarrow blocks or a dataset plan in between.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from klip_med.errors import KLIPMedError, expect
from klip_med.pipeline.optional import require

ENGINES = ("local", "ray")
WORKER_PREFIX = "klip-med-worker"
"""Ray actor names are ``klip-med-worker-<run tag>-<i>`` (in the driver's namespace)."""


@dataclass(frozen=True)
class EngineOptions:
    """Where and how wide items run.

    Attributes:
        engine: ``"local"`` (this process, one worker) or ``"ray"``.
        workers: Ray actors (``local``: 1).
        cpus_per_worker: Ray CPUs per actor; also its torch threads (the integer part, at least 1).
        gpus_per_worker: Ray GPUs per actor (0.5: two workers share a GPU).
        address: Ray cluster to join (``"auto"``, ``"ray://host:10001"``); None starts a local one
            (or uses the one this process already initialised).
        retries: times an item is run again after its worker died (not after an exception).
    """

    engine: str = "local"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        expect(self.engine in ENGINES, "--engine", f"one of {', '.join(ENGINES)}", repr(self.engine))
        expect(isinstance(self.workers, int) and self.workers >= 1, "--workers", "an integer >= 1", self.workers)
        expect(self.engine == "ray" or self.workers == 1, "--workers",
               "1 with --engine local (one worker in this process; use --engine ray for more)", self.workers)
        expect(self.cpus_per_worker > 0, "--cpus-per-worker", "a number > 0", self.cpus_per_worker)
        expect(self.gpus_per_worker >= 0, "--gpus-per-worker", "a number >= 0", self.gpus_per_worker)
        expect(self.engine == "ray" or self.gpus_per_worker == 0, "--gpus-per-worker",
               "0 with --engine local (the local worker uses --device as it is)", self.gpus_per_worker)
        expect(isinstance(self.retries, int) and self.retries >= 0, "--worker-retries", "an integer >= 0",
               self.retries)


@dataclass(frozen=True)
class Outcome:
    """What became of one item.

    Attributes:
        key: the item's key.
        value: what the item function returned (None on error).
        error: ``None``, or the error in one line (KLIPMedError: its message; else ``Type: message``).
        seconds: time spent on the item in its last attempt.
        worker: which worker ran it (Ray actor name, pid, host).
        traceback: the traceback of an error that is not a KLIPMedError (a bug, an OOM), else None.
    """

    key: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    worker: str = ""
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def attempt(fn: Callable[[Any], Any], key: str, item: Any, worker: str) -> Outcome:
    """Run ``fn(item)`` and capture any exception (not KeyboardInterrupt) as the outcome's error."""
    start = time.perf_counter()
    try:
        value = fn(item)
    except Exception as exc:
        message = str(exc) if isinstance(exc, KLIPMedError) else f"{type(exc).__name__}: {exc}"
        trace = None if isinstance(exc, KLIPMedError) else traceback.format_exc(limit=-8)
        return Outcome(key, None, message.strip() or type(exc).__name__, round(time.perf_counter() - start, 3),
                       worker, trace)
    return Outcome(key, value, None, round(time.perf_counter() - start, 3), worker)


def run_items(
    make_worker: Callable[[], Callable[[Any], Any]],
    items: Iterable[tuple[str, Any]],
    options: EngineOptions,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run the item function of ``make_worker()`` over ``items`` (``(key, item)`` pairs, keys unique).

    Returns:
        One :class:`Outcome` per item, in the order they finished; ``on_outcome`` sees each as it
        comes (on the calling process: write an index, move a progress bar).
    """
    items = list(items)
    keys = [key for key, _ in items]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    expect(not repeated, "items", "unique keys", f"repeated keys {repeated[:5]}")
    if not items:
        return []
    report = on_outcome or (lambda outcome: None)
    if options.engine == "local":
        return _run_local(make_worker, items, report)
    return _run_ray(make_worker, items, options, report)


def _run_local(make_worker, items, report) -> list[Outcome]:
    fn = make_worker()
    worker = f"local pid {os.getpid()} on {socket.gethostname()}"
    outcomes = []
    for key, item in items:
        outcomes.append(attempt(fn, key, item, worker))
        report(outcomes[-1])
    return outcomes


class RayWorker:
    """The actor around an item function (built once per actor start by ``make_worker``)."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]], name: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.name = name
        self.fn = make_worker()

    def describe(self) -> str:
        return f"{self.name} pid {os.getpid()} on {socket.gethostname()}"

    def run(self, key: str, item: Any) -> Outcome:
        return attempt(self.fn, key, item, self.describe())


def _run_ray(make_worker, items, options: EngineOptions, report) -> list[Outcome]:
    ray = require("ray", extra="ray", argument="--engine ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, logging_level="WARNING")
    elif options.address is not None:
        raise KLIPMedError(f"--ray-address: expected Ray not yet initialised in this process, found it "
                           f"connected already (to {ray.get_runtime_context().gcs_address})")
    _check_resources(ray.cluster_resources(), options)
    actor_class = ray.remote(RayWorker)
    resources = {"num_cpus": options.cpus_per_worker, "num_gpus": options.gpus_per_worker, "max_restarts": -1,
                 "max_task_retries": options.retries}
    tag = uuid.uuid4().hex[:8]
    threads = max(1, int(options.cpus_per_worker))
    actors = []
    outcomes: list[Outcome] = []
    try:
        for i in range(min(options.workers, len(items))):
            name = f"{WORKER_PREFIX}-{tag}-{i}"
            actors.append((actor_class.options(name=name, **resources).remote(make_worker, name, threads), name))
        pending, running, idle = deque(items), {}, list(actors)
        while pending or running:
            while pending and idle:
                actor, name = idle.pop(0)
                key, item = pending.popleft()
                running[actor.run.remote(key, item)] = (key, actor, name)
            if not running:  # every worker is dead for good
                for key, _ in pending:
                    outcomes.append(Outcome(key, error="no Ray worker left to run it (each died for good)"))
                    report(outcomes[-1])
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            key, actor, name = running.pop(ref)
            try:
                outcome = ray.get(ref)
                idle.append((actor, name))
            except ray.exceptions.RayError as exc:
                outcome = Outcome(key, error=_ray_error(ray, exc, options.retries), worker=name)
                if _alive(ray, actor):
                    idle.append((actor, name))
            outcomes.append(outcome)
            report(outcome)
    finally:
        for actor, _ in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    return outcomes


def _ray_error(ray, exc: Exception, retries: int) -> str:
    """One line for an item Ray could not finish: an error outside the item function, or worker deaths."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, ray.exceptions.RayTaskError):
        return f"{type(exc).__name__}: {first}"
    if isinstance(exc, ray.exceptions.ActorDiedError):  # its constructor failed, or it was stopped for good
        return f"its worker is gone for good ({first})"
    return f"its worker died {retries + 1} times on this item ({type(exc).__name__}: {first})"


def _alive(ray, actor) -> bool:
    """False only for an actor that is dead for good (Ray restarts the others)."""
    try:
        ray.get(actor.describe.remote())
    except ray.exceptions.ActorDiedError:
        return False
    return True


def _check_resources(total: dict[str, float], options: EngineOptions) -> None:
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    expect(cpus >= options.cpus_per_worker and gpus >= options.gpus_per_worker, "--cpus-per-worker / "
           "--gpus-per-worker", f"a Ray cluster with room for one worker ({options.cpus_per_worker:g} CPU, "
           f"{options.gpus_per_worker:g} GPU)", f"{cpus:g} CPU and {gpus:g} GPU in the cluster")
