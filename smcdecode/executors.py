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
model name, dtype, method spec, task options), never from live objects.

Streaming (:meth:`RayExecutor.stream`, what ``run_eval`` uses): each worker runs
``sampler.stream`` over a small local queue of problems, exactly as a process evaluating on its
own does, so a problem's samples depend only on (seed, problem id, method), never on the worker
or on the problems sharing its batch. The worker keeps ``in_flight`` problems in its batch and
about half as many more waiting in its queue; each record it sends back makes the driver send it
one more problem (dynamic load balancing), and the driver tells a worker when it will get no
more. The worker grades each problem as it finishes and the driver writes the record.
``map``: the older protocol, batches of problems, one sampler call each.

Faults: a worker that dies (process killed, node lost, actor unavailable) is replaced by a fresh
actor (Ray places it on any node with room) and the problems it held go back to the front of the
queue, as suspects: a suspect runs alone on a worker holding nothing else, so a problem that
kills its worker is told apart from the problems that happened to share the worker. A problem
(or, in ``map``, a batch) in flight at ``max_failures`` worker deaths is recorded as an error and
the run goes on. An exception raised by the recipe while a
worker starts aborts the run (:class:`WorkerError`), as would any other exception raised while
evaluating. On exit, Ctrl-C included, the actors are killed; the records already written stay,
and a restart resumes from them.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from smcdecode.errors import ArgumentError, RewardError, SmcdecodeError, check_int
from smcdecode.evaluate import BatchJob, Executor, InProcess, Parts, Problem, Record, problem_seed

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


_END = None  # the inbox's end marker: no more problems for this worker


class _StreamWorker(_Worker):
    """The streaming actor (threaded: ``feed``/``collect`` run beside the evaluation thread).

    ``feed`` puts problems into the inbox, which ``sampler.stream`` consumes lazily (blocking when
    it is empty, until the driver sends more or the end marker); every finished problem's record
    goes to the outbox, which ``collect`` drains. ``run`` (one problem, the suspects' path) runs
    only while the worker holds nothing else, so it never shares the engine with the stream."""

    def __init__(self, build: Callable[[str], Parts], job: BatchJob, device: str, threads: int | None):
        super().__init__(build, job, device, threads)
        self.inbox: queue.Queue[Problem | None] = queue.Queue()
        self.outbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread: threading.Thread | None = None

    def feed(self, problems: list[Problem], end: bool, in_flight: int) -> None:
        for p in problems:
            self.inbox.put(p)
        if end:
            self.inbox.put(_END)
        if self.thread is None:
            self.thread = threading.Thread(target=self._evaluate, args=(in_flight,), daemon=True)
            self.thread.start()

    def collect(self, timeout: float) -> tuple[int, list[Record], str | None]:
        """The records finished so far (waiting up to ``timeout`` s for the first), or the error
        that stopped the evaluation thread."""
        out: list[tuple[str, Any]] = []
        try:
            out.append(self.outbox.get(timeout=timeout))
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        errors = [x[1] for x in out if x[0] == "error"]
        return os.getpid(), [x[1] for x in out if x[0] == "record"], errors[0] if errors else None

    def _evaluate(self, in_flight: int) -> None:
        task, engine, sampler = self.parts
        job = self.job
        by_uid: dict[Any, Problem] = {}

        def problems() -> Any:
            for p in iter(self.inbox.get, _END):
                assert p is not None
                by_uid[p["unique_id"]] = p
                yield p["unique_id"], task.prompt(p), problem_seed(job.seed, p["unique_id"])

        try:
            for fin in sampler.stream(
                engine, problems(), in_flight=in_flight, max_new_tokens=job.max_new_tokens, stop=job.stops()
            ):
                self.outbox.put(("record", job.finished(task, by_uid.pop(fin.key), fin)))
        except RewardError:  # as in one process: the rest one at a time, the failing one an error record
            for p in [*by_uid.values(), *iter(self.inbox.get, _END)]:
                for rec in job(self.parts, [p]):  # type: ignore[list-item]
                    self.outbox.put(("record", rec))
        except Exception:  # reported to the driver, which aborts the run (as in one process)
            self.outbox.put(("error", traceback.format_exc()))


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

    @contextmanager
    def _session(
        self, worker: type, job: BatchJob, **options: Any
    ) -> Iterator[tuple[Any, Callable[[], Any], list[Any]]]:
        """Ray (started here unless this process already called ``ray.init``), a ``start()`` that
        makes one ``worker`` actor for ``job``, and the list the caller keeps its actors in: each
        is killed on exit (Ctrl-C included), and Ray shut down if it was started here."""
        ray = _ray()
        owned = not ray.is_initialized()
        if owned:
            ray.init(address=self.address, **self.init_kwargs)
        remote = ray.remote(worker).options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            **options,
        )
        threads = self.cpus_per_worker if self.device == "cpu" else None
        actors: list[Any] = []
        try:
            yield ray, (lambda: remote.remote(self.build, job, self.device, threads)), actors
        finally:
            for actor in actors:
                ray.kill(actor)
            if owned:
                ray.shutdown()

    def stream(self, job: BatchJob, problems: Sequence[Problem], in_flight: int) -> Results:
        """Records of ``problems``, each exactly once, in the order they finish (see the module
        docstring): every worker runs ``sampler.stream`` with ``in_flight`` problems in its batch."""
        if not problems:
            return
        with self._session(_StreamWorker, job, max_concurrency=3) as (ray, start, actors):  # feed, collect
            yield from self._stream(ray, start, actors, job, problems, in_flight)

    def _stream(
        self,
        ray: Any,
        start: Callable[[], Any],
        actors: list[Any],
        job: BatchJob,
        problems: Sequence[Problem],
        in_flight: int,
    ) -> Results:
        from ray.exceptions import RayActorError

        hold = in_flight + max(1, in_flight // 2)  # problems a worker holds: its batch + its queue
        todo = deque(problems)
        failures: dict[Any, int] = {}  # uid -> worker deaths while it was held (suspects: > 0)
        held: list[dict[Any, Problem]] = []  # per worker: uid -> problem sent, not yet recorded
        ended: list[bool] = []  # the worker was told it gets no more problems
        calls: dict[Any, int] = {}  # ObjectRef of a collect or a suspect's run -> worker slot

        def top_up(slot: int) -> None:
            """Send worker ``slot`` problems until it holds ``hold``; a suspect only when it holds
            nothing (then alone, through ``run``); the end marker once nothing is left."""
            if ended[slot]:
                return
            if todo and failures.get(todo[0]["unique_id"], 0) > 0:
                if not held[slot]:
                    p = todo.popleft()
                    held[slot][p["unique_id"]] = p
                    calls[actors[slot].run.remote([p])] = slot
                return
            new: list[Problem] = []
            while todo and len(held[slot]) + len(new) < hold and failures.get(todo[0]["unique_id"], 0) == 0:
                new.append(todo.popleft())
            for p in new:
                held[slot][p["unique_id"]] = p
            end = not todo and not any(failures.get(u, 0) for u in held[slot])
            if new or end:
                actors[slot].feed.remote(new, end, in_flight)
                ended[slot] = end

        def replace(slot: int) -> None:
            ray.kill(actors[slot])
            actors[slot] = start()  # a fresh process, wherever Ray finds room
            self.restarts += 1
            ended[slot] = False
            calls[actors[slot].collect.remote(1.0)] = slot

        for _ in range(self._count(ray, len(problems))):
            actors.append(start())
            held.append({})
            ended.append(False)
        for slot in range(len(actors)):
            calls[actors[slot].collect.remote(1.0)] = slot
            top_up(slot)
        while any(held) or todo:
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=1.0)  # timeout: Ctrl-C stays responsive
            if not ready:
                continue
            slot = calls.pop(ready[0])
            try:
                got = ray.get(ready[0])
            except RayActorError as e:
                if e.actor_init_failed:
                    raise WorkerError(f"a worker failed to start: {e}") from e
                lost = list(held[slot].values())
                held[slot] = {}
                for ref in [r for r, s in calls.items() if s == slot]:
                    calls.pop(ref)
                failed = []
                for p in lost:
                    uid = p["unique_id"]
                    failures[uid] = failures.get(uid, 0) + 1
                    if failures[uid] >= self.max_failures:
                        failed.append(job.failed(p, f"WorkerDied ({failures[uid]} times): {e}"))
                    else:
                        todo.appendleft(p)
                if failed:
                    yield failed
                replace(slot)  # the fresh worker takes the suspects, one at a time
                for other in range(len(actors)):
                    top_up(other)
                continue
            if isinstance(got, tuple) and len(got) == 3:  # a collect: (pid, records, error)
                pid, records, error = got
                if error is not None:
                    raise WorkerError(f"evaluation failed on a worker:\n{error}")
                calls[actors[slot].collect.remote(1.0)] = slot
            else:  # a suspect's run: (pid, records)
                pid, records = got
            self.pids[slot] = pid
            for rec in records:
                held[slot].pop(rec["uid"], None)
            if records:
                yield records
            top_up(slot)

    def map(self, job: BatchJob, batches: Sequence[list[Problem]], local: Parts | None) -> Results:
        if not batches:
            return
        with self._session(_Worker, job) as (ray, start, actors):
            yield from self._map(ray, start, actors, job, list(batches))

    def _map(
        self, ray: Any, start: Callable[[], Any], actors: list[Any], job: BatchJob, batches: list[list[Problem]]
    ) -> Results:
        from ray.exceptions import RayActorError

        queue = deque(range(len(batches)))  # batch indices waiting for a worker
        failures = [0] * len(batches)  # worker deaths while each batch was in flight
        running: dict[Any, tuple[int, int]] = {}  # ObjectRef -> (worker slot, batch index)

        def submit(slot: int) -> None:
            if queue:
                i = queue.popleft()
                running[actors[slot].run.remote(batches[i])] = (slot, i)

        actors.extend(start() for _ in range(self._count(ray, len(batches))))
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
