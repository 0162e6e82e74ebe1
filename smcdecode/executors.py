"""Where ``run_eval``'s sampler calls run: in this process (:class:`InProcess`, the default) or
in long-lived Ray actors on one machine or a cluster (:class:`RayExecutor`).

An executor maps batches of problems (one sampler call each) to their records and yields them
to ``run_eval``, which alone writes them (``smcdecode.records``): resume and "never a duplicate
record" hold whatever runs the calls. The protocol::

    executor.map(job, batches, local) -> iterator of record lists, one per finished batch

``job`` is the picklable :class:`~smcdecode.evaluate.BatchJob` (method, seed, max_new_tokens,
selection); ``local`` the live ``(task, engine, sampler)`` of the calling process, or None.

Ray: one actor per worker builds its ``(task, engine, sampler)`` once from a picklable recipe
``build(device)`` (a module-level function, or a ``functools.partial`` of one, over plain values:
model name, dtype, method spec, task options), never from live objects. The driver keeps one
batch in flight per worker and hands the next batch to whichever worker finishes first (dynamic
load balancing). Per batch the wire carries the problem dicts out and the records back.

Faults: a worker that dies (process killed, node lost, actor unavailable) is replaced by a fresh
actor (Ray places it on any node with room) and its in-flight batch goes back to the front of the
queue. A batch in flight at ``max_failures`` worker deaths is recorded as errors (one problem at a
time, if the batch had several) and the run goes on. An exception raised by the recipe while a
worker starts aborts the run (:class:`WorkerError`), as would any other exception raised while
evaluating. On exit, Ctrl-C included, the actors are killed; the records already written stay,
and a restart resumes from them.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any

from smcdecode.errors import ArgumentError, SmcdecodeError, check_int
from smcdecode.evaluate import BatchJob, Executor, InProcess, Parts, Problem, Record

Results = Generator[list[Record], None, None]  # closable, so run_eval can stop it (Ctrl-C)
__all__ = ["Executor", "InProcess", "RayExecutor", "WorkerError"]


class WorkerError(SmcdecodeError, RuntimeError):
    """A worker could not start (the recipe raised), or the ``ray`` extra is missing."""


class _Worker:
    """The Ray actor: builds its engine once, then evaluates batches. Returns its pid with each
    result so the driver (and the fault tests) know which process ran it."""

    def __init__(self, build: Callable[[str], Parts], job: BatchJob, device: str, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.parts = build(device)  # device "cuda" = the GPU(s) Ray assigned (CUDA_VISIBLE_DEVICES)
        self.job = job

    def run(self, batch: list[Problem]) -> tuple[int, list[Record]]:
        return os.getpid(), self.job(self.parts, batch)


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise WorkerError("the Ray executor needs the ray extra: pip install 'smcdecode[ray]'") from e
    return ray


class RayExecutor:
    """Evaluate on Ray actors, one per worker, each holding its own engine.

    ``build(device) -> (task, engine, sampler)`` must be picklable by reference (module-level).
    ``workers=None``: one per ``gpus_per_worker`` GPUs of the cluster if that is > 0, else one per
    ``cpus_per_worker`` CPUs. ``address=None`` starts a local Ray instance (unless this process
    already called ``ray.init``); ``"auto"`` or ``"HOST:PORT"`` joins a running cluster.
    ``device=None`` is ``"cuda"`` when workers get GPUs, else ``"cpu"``.
    """

    def __init__(
        self,
        build: Callable[[str], Parts],
        *,
        workers: int | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: float = 0.0,
        device: str | None = None,
        address: str | None = None,
        max_failures: int = 3,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if not callable(build):
            raise ArgumentError("build", f"expected a callable build(device), got {type(build).__name__}")
        self.build = build
        self.workers = None if workers is None else check_int("workers", workers, 1)
        self.cpus_per_worker = check_int("cpus_per_worker", cpus_per_worker, 1)
        if not gpus_per_worker >= 0:
            raise ArgumentError("gpus_per_worker", f"must be >= 0, got {gpus_per_worker!r}")
        self.gpus_per_worker = float(gpus_per_worker)
        self.device = device or ("cuda" if self.gpus_per_worker > 0 else "cpu")
        self.address = address
        self.max_failures = check_int("max_failures", max_failures, 1)
        self.init_kwargs = dict(init_kwargs or {})
        self.pids: dict[int, int] = {}  # worker slot -> pid of the process that last returned a result
        self.restarts = 0  # workers replaced after dying

    def _count(self, ray: Any, n_batches: int) -> int:
        if self.workers is not None:
            n = self.workers
        else:
            res = ray.cluster_resources()
            if self.gpus_per_worker > 0:
                n = int(res.get("GPU", 0) // self.gpus_per_worker)
            else:
                n = int(res.get("CPU", 1) // self.cpus_per_worker)
        return max(1, min(n, n_batches))

    def map(self, job: BatchJob, batches: Sequence[list[Problem]], local: Parts | None) -> Results:
        if not batches:
            return
        batches = list(batches)
        ray = _ray()
        from ray.exceptions import RayActorError

        owned = not ray.is_initialized()
        if owned:
            ray.init(address=self.address, **self.init_kwargs)
        remote = ray.remote(_Worker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0
        )

        def start() -> Any:
            return remote.remote(self.build, job, self.device, self.cpus_per_worker if self.device == "cpu" else None)

        queue = deque(range(len(batches)))  # batch indices waiting for a worker
        failures = [0] * len(batches)  # worker deaths while each batch was in flight
        actors: list[Any] = []
        running: dict[Any, tuple[int, int]] = {}  # ObjectRef -> (worker slot, batch index)

        def submit(slot: int) -> None:
            if queue:
                i = queue.popleft()
                running[actors[slot].run.remote(batches[i])] = (slot, i)

        try:
            actors = [start() for _ in range(self._count(ray, len(batches)))]
            for slot in range(len(actors)):
                submit(slot)
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)  # timeout: Ctrl-C stays responsive
                if not ready:
                    continue
                slot, i = running.pop(ready[0])
                try:
                    pid, records = ray.get(ready[0])
                except RayActorError as e:
                    if e.actor_init_failed:
                        raise WorkerError(f"a worker failed to start: {e}") from e
                    failures[i] += 1
                    ray.kill(actors[slot])
                    actors[slot] = start()  # a fresh process, wherever Ray finds room
                    self.restarts += 1
                    if failures[i] < self.max_failures:
                        queue.appendleft(i)
                    elif len(batches[i]) > 1:  # find the problem that kills workers: one at a time
                        split = list(range(len(batches), len(batches) + len(batches[i])))
                        batches = [*batches, *([p] for p in batches[i])]
                        failures.extend(0 for _ in split)
                        queue.extendleft(reversed(split))
                    else:
                        yield [job.failed(batches[i][0], f"WorkerDied ({failures[i]} times): {e}")]
                    submit(slot)
                    continue
                self.pids[slot] = pid
                yield records
                submit(slot)
        finally:
            for actor in actors:
                ray.kill(actor)
            if owned:
                ray.shutdown()
