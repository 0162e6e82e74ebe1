"""Interior-block Metropolis–Hastings, alone or mixed with suffix moves.

The schedule is :class:`~smcdecode.samplers.suffix_mh.SuffixMH`'s: blocks of ``block_size``
tokens, horizon H_k = min(k·block_size, max_new_tokens), intermediate target π_k = π restricted
to the first H_k tokens; each block extends every chain to H_k with q, then runs ``steps`` moves.
A move is an interior-block move (:func:`~smcdecode.samplers.kernels.block_move`: a block of
``span`` tokens x_[i, i+span) is redrawn from q and the suffix after it is kept, rescored in its new
context by one teacher-forced forward) or, every ``suffix_every``-th move of the run, a suffix move
(:func:`~smcdecode.samplers.kernels.mh_move`). Both leave π_k invariant, so any fixed cycle of them
does (a composition of π_k-invariant kernels is π_k-invariant); the suffix moves also change the
end of a sequence by more than ``span`` tokens at once, which block moves alone cannot.

Execution is synchronous: every row (every chain of every prompt) makes the same move kind at the
same time, so a move costs the longest block regeneration in the batch (≤ ``span`` forwards) plus
one rescoring forward over the batch, whose rows are padded to the longest kept suffix.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.samplers import kernels
from smcdecode.samplers.base import Sampler, bar, check_target_proposal
from smcdecode.samplers.core import collect, extend, make_problem, start_chains
from smcdecode.samplers.result import ExtendTrace, Result, Trace
from smcdecode.stopping import StopSet
from smcdecode.targets.base import Potential


class BlockMH(Sampler):
    """Interior-block Metropolis–Hastings, alone or mixed with suffix moves (``SuffixMH``'s schedule).

    Args:
        target: The target potential π.
        proposal: The proposal q of extensions and blocks; a proposal with rollouts needs
            ``suffix_every=1``.
        chains: Chains per prompt.
        block_size: Tokens per block of the schedule (the horizon's growth), not the move's span.
        steps: MH moves after each block.
        span: Tokens of an interior block B that a move redraws.
        suffix_every: Every k-th move is a suffix move (0: interior-block moves only, 1: suffix
            moves only, 2: alternate).

    Raises:
        ArgumentTypeError: ``target`` is not a Potential or ``proposal`` not a Proposal.
        ArgumentError: an integer is out of range, or the proposal has rollouts and
            ``suffix_every != 1``.
    """

    def __init__(
        self,
        target: Potential,
        proposal: Proposal,
        chains: int = 1,
        block_size: int = 192,
        steps: int = 10,
        span: int = 16,
        suffix_every: int = 0,
    ):
        check_target_proposal(target, proposal)
        self.target = target
        self.proposal = proposal
        self.chains = check_int("chains", chains, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.steps = check_int("steps", steps, 0)
        self.span = check_int("span", span, 1)
        self.suffix_every = check_int("suffix_every", suffix_every, 0)
        if proposal.auxiliary and self.suffix_every != 1:
            raise ArgumentError(
                "proposal",
                f"interior-block moves keep the suffix, whose rollouts {proposal!r} drew given the old prefix: "
                "not exact with a rollout proposal (use SuffixMH, or suffix_every=1)",
            )

    def kernel(self, move: int) -> str:
        """ "suffix" or "block": the kernel of the run's ``move``-th move (1-based).

        Args:
            move: The move's number in the run, from 1 (every ``suffix_every``-th is a suffix move).
        """
        return "suffix" if self.suffix_every and move % self.suffix_every == 0 else "block"

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        problem = make_problem(engine, prompts, self.target, self.proposal, self.chains, max_new_tokens, seed, stop)
        decoder, cur = start_chains(problem)
        n_blocks = math.ceil(max_new_tokens / self.block_size)
        trace = Trace()
        everyone = torch.ones_like(cur.ended)
        move = 0
        with bar(n_blocks * (self.steps + 1), "BlockMH", progress) as pbar:
            for k in range(1, n_blocks + 1):
                horizon = min(k * self.block_size, max_new_tokens)
                old = cur.length.clone()
                extend(problem, decoder, cur, horizon)
                problem.update_psi(cur, everyone, partial_ok=False)
                trace.log(ExtendTrace(k, old, cur.length.clone()))
                pbar.update(1)
                for s in range(self.steps):
                    move += 1
                    kernel = self.kernel(move)
                    if kernel == "suffix":
                        cur, info = kernels.mh_move(problem, decoder, cur, horizon)
                    else:
                        cur, info = kernels.block_move(problem, decoder, cur, horizon, self.span)
                    trace.log(kernels.move_trace(k, s, kernel, info, horizon, problem.log_target(cur)))
                    pbar.update(1)
        return collect(problem, cur, None, trace)

    def __repr__(self) -> str:
        return (
            f"BlockMH({self.target!r}, {self.proposal!r}, chains={self.chains}, block_size={self.block_size}, "
            f"steps={self.steps}, span={self.span}, suffix_every={self.suffix_every})"
        )
