"""Continuous batching: problems flow through a batch that stays full.

``R = problems_in_flight × n`` rows (n chains or samples per problem) run the asynchronous
schedule of :func:`~smcdecode.samplers.suffix_mh.async_step` (SuffixMH; Ancestral is the same
schedule with one block of ``max_new_tokens`` and no moves). When every row of a problem has
finished its schedule, its samples are yielded at once and the next waiting problem is prefilled
into the freed rows (:meth:`~smcdecode.backends.Backend.admit`; no forward over the other rows).

Law. Each problem draws from its own random stream, seeded by its own seed
(:class:`~smcdecode.samplers.rng.ProblemStreams`), and every row follows the same sequence of
operations as when its problem runs alone, so a problem's samples do not depend on which other
problems share the batch, nor on which rows it occupies (up to floating-point differences of
batched forwards). When no problem is waiting, finished problems' rows leave the batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentError
from smcdecode.readouts import Readouts
from smcdecode.samplers.core import CHECK_EVERY, Decoder, Problem, check_run_args, collect, empty_chains
from smcdecode.samplers.result import Sample, Trace
from smcdecode.samplers.rng import ProblemStreams
from smcdecode.samplers.schedule import Rows, RowsPlan, async_step
from smcdecode.samplers.schedule import Schedule as RowSchedule
from smcdecode.stopping import StopSet

COMPACT_EVERY = 32  # iterations between compaction checks


def check_every(device: torch.device) -> int:
    """Iterations between the host checks for finished problems: every iteration on the CPU (where
    reading a flag costs nothing and a finished problem's rows would otherwise idle for up to
    CHECK_EVERY − 1 forwards), every CHECK_EVERY on an accelerator (each check is a sync)."""
    return 1 if device.type == "cpu" else CHECK_EVERY


@dataclass
class Finished:
    """One problem's samples, as soon as they are done."""

    key: Any
    samples: list[Sample]
    decode_tokens: int  # tokens fed for this problem's rows after its prefill (its decode work)
    prefill_tokens: int
    wall_time: float  # from its admission to its last sample (other problems ran meanwhile)
    rollout_tokens: int = 0  # tokens fed to lookahead rollouts (not part of decode_tokens)
    forwards: int | None = None  # sequential forwards of its run (None: shared with other problems)
    log_evidence: float | None = None  # SMC's log Ẑ of this problem (None for other samplers)


def stream(
    plan: RowsPlan,
    engine: Backend,
    problems: Iterable[tuple[Any, Any, int]],
    *,
    in_flight: int,
    max_new_tokens: int,
    stop: StopSet | None = None,
) -> Iterator[Finished]:
    """Yield every problem's ``n`` samples as soon as they are done, keeping ``in_flight``
    problems in the batch. ``problems``: (key, prompt, seed) triples, consumed lazily."""
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
        raise ArgumentError("in_flight", f"must be an int >= 1, got {in_flight!r}")
    check_run_args(max_new_tokens, 0)
    n, moves = plan.n, plan.moves
    queue = iter(problems)
    first = _take(queue, in_flight, engine, max_new_tokens)
    if not first:
        return
    dev = engine.device
    rng = ProblemStreams(dev, len(first) * n)
    prompts: list[Any] = []
    problem = Problem(engine, plan.target, plan.proposal, prompts, [], n, max_new_tokens, rng)
    problem.stop = stop
    slot_of: list[int] = []  # problem index (in admission order) of each slot of n rows
    keys: list[Any] = []
    started: list[float] = []
    prefill: list[int] = []

    def register(key: Any, prompt: Any, ids: list[int], seed: int, rows: torch.Tensor) -> int:
        k = len(keys)
        keys.append(key)
        prompts.append(prompt)
        problem.prompt_ids.append(ids)
        rng.add(k, seed, rows)
        started.append(time.perf_counter())
        prefill.append(len(ids))
        return k

    for s, (key, prompt, ids, seed) in enumerate(first):
        slot_of.append(register(key, prompt, ids, seed, torch.arange(s * n, (s + 1) * n)))
    decoder = Decoder(engine, problem.requirements, problem.prompt_ids, n)
    cur = empty_chains(problem, decoder.start())
    rows = Rows(cur, cur.clone(), RowSchedule.start(len(first) * n, dev))
    rows.sch.ids = _ids(slot_of, n, dev)
    iteration, exhausted, every = 0, False, check_every(dev)
    while True:
        rows, _, _ = async_step(problem, decoder, rows, moves.block_size, moves.steps, moves.reuse_suffix)
        iteration += 1
        if iteration % COMPACT_EVERY == 0:
            decoder.compact()
        if iteration % every != 0:
            continue
        done = rows.sch.done.view(-1, n).all(1).tolist()  # host sync, [slots]
        finished = [s for s, d in enumerate(done) if d and slot_of[s] >= 0]
        for s in finished:
            k, idx = slot_of[s], torch.arange(s * n, (s + 1) * n, device=dev)
            samples = collect(problem, rows.cur.index_select(idx), None, Trace()).samples[0]
            fed = int(rows.fed[idx].sum())
            yield Finished(keys[k], samples, fed, prefill[k], time.perf_counter() - started[k])
            rng.remove(k)
            slot_of[s] = -1
        if finished and not exhausted:
            new = _take(queue, len(finished), engine, max_new_tokens)
            exhausted = len(new) < len(finished)
            admitted = []
            for s, (key, prompt, ids, seed) in zip(finished, new):
                idx = torch.arange(s * n, (s + 1) * n)
                slot_of[s] = register(key, prompt, ids, seed, idx)
                admitted.append(idx)
            if admitted:
                idx = torch.cat(admitted).to(dev)
                view = decoder.admit(idx, [problem.prompt_ids[slot_of[int(i) // n]] for i in idx.tolist()])
                rows = _reset(rows, idx, view, problem)
                rows.sch.ids = _ids(slot_of, n, dev)
        if all(k < 0 for k in slot_of):
            return
        if exhausted and 2 * sum(k < 0 for k in slot_of) >= len(slot_of):  # drop finished slots
            keep = [s for s, k in enumerate(slot_of) if k >= 0]
            idx = torch.tensor([s * n + j for s in keep for j in range(n)], device=dev)
            decoder.keep_rows(idx)
            rng.select(idx)
            cur, prop, sch = rows.cur.index_select(idx), rows.prop.index_select(idx), rows.sch.index_select(idx)
            rows = Rows(cur, prop, sch, rows.fed[idx])
            slot_of = [slot_of[s] for s in keep]


def _take(queue: Iterator[tuple[Any, Any, int]], k: int, engine: Backend, max_new_tokens: int) -> list[Any]:
    out = []
    for key, prompt, seed in queue:
        ids = engine.encode([prompt])[0]
        if len(ids) + max_new_tokens > engine.max_positions:
            raise ArgumentError(
                "max_new_tokens",
                f"problem {key!r} ({len(ids)} prompt tokens) + {max_new_tokens} exceeds the context "
                f"({engine.max_positions})",
            )
        out.append((key, prompt, ids, seed))
        if len(out) == k:
            break
    return out


def _ids(slot_of: list[int], n: int, device: torch.device) -> torch.Tensor:
    """The global row id of every batch row: problem index · n + sample index ([B])."""
    return torch.tensor([k * n + j for k in slot_of for j in range(n)], device=device)


def _reset(rows: Rows, idx: torch.Tensor, view: Readouts, problem: Problem) -> Rows:
    """Rows ``idx`` start afresh (a newly admitted problem) with next-token readouts ``view``."""

    b = rows.cur.length.shape[0]
    where = torch.zeros(b, dtype=torch.bool, device=idx.device)
    where[idx] = True
    slot = torch.zeros(b, dtype=torch.long, device=idx.device)
    slot[idx] = torch.arange(idx.shape[0], device=idx.device)
    fresh = empty_chains(problem, view.index_select(slot))  # [B], the admitted rows' readouts
    cur, prop = fresh.where(where, rows.cur), fresh.where(where, rows.prop)
    fresh_sch = RowSchedule.start(b, idx.device)
    sch = RowSchedule(
        *(torch.where(where, getattr(fresh_sch, f.name), getattr(rows.sch, f.name)) for f in fields(fresh_sch))
    )
    return Rows(cur, prop, sch, torch.where(where, 0, rows.fed))
