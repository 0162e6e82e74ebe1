"""One evaluation path for every task: MATH-500 and HumanEval are thin adapters over it.

``run_eval`` samples each problem with a method (sampler + target + proposal), picks an answer
(the sample itself drawn by weight, a weighted majority vote, the highest weight, or the highest
log π: best-of-n under a reward-only target), grades it,
and appends one durable record per problem to ``DIR/results.jsonl``. A run killed at any moment
and restarted with the same arguments skips the problems already recorded for (method, seed);
``--shard I/N`` takes every N-th problem starting at I, so N shards partition the problems.

Where the sampler calls run is an executor's business (``smcdecode.executors``: this process by
default, or Ray actors on a cluster); the records are always written here, by the driver alone.
Ancestral, SuffixMH and SMC (``Sampler.streams``) run by continuous batching: ``batch_size``
problems share the batch, a problem is graded and recorded the moment its samples are done, and a
waiting problem is prefilled into the rows it frees (SMC: each problem runs its own SMC loop on its
rows, the problems' forwards merged); each problem draws from its own random stream seeded by
``problem_seed(seed, uid)``, so its samples depend only on (seed, problem id, method): not on the
problems sharing the batch, its position in the run, resumes, or the executor. Ray workers run
the same streaming loop over their own problems (``RayExecutor.stream``). Samplers that do not
stream (proposals with rollouts, EGLR) run one problem at a time with the same guarantee; with
``continuous=False`` problems go ``batch_size`` at a time in one sampler call seeded with
``problem_seed`` of its first problem, so above 1 a problem's samples also depend on its batch.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from smcdecode import heap, runs
from smcdecode.backends import Backend
from smcdecode.errors import ArgumentError, RewardError, check_int
from smcdecode.records import RecordWriter, read_jsonl
from smcdecode.samplers.base import Sampler
from smcdecode.samplers.result import Sample
from smcdecode.samplers.stream import Finished

SELECTIONS = ("sample", "majority", "weight", "target")


@dataclass
class TaskAdapter:
    """What differs between tasks. ``answer`` maps a sample's text to the answer that is graded
    and voted on; ``grade(problem, answer) -> bool``.

    Args:
        name: The task's name in the records.
        problems: The problems, each a dict with a ``unique_id`` (recorded as ``uid``).
        prompt: A problem's prompt text.
        answer: The answer extracted from a sample's text (None: a sample without text).
        grade: Whether an answer to a problem is correct.
        grade_all: Grade every sample (for pass@k), not only the chosen one.
    """

    name: str
    problems: list[dict[str, Any]]
    prompt: Callable[[dict[str, Any]], str]
    answer: Callable[[str | None], Any]
    grade: Callable[[dict[str, Any], Any], bool]
    grade_all: bool = False  # grade every sample (for pass@k), not only the chosen one


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``--shard I/N`` into (I, N); None or empty is (0, 1), the whole run.

    Args:
        text: The ``--shard`` value, ``"I/N"``.

    Raises:
        ArgumentError: the text is not ``I/N`` with 0 ≤ I < N.
    """
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as e:
        raise ArgumentError("shard", f"expected I/N, got {text!r}") from e
    if not (n >= 1 and 0 <= i < n):
        raise ArgumentError("shard", f"need 0 <= I < N, got {text!r}")
    return i, n


def shard(problems: Sequence[dict[str, Any]], index: int, count: int) -> list[dict[str, Any]]:
    """Every ``count``-th problem starting at ``index``: the shards partition the list.

    Args:
        problems: All the problems, in order.
        index: I, this shard (0 ≤ I < N).
        count: N, the number of shards.
    """
    return [p for k, p in enumerate(problems) if k % count == index]


def problem_seed(seed: int, uid: Any) -> int:
    """The sampler seed of a problem: a function of (run seed, problem id) only.

    Args:
        seed: The run's seed.
        uid: The problem's id (its ``str`` is hashed).

    Returns:
        CRC-32 of ``"sample:{seed}:{uid}"``, in [0, 2**32).
    """
    return zlib.crc32(f"sample:{seed}:{uid}".encode())


def choose(samples: list[Sample], answers: list[Any], how: str, rng: random.Random) -> int:
    """Index of the chosen sample.

    Args:
        samples: A problem's samples, with their log-weights (and log-targets for ``"target"``).
        answers: The answer extracted from each sample (None or ``""``: no answer; not voted).
        how: ``"sample"`` (drawn with probability ∝ exp(log_weight)), ``"weight"`` (the highest
            weight), ``"target"`` (the highest log π, the first of equals) or ``"majority"``
            (the answer with the largest total weight, then its highest-weight sample; the
            highest weight when no sample has an answer).
        rng: The random stream of ``"sample"``.

    Raises:
        ArgumentError: ``how`` is not one of :data:`SELECTIONS`.
    """
    weights = [math.exp(s.log_weight) for s in samples]
    if how == "sample":
        return rng.choices(range(len(samples)), weights=weights, k=1)[0]
    if how == "weight":
        return max(range(len(samples)), key=lambda i: weights[i])
    if how == "target":  # best-of-n by log π (e.g. a reward-only target): the first of the best
        scores = [-math.inf if s.log_target is None else s.log_target for s in samples]
        return max(range(len(samples)), key=lambda i: scores[i])
    if how == "majority":
        votes: dict[Any, float] = defaultdict(float)
        for a, w in zip(answers, weights):
            if a is not None and a != "":
                votes[a] += w
        if not votes:
            return max(range(len(samples)), key=lambda i: weights[i])
        best = max(votes, key=lambda a: votes[a])
        return max((i for i, a in enumerate(answers) if a == best), key=lambda i: weights[i])
    raise ArgumentError("select", f"unknown selection {how!r}; use one of {SELECTIONS}")


def run_eval(
    task: TaskAdapter,
    engine: Backend | None,
    sampler: Sampler | None,
    method: str,
    out_dir: str,
    *,
    seed: int = 0,
    max_new_tokens: int = 512,
    select: str = "sample",
    batch_size: int = 1,
    progress: bool | None = None,
    executor: Executor | None = None,
    stop: Sequence[str | Sequence[int]] | None = None,
    continuous: bool = True,
    definition: dict[str, Any] | None = None,
) -> str:
    """Evaluate and append records to ``out_dir/results.jsonl``; returns that path.

    ``continuous``: Ancestral, SuffixMH and SMC keep ``batch_size`` problems in one batch and admit
    a waiting problem as soon as one finishes (see the module docstring); False takes problems
    ``batch_size`` at a time, the batch running until its last problem ends (for comparison).

    ``stop``: stop patterns of every sample (see ``Sampler.run``); recorded with each record, and
    a directory already holding records of this (method, seed) with other stops is refused.

    ``batch_size`` problems share one sampler call; above 1 a problem's samples also depend on
    which problems share its call. ``executor`` runs the calls (default: in this process with
    ``engine`` and ``sampler``; a ``RayExecutor`` builds its own in each worker, so they may be None).

    Args:
        task: The task adapter (``smcdecode.tasks``: MATH-500, HumanEval, the built-in arithmetic).
        engine: The backend (None with an executor that builds its own).
        sampler: The sampler (None with an executor that builds its own).
        method: The method's name in the records (a resumed run skips the problems recorded
            under this name and seed).
        out_dir: The directory of ``results.jsonl``.
        seed: The run's seed; each problem draws from its own stream seeded by (seed, problem id).
        max_new_tokens: Tokens generated per sample at most.
        select: The graded answer: ``"sample"`` (one drawn by weight), ``"majority"`` (weighted
            vote over extracted answers), ``"weight"`` (the highest weight) or ``"target"`` (the
            highest log target: best-of-n under a reward-only target, the first of equals).
        batch_size: Problems in one batch.
        progress: Show a progress bar (None: only on a terminal).
        executor: Where the sampler calls run (default: this process).
        stop: Stop patterns of every sample (default: the task's own).
        continuous: Keep the batch full (continuous batching) for the samplers that stream.
        definition: What else defines the run (model identity, backend, dtype, prompt style,
            data), stored with task, method, seed, max_new_tokens, select and stop in
            ``out_dir/run.json``; a directory holding another definition is refused, naming the
            differing fields (:mod:`smcdecode.runs`), and every record carries the definition's
            ``run`` id. While it runs, ``out_dir`` is locked: a second ``run_eval`` into it
            (another process, say) is refused.

    Returns:
        The path of ``out_dir/results.jsonl``.

    Raises:
        ArgumentError: an argument is invalid, the directory holds records of this method and
            seed with other stop patterns, it holds another run definition, or another run
            is writing it now.
    """
    if select not in SELECTIONS:
        raise ArgumentError("select", f"unknown selection {select!r}; use one of {SELECTIONS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError("batch_size", f"must be an int >= 1, got {batch_size!r}")
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("seed", seed, 0)
    if not isinstance(method, str) or not method:
        raise ArgumentError("method", f"must be a non-empty name, got {method!r}")
    path = os.path.join(out_dir, "results.jsonl")
    full = runs.as_stored(definition_of(task.name, method, seed, max_new_tokens, select, stop, definition))
    with runs.lock(out_dir):  # one writer: a second run into out_dir would record its problems twice
        stops = _stop_key(stop)
        previous = list(read_jsonl(path))
        for r in previous:
            if (r.get("method"), r.get("seed")) == (method, seed) and _stop_key(r.get("stop")) != stops:
                raise ArgumentError(
                    "stop",
                    f"{path} holds records of {method!r} (seed {seed}) made with stop={r.get('stop')!r}, not "
                    f"{stop!r}: resuming would mix two sequence spaces; use another output directory",
                )
        stamp = {"run": _claim(out_dir, previous, full)}
        done = {(r.get("uid"), r.get("method"), r.get("seed")) for r in previous}
        todo = [p for p in task.problems if (p["unique_id"], method, seed) not in done]
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        job = BatchJob(task.name, method, seed, max_new_tokens, select, stops)
        if continuous and executor is None and engine is not None and sampler is not None and _streams(sampler, engine):
            _run_streaming(task, engine, sampler, job, todo, path, batch_size, progress, stamp)
            return path
        if continuous and executor is not None and hasattr(executor, "stream"):  # workers stream (Ray)
            with (
                RecordWriter(path, stamp) as writer,
                tqdm(total=len(todo), desc=f"{task.name} {method}", disable=_quiet(progress), leave=False) as bar,
                closing(executor.stream(job, todo, batch_size)) as streamed,
            ):
                t0, tokens = time.perf_counter(), 0
                for records in streamed:
                    for rec in records:
                        writer.append(rec)
                        tokens += rec.get("decode_tokens", 0)
                        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", refresh=False)
                        bar.update(1)
            return path
        if executor is None:
            executor = InProcess()
        local = (task, engine, sampler) if engine is not None and sampler is not None else None
        show = progress if progress is not None else None
        with (
            RecordWriter(path, stamp) as writer,
            tqdm(total=len(todo), desc=f"{task.name} {method}", disable=_quiet(show), leave=False) as bar,
            closing(executor.map(job, batches, local)) as results,
        ):
            for records in results:
                for rec in records:
                    writer.append(rec)
                    bar.update(1)
        return path


def definition_of(
    task: str,
    method: str,
    seed: int,
    max_new_tokens: int,
    select: str,
    stop: Any,
    definition: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full definition of a run (``smcdecode.runs``): run_eval's own fields and the caller's.

    Args:
        task: The task's name.
        method: The method's name.
        seed: The run's seed.
        max_new_tokens: Tokens generated per sample at most.
        select: The answer selection (see :func:`run_eval`).
        stop: The stop patterns (strings or token-id sequences; None: none).
        definition: The caller's other fields (model, backend, data...); they override these.

    Returns:
        The definition as a JSON-ready dict.
    """
    stops = _stop_key(stop)
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "select": select,
        "stop": None if stops is None else [s if isinstance(s, str) else list(s) for s in stops],
        **(definition or {}),
    }


def _claim(out_dir: str, previous: list[dict[str, Any]], full: dict[str, Any]) -> str:
    """Claim ``out_dir`` for the run ``full`` (:func:`smcdecode.runs.claim`); its id. A directory
    of records written before run definitions existed is adopted only when every record is of
    this method, seed and max_new_tokens."""
    if previous and not os.path.exists(os.path.join(out_dir, runs.FILE)):
        ours = {k: full[k] for k in ("method", "seed", "max_new_tokens")}
        for r in previous:
            diff = runs.differences({k: r.get(k) for k in ours}, ours)
            if diff:
                raise ArgumentError(
                    "out",
                    f"{out_dir} holds records of another run ({'; '.join(diff)}); use another --out for this run",
                )
    return runs.claim(out_dir, full)


def _quiet(progress: bool | None) -> bool:
    """No bar when asked, or by default when stderr is not a terminal (logs, CI, pipes)."""
    return not progress if progress is not None else not sys.stderr.isatty()


def _streams(sampler: Sampler, engine: Backend) -> bool:
    """Does the sampler keep a batch full by admitting problems as others finish?"""
    return sampler.streams(engine)


def _run_streaming(
    task: TaskAdapter,
    engine: Backend,
    sampler: Sampler,
    job: BatchJob,
    todo: list[dict[str, Any]],
    path: str,
    in_flight: int,
    progress: bool | None,
    stamp: dict[str, Any] | None = None,
) -> None:
    """Continuous batching in this process: ``in_flight`` problems share the batch, each graded
    and recorded the moment its samples are done, a waiting problem admitted into its rows. Each
    problem draws from its own stream seeded by ``problem_seed(seed, uid)``, so its samples do
    not depend on the batch. A reward that fails stops the stream; the problems not yet recorded
    then run one at a time, recording the failing one's error and losing nothing else."""
    by_uid = {p["unique_id"]: p for p in todo}
    queue = ((p["unique_id"], task.prompt(p), problem_seed(job.seed, p["unique_id"])) for p in todo)
    written: set[Any] = set()
    t0, tokens = time.perf_counter(), 0
    with (
        RecordWriter(path, stamp) as writer,
        tqdm(total=len(todo), desc=f"{task.name} {job.method}", disable=_quiet(progress), leave=False) as bar,
    ):
        try:
            stops = job.stops()
            finished = sampler.stream(engine, queue, in_flight=in_flight, max_new_tokens=job.max_new_tokens, stop=stops)
            for fin in finished:
                rec = job.finished(task, by_uid[fin.key], fin)
                writer.append(rec)
                written.add(fin.key)
                tokens += fin.decode_tokens
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", refresh=False)
                bar.update(1)
        except RewardError:
            for p in todo:
                if p["unique_id"] not in written:
                    for rec in job((task, engine, sampler), [p]):
                        writer.append(rec)
                    bar.update(1)


Problem = dict[str, Any]
Record = dict[str, Any]
Parts = tuple[TaskAdapter, Backend, Sampler]  # what evaluates a batch: live task, engine, sampler


class Executor(Protocol):
    """Where the sampler calls run (see ``smcdecode.executors``): records of each batch, in any
    order, each batch exactly once; a generator, so ``run_eval`` can close it (Ctrl-C)."""

    def map(
        self, job: BatchJob, batches: Sequence[list[Problem]], local: Parts | None
    ) -> Generator[list[Record], None, None]:
        """Run ``job`` on every batch and yield each batch's records as it finishes.

        Args:
            job: What to run on a batch (the task, the method, the sampler's settings).
            batches: The problems, in batches.
            local: The caller's (task, engine, sampler), or None for executors that build their own.

        Yields:
            The records of one batch.
        """
        ...


class InProcess:
    """Runs every batch in this process with the caller's engine and sampler, in order."""

    def map(
        self, job: BatchJob, batches: Sequence[list[Problem]], local: Parts | None
    ) -> Generator[list[Record], None, None]:
        """Run every batch here with ``local``'s engine and sampler, in order (see ``Executor.map``).

        Args:
            job: What to run on a batch.
            batches: The problems, in batches.
            local: The caller's (task, engine, sampler).

        Yields:
            The records of one batch.

        Raises:
            ArgumentError: ``local`` is None (no engine and sampler given).
        """
        if local is None:
            raise ArgumentError("engine", "the in-process executor needs an engine and a sampler")
        for batch in batches:
            yield job(local, batch)


@dataclass(frozen=True)
class BatchJob:
    """Turns a batch of problems into records given live (task, engine, sampler); the settings
    only, so it pickles small (an executor sends it to each worker once).

    Args:
        task: The task's name.
        method: The method's name in the records.
        seed: The run's seed.
        max_new_tokens: Tokens generated per sample at most.
        select: The answer selection (see :func:`run_eval`).
        stop: Stop patterns, strings or tuples of token ids (None: none).
    """

    task: str
    method: str
    seed: int
    max_new_tokens: int
    select: str
    stop: tuple[Any, ...] | None = None  # stop patterns (strings, or tuples of token ids)

    def __call__(
        self, parts: tuple[TaskAdapter, Backend, Sampler], batch: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        task, engine, sampler = parts
        records = _evaluate_batch(
            task, engine, sampler, self.method, batch, self.seed, self.max_new_tokens, self.select, self.stop
        )
        for r in records:
            r["stop"] = self.stops()
        heap.trim()  # in the process that sampled: its freed KV and activations back to the OS
        return records

    def stops(self) -> list[Any] | None:
        """The stop patterns as ``Sampler.run`` takes them."""
        return None if self.stop is None else [s if isinstance(s, str) else list(s) for s in self.stop]

    def finished(self, task: TaskAdapter, p: dict[str, Any], fin: Finished) -> dict[str, Any]:
        """The record of a problem that a streaming sampler finished (``Sampler.stream``).

        Args:
            task: The live task adapter (it grades the samples).
            p: The problem.
            fin: What the stream yielded for it: samples, evidence, wall time and token counts.

        Returns:
            The graded record (``streamed`` True).
        """
        rec = _grade(
            task,
            p,
            fin.samples,
            fin.log_evidence,
            self.method,
            self.seed,
            self.max_new_tokens,
            self.select,
            fin.wall_time,
        )
        rec["decode_tokens"] = fin.decode_tokens
        rec["prefill_tokens"] = fin.prefill_tokens
        rec["rollout_tokens"] = fin.rollout_tokens
        if fin.forwards is not None:
            rec["forwards"] = fin.forwards  # the problem ran alone: its sequential depth
        rec["stop"] = self.stops()
        rec["streamed"] = True  # wall_time is this problem's admission-to-grading span
        heap.trim()  # in the process that sampled: its freed KV and activations back to the OS
        return rec

    def failed(self, p: dict[str, Any], message: str) -> dict[str, Any]:
        """The record of a problem that could not be evaluated.

        Args:
            p: The problem.
            message: The error, stored in the record's ``error``.
        """
        return _record(self.task, p, self.method, self.seed, self.max_new_tokens, error=message)


def _evaluate_batch(
    task: TaskAdapter,
    engine: Backend,
    sampler: Sampler,
    method: str,
    batch: list[dict[str, Any]],
    seed: int,
    max_new_tokens: int,
    select: str,
    stop: tuple[Any, ...] | None = None,
) -> list[dict[str, Any]]:
    prompts = [task.prompt(p) for p in batch]
    try:
        call_seed = problem_seed(seed, batch[0]["unique_id"])
        stops = None if stop is None else [s if isinstance(s, str) else list(s) for s in stop]
        result = sampler.run(engine, prompts, max_new_tokens=max_new_tokens, seed=call_seed, progress=False, stop=stops)
    except RewardError as e:
        if len(batch) == 1:
            return [_record(task.name, batch[0], method, seed, max_new_tokens, error=f"RewardError: {e}")]
        # find the failing problem(s): run one at a time, recording errors, losing nothing else
        one = [_evaluate_batch(task, engine, sampler, method, [p], seed, max_new_tokens, select, stop) for p in batch]
        return [r for records in one for r in records]
    records = []
    per_problem_time = result.wall_time / len(batch)
    for p, samples, log_z in zip(batch, result.samples, result.log_evidence):
        rec = _grade(task, p, samples, log_z, method, seed, max_new_tokens, select, per_problem_time)
        rec["decode_tokens"] = result.counters.get("decode_tokens", 0) / len(batch)  # engine work, shared evenly
        rec["prefill_tokens"] = result.counters.get("prefill_tokens", 0) / len(batch)
        rec["rollout_tokens"] = result.counters.get("rollout_tokens", 0) / len(batch)  # lookahead work
        rec["forwards"] = result.counters.get("forwards", 0)  # sequential depth of the call (not divided)
        records.append(rec)
    return records


def _stop_key(stop: Any) -> tuple[Any, ...] | None:
    """Stop patterns as a hashable, JSON-round-trip-stable tuple (None for none)."""
    if not stop:
        return None
    if isinstance(stop, str):
        from smcdecode.errors import ArgumentTypeError

        raise ArgumentTypeError("stop", "expected a list of strings or token-id lists, not one string")
    return tuple(s if isinstance(s, str) else tuple(int(i) for i in s) for s in stop)


def _record(task: str, p: dict[str, Any], method: str, seed: int, max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    base = {
        "task": task,
        "uid": p["unique_id"],
        "method": method,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "correct": False,
        "time": time.time(),
    }
    base.update(extra)
    return base


def _grade(
    task: TaskAdapter,
    p: dict[str, Any],
    samples: list[Sample],
    log_z: float | None,
    method: str,
    seed: int,
    max_new_tokens: int,
    select: str,
    wall: float,
) -> dict[str, Any]:
    answers = [task.answer(s.text) for s in samples]
    rng = random.Random(zlib.crc32(f"{seed}:{p['unique_id']}".encode()))
    i = choose(samples, answers, select, rng)
    correct = bool(task.grade(p, answers[i]))
    n_correct = sum(bool(task.grade(p, a)) for a in answers) if task.grade_all else None
    return _record(
        task.name,
        p,
        method,
        seed,
        max_new_tokens,
        select=select,
        answer=answers[i],
        correct=correct,
        n_samples=len(samples),
        n_correct=n_correct,
        tokens=sum(len(s.tokens) for s in samples),
        wall_time=wall,
        log_evidence=log_z,
        samples=[
            {
                "text": s.text,
                "tokens": len(s.tokens),
                "log_weight": s.log_weight,
                "log_p": s.log_p,
                "log_target": s.log_target,
            }
            for s in samples
        ],
    )
