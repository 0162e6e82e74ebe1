"""One evaluation path for every task: MATH-500 and HumanEval are thin adapters over it.

``run_eval`` samples each problem with a method (sampler + target + proposal), picks an answer
(the sample itself drawn by weight, a weighted majority vote, or the highest weight), grades it,
and appends one durable record per problem to ``DIR/results.jsonl``. A run killed at any moment
and restarted with the same arguments skips the problems already recorded for (method, seed);
``--shard I/N`` takes every N-th problem starting at I, so N shards partition the problems.
"""

from __future__ import annotations

import math
import os
import random
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from smcdecode.engine import Engine
from smcdecode.errors import ArgumentError, RewardError
from smcdecode.records import RecordWriter, read_jsonl
from smcdecode.samplers.base import Sampler
from smcdecode.samplers.result import Sample

SELECTIONS = ("sample", "majority", "weight")


@dataclass
class TaskAdapter:
    """What differs between tasks. ``answer`` maps a sample's text to the answer that is graded
    and voted on; ``grade(problem, answer) -> bool``."""

    name: str
    problems: list[dict[str, Any]]
    prompt: Callable[[dict[str, Any]], str]
    answer: Callable[[str | None], Any]
    grade: Callable[[dict[str, Any], Any], bool]
    grade_all: bool = False  # grade every sample (for pass@k), not only the chosen one


def parse_shard(text: str | None) -> tuple[int, int]:
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
    """Every ``count``-th problem starting at ``index``: the shards partition the list."""
    return [p for k, p in enumerate(problems) if k % count == index]


def choose(samples: list[Sample], answers: list[Any], how: str, rng: random.Random) -> int:
    """Index of the chosen sample."""
    weights = [math.exp(s.log_weight) for s in samples]
    if how == "sample":
        return rng.choices(range(len(samples)), weights=weights, k=1)[0]
    if how == "weight":
        return max(range(len(samples)), key=lambda i: weights[i])
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
    engine: Engine,
    sampler: Sampler,
    method: str,
    out_dir: str,
    *,
    seed: int = 0,
    max_new_tokens: int = 512,
    select: str = "sample",
    batch_size: int = 4,
    progress: bool | None = None,
) -> str:
    """Evaluate and append records to ``out_dir/results.jsonl``; returns that path."""
    if select not in SELECTIONS:
        raise ArgumentError("select", f"unknown selection {select!r}; use one of {SELECTIONS}")
    path = os.path.join(out_dir, "results.jsonl")
    done = {(r.get("uid"), r.get("method"), r.get("seed")) for r in read_jsonl(path)}
    todo = [p for p in task.problems if (p["unique_id"], method, seed) not in done]
    show = progress if progress is not None else None
    with (
        RecordWriter(path) as writer,
        tqdm(total=len(todo), desc=f"{task.name} {method}", disable=show is False, leave=False) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for rec in _evaluate_batch(task, engine, sampler, method, batch, seed, max_new_tokens, select):
                writer.append(rec)
                bar.update(1)
    return path


def _evaluate_batch(
    task: TaskAdapter,
    engine: Engine,
    sampler: Sampler,
    method: str,
    batch: list[dict[str, Any]],
    seed: int,
    max_new_tokens: int,
    select: str,
) -> list[dict[str, Any]]:
    prompts = [task.prompt(p) for p in batch]
    try:
        result = sampler.run(engine, prompts, max_new_tokens=max_new_tokens, seed=seed, progress=False)
    except RewardError:
        if len(batch) == 1:
            raise
        # find the failing problem(s): run one at a time, recording errors, losing nothing else
        out = []
        for p in batch:
            try:
                out.extend(_evaluate_batch(task, engine, sampler, method, [p], seed, max_new_tokens, select))
            except RewardError as e:
                out.append(_record(task, p, method, seed, max_new_tokens, error=f"RewardError: {e}"))
        return out
    records = []
    per_problem_time = result.wall_time / len(batch)
    for p, samples, log_z in zip(batch, result.samples, result.log_evidence):
        records.append(_grade(task, p, samples, log_z, method, seed, max_new_tokens, select, per_problem_time))
    return records


def _record(
    task: TaskAdapter, p: dict[str, Any], method: str, seed: int, max_new_tokens: int, **extra: Any
) -> dict[str, Any]:
    base = {
        "task": task.name,
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
        task,
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
