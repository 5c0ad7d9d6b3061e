"""Sweep configurations as tasks: run here one at a time, or on a Dask cluster.

A task is one configuration's benchmark worker (:mod:`rwkvlab.worker`: ``rwkvlab bench --json
--events --no-save`` in a subprocess, so a driver crash costs that run only), and it returns the
worker's record, never writes the history: the sweep's client is the one writer (it appends
each record as it arrives, to the history file named for the GPU the record was measured on).
The same :func:`bench_task` runs inline for the sequential default, on a ``LocalCluster`` for
``--workers N``, and on any Dask cluster for ``--scheduler tcp://HOST:8786``.

One task holds one GPU: tasks ask for the resource ``GPU=1`` and each Dask worker declares one
(``dask worker ... --nthreads 1 --resources GPU=1``), so two runs never share a GPU, which
would spoil both measurements. On a host with several GPUs each worker is started with its own
``RWKVLAB_ADAPTER`` (:data:`rwkvlab.gpu.ADAPTER_ENV`), which its bench subprocesses inherit.

A task whose subprocess fails returns the failure (a crash that is the configuration's own
would happen again, so it is not retried). A task lost with its Dask worker (the process or
its machine died) is rescheduled by Dask on another worker; the local cluster allows that once
(:data:`LOST_TASK_RETRIES`), a remote scheduler by its own ``allowed-failures`` setting. A task
still lost after that comes back as a failure naming the error.
"""
from __future__ import annotations

import copy
import logging
import os
import platform
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rwkvlab.bench import BenchSettings
from rwkvlab.gpu import ADAPTER_ENV
from rwkvlab.options import Options
from rwkvlab.worker import bench_command, run_worker

GPU_RESOURCE = {"GPU": 1}  # what every task asks for and every worker declares
LOST_TASK_RETRIES = 1  # a local cluster reschedules a task lost with its worker this many times


@dataclass
class TaskResult:
    """One task's outcome: the bench record as JSON (None when it failed), why it failed, the
    worker's exit status and seconds, and where it ran (host, Dask worker, adapter number)."""

    raw: dict[str, Any] | None
    error: str | None
    returncode: int | None
    seconds: float
    where: dict[str, str] = field(default_factory=dict)


def bench_task(model_args: Sequence[str], options: Options, settings: BenchSettings, *, history_dir: str,
               title: str = "", change: str = "", file: str | None = None, timeout: float = 1800.0,
               relay: bool = False, adapter: str | None = None) -> TaskResult:
    """Run one configuration's benchmark worker here (a Dask worker, or the sweep's own process).

    The command line is built here, with this machine's Python. ``history_dir`` only lets bench
    judge the run; nothing is saved. ``adapter`` overrides this process's ``$RWKVLAB_ADAPTER``.
    The record's environment gains where it ran: ``host``, ``dask_worker``, ``adapter_index``.
    """
    cmd = bench_command(model_args, options, settings, history_dir=history_dir, save=False, title=title,
                        change=change, file=file)
    result = run_worker(cmd, timeout=timeout, relay=relay, env={ADAPTER_ENV: adapter} if adapter else None)
    where = _where(adapter)
    raw = result.raw if result.record is not None else None
    if raw is not None:
        raw["environment"] = {**(raw.get("environment") or {}), **where}
    return TaskResult(raw, result.error, result.returncode, result.seconds, where)


def _where(adapter: str | None) -> dict[str, str]:
    """The host, the Dask worker (when this runs on one) and the adapter number (when set)."""
    where = {"host": platform.node()}
    if "distributed" in sys.modules:  # never import Dask for a sequential sweep
        from distributed import get_worker

        try:
            where["dask_worker"] = get_worker().address
        except ValueError:  # not inside a Dask task
            pass
    number = adapter or os.environ.get(ADAPTER_ENV, "").strip()
    if number:
        where["adapter_index"] = number
    return where


def start_local_cluster(n_workers: int, adapters: Sequence[str] | None = None):
    """A ``distributed.LocalCluster`` of ``n_workers`` processes, each with one thread and one
    GPU resource; worker ``i`` gets ``RWKVLAB_ADAPTER=adapters[i]`` (one value: all of them).

    Its scheduler reschedules a task lost with its worker :data:`LOST_TASK_RETRIES` times.
    """
    import dask
    from distributed import LocalCluster

    if adapters and len(adapters) not in (1, n_workers):
        raise ValueError(f"{len(adapters)} adapters for {n_workers} workers: give one, or one per worker")
    # Its HTTP server on any free port: the default 8787 clashes with a second sweep's cluster.
    with dask.config.set({"distributed.scheduler.allowed-failures": LOST_TASK_RETRIES}):
        cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, resources=GPU_RESOURCE,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    # LocalCluster gives every worker the same options; a per-worker adapter needs its own spec.
    for i in range(n_workers):
        name, spec = next(iter(cluster.new_worker_spec().items()))
        spec = copy.deepcopy(spec)
        if adapters:
            number = adapters[i] if len(adapters) > 1 else adapters[0]
            spec["options"]["env"] = {**spec["options"].get("env", {}), ADAPTER_ENV: str(number)}
        cluster.worker_spec[name] = spec
    cluster.scale(n_workers)
    return cluster


def lost_text(err: BaseException) -> str:
    """A task that raised instead of returning: how it ended, for the sweep's table."""
    from distributed import KilledWorker

    if isinstance(err, KilledWorker):
        return f"lost with its Dask worker: {err}"
    return f"the task failed on its Dask worker: {type(err).__name__}: {err}"


def run_inline(tasks: Sequence[dict[str, Any]], log=print) -> Iterator[tuple[int, TaskResult]]:
    """Each task in this process, one at a time, the worker's stderr streaming through."""
    for i, kwargs in enumerate(tasks):
        log(f"[{i + 1}/{len(tasks)}] {kwargs['change']}")
        yield i, bench_task(**kwargs, relay=True)


def run_on_cluster(client, tasks: Sequence[dict[str, Any]], first: int | None = None
                   ) -> Iterator[tuple[int, TaskResult]]:
    """Every task on ``client``'s cluster, as each finishes; task ``first`` alone before the rest.

    Running one task first, alone, lets the sweep's baseline be the earliest run of its kind in
    the history (the output rule's reference), as the sequential order makes it. After that no
    more tasks are in flight than the cluster has GPUs: Dask enforces a resource on the worker,
    so it would queue a second task on a busy worker, and a task lost with a worker it was only
    queued on would count against its retries all the same.
    """
    from distributed import as_completed

    sweep = uuid.uuid4().hex[:8]

    def submit(i: int):
        return client.submit(bench_task, **tasks[i], key=f"rwkvlab-sweep-{sweep}-{i}", pure=False,
                             resources=GPU_RESOURCE)

    def outcome(future) -> TaskResult:
        try:
            return future.result()
        except Exception as err:  # KilledWorker, or the task could not run there (an import error)
            return TaskResult(None, lost_text(err), None, 0.0)

    cluster_gpus(client)  # fail now, not hang, when no worker could take a task
    pending = list(range(len(tasks)))
    if first is not None:
        pending.remove(first)
        yield first, outcome(submit(first))
    in_flight: dict[Any, int] = {}
    done = as_completed()

    def fill() -> None:
        while pending and len(in_flight) < cluster_gpus(client):
            i = pending.pop(0)
            future = submit(i)
            in_flight[future] = i
            done.add(future)

    fill()
    for future in done:
        i = in_flight.pop(future)
        yield i, outcome(future)
        fill()


class ClusterError(RuntimeError):
    """The cluster cannot run a sweep's tasks; the message says how to start its workers."""


def cluster_gpus(client) -> int:
    """How many GPU resources the cluster's workers declare now (1 while it has no worker yet:
    one task waits for the first)."""
    workers = client.scheduler_info()["workers"].values()
    gpus = sum(int(w.get("resources", {}).get("GPU", 0)) for w in workers)
    if workers and not gpus:
        raise ClusterError("no worker of the cluster declares a GPU, so no task could start; start one worker "
                           "per GPU with: dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1")
    return max(gpus, 1)
