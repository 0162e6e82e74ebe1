"""Sampler base: ``run(engine, prompts, *, max_new_tokens, seed) -> Result``, progress bars and
the conversion of final chains into :class:`Sample` lists."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentTypeError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.samplers.result import Result
from smcdecode.samplers.schedule import RowsPlan
from smcdecode.samplers.stream import Finished
from smcdecode.samplers.stream import stream as stream_rows
from smcdecode.stopping import StopSet, StopSpec, stop_set
from smcdecode.targets.base import Potential


def check_target_proposal(target: Any, proposal: Any, target_optional: bool = False) -> None:
    """Typed errors naming the argument when ``target`` is not a Potential (None allowed when
    ``target_optional``) or ``proposal`` is not a Proposal."""
    if not (isinstance(target, Potential) or (target_optional and target is None)):
        raise ArgumentTypeError("target", f"expected a Potential, got {type(target).__name__}")
    if not isinstance(proposal, Proposal):
        raise ArgumentTypeError("proposal", f"expected a Proposal, got {type(proposal).__name__}")


class Sampler:
    """The interface every sampler implements: ``run`` for a batch of prompts, ``stream`` for many
    problems through one batch.

    Subclasses implement ``_run``; ``rows_plan`` and ``streams`` say whether and how they batch
    continuously.
    """

    def run(
        self,
        engine: Backend,
        prompts: Any,
        *,
        max_new_tokens: int,
        seed: int = 0,
        progress: bool | None = None,
        stop: StopSpec | StopSet | None = None,
    ) -> Result:
        """Draw samples for every prompt.

        Args:
            engine: The backend that runs the model (``smcdecode.Engine``, the llama.cpp backend,
                ``smcdecode.ReferenceBackend``).
            prompts: A list of prompts, each a string (needs a tokenizer) or a list of token ids.
            max_new_tokens: Tokens generated per sample at most (the horizon H).
            seed: Seed of the run's random stream; the same seed gives the same samples.
            progress: Show progress bars; None shows them only on a terminal.
            stop: Stop patterns: a list of strings (need a tokenizer) and/or token-id lists. A sample
                ends at the token whose text first completes one of them (that token included), at EOS,
                or at ``max_new_tokens``. The target and the proposal are both taken on that stopped
                space.

        Returns:
            The samples of every prompt (``result.samples[p]``), with the trace, the backend's counters
            (``decode_tokens``, ``forwards``, ``rollout_tokens``, ...), the wall time and, for SMC, the
            evidence estimate ``result.log_evidence[p]``.

        Raises:
            ArgumentTypeError: ``engine`` is not a smcdecode backend.
            ArgumentError: an argument is out of range (the error names it).
            CapabilityError: the target or proposal needs a readout the backend cannot compute.
        """
        if not isinstance(engine, Backend):
            got = type(engine).__name__
            raise ArgumentTypeError("engine", f"expected a smcdecode backend (e.g. smcdecode.Engine), got {got}")
        t0 = time.perf_counter()
        before = engine.counters
        with torch.no_grad():
            stops = stop if isinstance(stop, StopSet) or stop is None else stop_set(engine, stop)
            result = self._run(engine, prompts, max_new_tokens, seed, _show(progress), stops)
        after = engine.counters
        result.wall_time = time.perf_counter() - t0
        result.counters = {k: after[k] - before[k] for k in after}
        result.method = repr(self)
        return result

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        raise NotImplementedError  # abstract

    def rows_plan(self, max_new_tokens: int) -> RowsPlan | None:
        """How this sampler runs as rows with their own schedules (continuous batching), or None
        when its rows move in lockstep (SMC, which streams its own way: ``SMC.stream``).

        Args:
            max_new_tokens: Tokens generated per sample at most.

        Returns:
            The schedule, target, proposal and rows per problem, or None.
        """
        return None

    def streams(self, engine: Backend) -> bool:
        """Does :meth:`stream` keep problems flowing through one batch (so that an evaluation
        should run this sampler through it, whatever its batch size)? Samplers with a
        :meth:`rows_plan`, and SMC (see ``SMC.streams``).

        Args:
            engine: The backend the sampler would run on.
        """
        return self.rows_plan(1) is not None

    def stream(
        self,
        engine: Backend,
        problems: Iterable[tuple[Any, Any, int]],
        *,
        in_flight: int,
        max_new_tokens: int,
        stop: StopSpec | StopSet | None = None,
    ) -> Iterator[Finished]:
        """Yield each problem's samples as soon as they are done.

        A problem's samples depend only on its seed (not on which problems share the batch). Samplers
        with a ``rows_plan`` (Ancestral, SuffixMH) keep ``in_flight`` problems in one batch and admit a
        waiting problem into the rows a finished one frees (``smcdecode.samplers.stream``), and so does
        SMC its own way (``SMC.stream``); the others run the problems one at a time, and so do
        proposals with rollouts (``Lookahead``), so that the backend's counters give each problem its
        own rollout tokens.

        Args:
            engine: The backend that runs the model.
            problems: (key, prompt, seed) triples, consumed lazily.
            in_flight: Problems in the batch at once.
            max_new_tokens: Tokens generated per sample at most.
            stop: Stop patterns, as in ``run``.

        Yields:
            A ``Finished(key, samples, decode_tokens, prefill_tokens, wall_time, ...)`` per problem, in
            the order they finish.

        Raises:
            ArgumentTypeError: ``engine`` is not a smcdecode backend.
            ArgumentError: ``in_flight`` is below 1.
        """
        if not isinstance(engine, Backend):
            raise ArgumentTypeError("engine", f"expected a smcdecode backend, got {type(engine).__name__}")
        check_int("in_flight", in_flight, 1)
        plan = self.rows_plan(max_new_tokens)
        if plan is not None and not plan.proposal.auxiliary:
            stops = stop if isinstance(stop, StopSet) or stop is None else stop_set(engine, stop)
            with torch.no_grad():
                yield from stream_rows(
                    plan, engine, problems, in_flight=in_flight, max_new_tokens=max_new_tokens, stop=stops
                )
            return
        for key, prompt, seed in problems:
            res = self.run(engine, [prompt], max_new_tokens=max_new_tokens, seed=seed, progress=False, stop=stop)
            counters = res.counters
            yield Finished(
                key,
                res.samples[0],
                counters.get("decode_tokens", 0),
                counters.get("prefill_tokens", 0),
                res.wall_time,
                counters.get("rollout_tokens", 0),
                counters.get("forwards"),
                res.log_evidence[0],
            )


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
