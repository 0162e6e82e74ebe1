"""Several problems' own sampler loops on one shared batch: SMC on the continuous-batching schedule.

Each problem runs its sampler's unchanged loop (``SMC._loop``) on its own
:class:`~smcdecode.samplers.core.Problem` (its own random stream, seeded by its own seed; its own
step counter, schedule, resampling and moves) in a Python thread used as a coroutine: one thread
runs at a time, until it asks for a forward or ends. The threads share one multi-stream
:class:`~smcdecode.samplers.core.Decoder` over ``slots × n`` rows (slot s owns rows s·n .. s·n+n−1);
a thread sees its rows through a :class:`SlotDecoder`, the decoder's interface on local rows 0..n−1.

Schedule. The scheduler (the caller's generator) resumes the threads in slot order; each runs until
it asks for a forward (``decode``, ``score``) or finishes. The operations without a forward
(``select``, ``start_moves``, ``restore_rows``, ``compact``) are queued by the proxy and applied by
the scheduler once every thread is parked, each problem's in its own order; operations of
different problems act on disjoint rows, so they commute and those of one kind are merged into one
call (one resampling copy for all problems; one compaction, which changes no context). Then ONE
merged ``decode`` serves the problems that asked for one (the other rows inactive), then ONE
merged ``score`` (ragged; the other rows score no token), and each thread gets its rows' readouts.
Decodes go first: a problem that truncated rows (a move) always asks for a decode next and the
backend re-feeds every pending row in any decode, so no forward may run while a problem sits
between its truncate and its decode, which parking every thread first guarantees.

At that same safe point finished problems are yielded (:class:`~smcdecode.samplers.stream.Finished`
with the tokens fed for their rows, counted on the device) and waiting problems take the freed
slots: the prompt is prefilled into the slot's first row (:meth:`Decoder.admit`) and copied into its
other rows. Once no problem is waiting and at least half the slots are empty, the empty slots' rows
leave the batch (:meth:`Decoder.keep_rows`); proxies hold no row offsets, the scheduler maps a
slot's local rows to the batch's at every operation.

Law. A problem makes exactly the draws and decoder operations it makes alone, from the same random
stream, so its samples, weights and log Ẑ are those of running it alone with its seed, up to
floating-point differences of batched forwards (its rows share forwards with other rows). The
order of the threads and of the merged operations is fixed, so a run is reproducible.

Errors. An exception in a problem's thread is re-raised in the caller; the other threads are woken
with an abort and end (daemon threads, none left blocked), as they are when the generator is closed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smcdecode.backends import Backend
from smcdecode.readouts import Readouts
from smcdecode.samplers.core import Chains, Decoder, DecoderOps, Problem, Scored, empty_chains
from smcdecode.samplers.result import Result
from smcdecode.samplers.stream import Finished

JOIN_TIMEOUT = 10.0  # seconds to wait for an aborted thread to end (it ends at once when parked)


class _Aborted(BaseException):
    """Ends a problem's thread (the stream failed or was closed); not an ``Exception``, so no
    ``except Exception`` in a sampler or a reward swallows it."""


_ABORT = object()


@dataclass
class _Decode:
    tokens: Tensor  # [n]
    active: Tensor  # [n] bool


@dataclass
class _Score:
    tokens: Tensor  # [n, Q]
    n_tokens: Tensor  # [n]


@dataclass
class _Op:
    """A queued operation without a forward, on the slot's local rows."""

    kind: str  # "select", "start_moves", "restore_rows" or "compact"
    rows: Tensor | None = None  # select: long [n] indices; the others: bool [n]
    keep: Tensor | None = None  # start_moves: long [n]


class _Worker:
    """A problem's loop in a daemon thread used as a coroutine: :meth:`step` (the scheduler) runs
    it until it asks for a forward (:meth:`call`, in the thread) or ends."""

    def __init__(self, name: str, fn: Callable[[], Result]):
        self._inbox: queue.Queue[Any] = queue.Queue()  # unbounded: a put never blocks
        self._outbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._fn = fn
        self.request: _Decode | _Score | None = None
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ in the problem's thread
    def _main(self) -> None:
        outcome: tuple[str, Any]
        try:
            self._wait()  # run only when stepped
            with torch.no_grad():  # grad mode is per thread
                outcome = ("done", self._fn())
        except _Aborted:
            outcome = ("aborted", None)
        except BaseException as e:  # re-raised in the caller
            outcome = ("error", e)
        self._outbox.put(outcome)

    def _wait(self) -> Any:
        msg = self._inbox.get()
        if msg is _ABORT:
            raise _Aborted
        return msg

    def call(self, request: _Decode | _Score) -> Any:
        """Park on a forward request until the scheduler replies."""
        self._outbox.put(("request", request))
        return self._wait()

    # ------------------------------------------------------------------ in the scheduler
    def step(self, reply: Any = None) -> None:
        """Hand the thread ``reply`` and run it until its next request or its end."""
        self.request = None
        self._inbox.put(reply)
        kind, value = self._outbox.get()
        if kind == "request":
            self.request = value
            return
        self.done = True
        if kind == "done":
            self.result = value
        elif kind == "error":
            self.error = value

    def abort(self) -> None:
        """End the thread (it raises ``_Aborted`` where it waits) and join it."""
        if not self.done:
            self._inbox.put(_ABORT)
        self.thread.join(JOIN_TIMEOUT)


class SlotDecoder:
    """One problem's view of its n rows of the shared batch: the decoder interface
    (:class:`~smcdecode.samplers.core.DecoderOps`) on local rows 0..n−1. Forwards park the
    problem's thread until the scheduler's merged forward; other operations are queued for the
    scheduler (applied before the next forward, in order)."""

    hidden = False  # targets and proposals needing the hidden state run one problem at a time

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self._call: Callable[[_Decode | _Score], Any] | None = None

    def connect(self, call: Callable[[_Decode | _Score], Any]) -> None:
        self._call = call

    def _forward(self, request: _Decode | _Score) -> Any:
        assert self._call is not None, "connect() the proxy to its thread first"
        return self._call(request)

    def decode(self, tokens: Tensor, active: Tensor) -> Readouts:
        out: Readouts = self._forward(_Decode(tokens, active))
        return out

    def score(self, tokens: Tensor, n_tokens: Tensor) -> Scored:
        out: Scored = self._forward(_Score(tokens, n_tokens))
        return out

    def bind(self, view: Readouts, positions: Tensor | None = None) -> Readouts:
        return view  # nothing to bind without the hidden state

    def start_moves(self, rows: Tensor, keep: Tensor) -> None:
        self.ops.append(_Op("start_moves", rows.clone(), keep.clone()))

    def restore_rows(self, rows: Tensor) -> None:
        self.ops.append(_Op("restore_rows", rows.clone()))

    def select(self, idx: Tensor) -> None:
        self.ops.append(_Op("select", idx.clone()))

    def compact(self) -> None:
        self.ops.append(_Op("compact"))


@dataclass
class _Slot:
    key: Any
    proxy: SlotDecoder
    worker: _Worker
    started: float
    prefill: int


Body = Callable[[Problem, DecoderOps, Chains], Result]


def multiplex(
    engine: Backend,
    problems: Iterable[tuple[Any, Any, int]],
    *,
    in_flight: int,
    rows: int,
    prepare: Callable[[Any, int], Problem],
    body: Body,
) -> Iterator[Finished]:
    """Yield every problem's samples as soon as its loop is done, keeping ``in_flight`` problems
    of ``rows`` rows each in one batch. ``problems``: (key, prompt, seed) triples, consumed lazily;
    ``prepare(prompt, seed)`` builds a problem's :class:`Problem` (one prompt; in the caller's
    thread, so argument errors surface there); ``body(problem, decoder, chains)`` is its loop,
    run in its thread from the chains after the prompt."""
    n, dev = rows, engine.device
    waiting = iter(problems)
    first = _take(waiting, in_flight, prepare)
    if not first:
        return
    decoder = Decoder(engine, first[0][1].requirements, [p.prompt_ids[0] for _, p in first], n)
    slots: list[_Slot | None] = []
    try:
        view = decoder.start()
        fed = torch.zeros(len(first) * n, dtype=torch.long, device=dev)  # tokens fed per row
        for s, (key, problem) in enumerate(first):
            slots.append(_start(key, problem, view.index_select(_rows(s, n, dev)), body))
        to_step: dict[int, Any] = {s: None for s in range(len(slots))}
        exhausted = len(first) < in_flight
        while True:
            for s in sorted(to_step):
                slot = slots[s]
                assert slot is not None
                slot.worker.step(to_step[s])
            to_step = {}
            _apply(decoder, slots, n)
            for s, slot in enumerate(slots):
                if slot is None or not slot.worker.done:
                    continue
                if slot.worker.error is not None:
                    raise slot.worker.error
                res = slot.worker.result
                assert res is not None
                slots[s] = None
                slot.worker.abort()  # its thread has ended: join it
                tokens = int(fed[_rows(s, n, dev)].sum())
                wall = time.perf_counter() - slot.started
                yield Finished(slot.key, res.samples[0], tokens, slot.prefill, wall, log_evidence=res.log_evidence[0])
            free = [s for s, slot in enumerate(slots) if slot is None]
            if free and not exhausted:
                new = _take(waiting, len(free), prepare)
                exhausted = len(new) < len(free)
                if new:
                    to_step = _admit(decoder, slots, fed, free, new, n, body)
                    continue  # run the admitted problems to their first forward
            live = [s for s, slot in enumerate(slots) if slot is not None]
            if not live:
                return
            if exhausted and 2 * (len(slots) - len(live)) >= len(slots):  # drop the empty slots
                idx = torch.cat([_rows(s, n, dev) for s in live])
                decoder.keep_rows(idx)
                fed = fed[idx]
                slots = [slots[s] for s in live]
            to_step = _forwards(decoder, slots, n, fed)
    finally:
        for slot in slots:
            if slot is not None:
                slot.worker.abort()
        for stream in decoder.streams:
            stream.engine.release(stream.batch)


def _take(waiting: Iterator[tuple[Any, Any, int]], k: int, prepare: Callable[[Any, int], Problem]) -> list[Any]:
    out: list[tuple[Any, Problem]] = []
    while len(out) < k:
        try:
            key, prompt, seed = next(waiting)
        except StopIteration:
            break
        out.append((key, prepare(prompt, seed)))
    return out


def _rows(s: int, n: int, device: torch.device) -> Tensor:
    return torch.arange(s * n, (s + 1) * n, device=device)


def _start(key: Any, problem: Problem, view: Readouts, body: Body) -> _Slot:
    """A problem's thread (not yet running), from its rows' readouts after the prompt."""
    chains = empty_chains(problem, view)
    proxy = SlotDecoder()
    worker = _Worker(f"smcdecode-problem-{key}", lambda: body(problem, proxy, chains))
    proxy.connect(worker.call)
    return _Slot(key, proxy, worker, time.perf_counter(), len(problem.prompt_ids[0]))


def _admit(
    decoder: Decoder,
    slots: list[_Slot | None],
    fed: Tensor,
    free: list[int],
    new: list[tuple[Any, Problem]],
    n: int,
    body: Body,
) -> dict[int, Any]:
    """Problems ``new`` take the first free slots: each prompt is prefilled into its slot's first
    row and copied into the others. Returns the slots to step (their threads' first run)."""
    dev = fed.device
    taken = free[: len(new)]
    view = decoder.admit(torch.tensor([s * n for s in taken], device=dev), [p.prompt_ids[0] for _, p in new])
    idx = torch.arange(len(slots) * n, device=dev)
    for s in taken:
        idx[s * n : (s + 1) * n] = s * n
    decoder.select(idx)
    for k, (s, (key, problem)) in enumerate(zip(taken, new)):
        fed[s * n : (s + 1) * n] = 0
        slots[s] = _start(key, problem, view.index_select(torch.full((n,), k, device=dev)), body)
    return {s: None for s in taken}


def _apply(decoder: Decoder, slots: list[_Slot | None], n: int) -> None:
    """Apply every slot's queued operations: each slot's in its order, the heads of one kind
    merged across slots into one call (disjoint rows: they commute); one compaction at the end."""
    pending: dict[int, deque[_Op]] = {}
    compact = False
    for s, slot in enumerate(slots):
        if slot is None or not slot.proxy.ops:
            continue
        ops = [op for op in slot.proxy.ops if op.kind != "compact"]
        compact = compact or len(ops) < len(slot.proxy.ops)
        slot.proxy.ops = []
        if ops:
            pending[s] = deque(ops)
    size, dev = len(slots) * n, decoder.engine.device
    while pending:
        kind = next(iter(pending.values()))[0].kind  # the head of the first slot's queue
        group = [(s, q.popleft()) for s, q in pending.items() if q[0].kind == kind]
        pending = {s: q for s, q in pending.items() if q}
        if kind == "select":
            idx = torch.arange(size, device=dev)
            for s, op in group:
                assert op.rows is not None
                idx[s * n : (s + 1) * n] = op.rows.to(dev) + s * n
            decoder.select(idx)
            continue
        mask = torch.zeros(size, dtype=torch.bool, device=dev)
        keep = torch.zeros(size, dtype=torch.long, device=dev)
        for s, op in group:
            assert op.rows is not None
            mask[s * n : (s + 1) * n] = op.rows.to(dev)
            if op.keep is not None:
                keep[s * n : (s + 1) * n] = op.keep.to(dev)
        if kind == "start_moves":
            decoder.start_moves(mask, keep)
        else:
            decoder.restore_rows(mask)
    if compact:
        decoder.compact()


def _forwards(decoder: Decoder, slots: list[_Slot | None], n: int, fed: Tensor) -> dict[int, Any]:
    """One merged decode, then one merged score, for every parked slot; counts each row's fed
    tokens into ``fed`` (in place; once per stream on the main backend, as its counters do).
    Returns each slot's reply (its rows' readouts)."""
    size, dev = len(slots) * n, fed.device
    streams = sum(st.engine is decoder.engine for st in decoder.streams)  # counted as the run's decode tokens
    decodes: list[tuple[int, _Decode]] = []
    scores: list[tuple[int, _Score]] = []
    for s, slot in enumerate(slots):
        if slot is None:
            continue
        req = slot.worker.request
        if isinstance(req, _Decode):
            decodes.append((s, req))
        elif isinstance(req, _Score):
            scores.append((s, req))
        else:
            raise AssertionError(f"problem {slot.key!r} is live but asks for no forward")
    replies: dict[int, Any] = {}
    if decodes:
        tokens = torch.zeros(size, dtype=torch.long, device=dev)
        active = torch.zeros(size, dtype=torch.bool, device=dev)
        for s, d in decodes:
            tokens[s * n : (s + 1) * n] = d.tokens.to(dev)
            active[s * n : (s + 1) * n] = d.active.to(dev)
        pending = decoder.streams[0].batch.pending.to(dev) >= 0  # truncated rows re-feed a token
        out = decoder.decode(tokens, active)
        fed += streams * (active | pending).long()
        for s, _ in decodes:
            replies[s] = out.index_select(_rows(s, n, dev))
    if scores:
        q = max(int(c.tokens.shape[1]) for _, c in scores)
        tokens = torch.zeros(size, q, dtype=torch.long, device=dev)
        count = torch.zeros(size, dtype=torch.long, device=dev)
        for s, c in scores:
            tokens[s * n : (s + 1) * n, q - c.tokens.shape[1] :] = c.tokens.to(dev)
            count[s * n : (s + 1) * n] = c.n_tokens.to(dev)
        scored = decoder.score(tokens, count)
        fed += streams * count
        for s, c in scores:
            replies[s] = _columns(scored, _rows(s, n, dev), q - int(c.tokens.shape[1]))
    return replies


def _columns(scored: Scored, rows: Tensor, start: int) -> Scored:
    """Rows ``rows`` and columns ``start``.. of a merged score (real tokens are right-aligned, so
    a problem's Q columns are the batch's last Q, at the same positions)."""
    return Scored(scored.readouts.map(lambda t: t[rows][:, start:]), scored.positions[rows][:, start:])
