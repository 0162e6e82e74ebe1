"""Ancestral sampling: x ~ q, n independent samples per prompt, all prompts in one batch.
Greedy decoding is ``Tempered`` with a tiny temperature or ``top_k=1``."""

from __future__ import annotations

from typing import Any

import torch

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentTypeError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.samplers.base import Sampler
from smcdecode.samplers.core import collect, extend, make_problem, start_chains
from smcdecode.samplers.result import Result, Trace
from smcdecode.samplers.schedule import Moves, RowsPlan
from smcdecode.stopping import StopSet
from smcdecode.targets.base import Potential


class Ancestral(Sampler):
    """Independent samples x ~ q: ``n`` per prompt, all prompts in one batch.

    Args:
        proposal: The distribution sampled from (``Tempered(T, top_k, top_p)``, ``LocallyOptimal``,
            ``EGLR``, ...).
        n: Samples per prompt.
        target: Optional; only to report each sample's ``log_target`` (its weight is then
            log π − log q).

    Raises:
        ArgumentTypeError: ``proposal`` is not a Proposal.
        ArgumentError: ``n`` is below 1.
    """

    def __init__(self, proposal: Proposal, n: int = 1, target: Potential | None = None):
        if not isinstance(proposal, Proposal):
            raise ArgumentTypeError("proposal", f"expected a Proposal, got {type(proposal).__name__}")
        self.proposal = proposal
        self.n = check_int("n", n, 1)
        self.target = target  # optional: only to report log_target of each sample

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        problem = make_problem(engine, prompts, self.target, self.proposal, self.n, max_new_tokens, seed, stop)
        decoder, chains = start_chains(problem)
        extend(problem, decoder, chains, max_new_tokens)
        problem.update_psi(chains, torch.ones_like(chains.ended), partial_ok=False)
        return collect(problem, chains, None, Trace())

    def rows_plan(self, max_new_tokens: int) -> RowsPlan:
        """Continuous batching: the asynchronous schedule with one block and no moves.

        Args:
            max_new_tokens: Tokens generated per sample at most (the block's length).
        """
        return RowsPlan(Moves(max_new_tokens, 0), self.target, self.proposal, self.n)

    def __repr__(self) -> str:
        return f"Ancestral({self.proposal!r}, n={self.n})"
