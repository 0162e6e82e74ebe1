"""Suffix Metropolis–Hastings (Karan & Du's power sampler, made exact).

Blocks of B tokens; horizon H_k = min(k·B, max_new_tokens); intermediate target π_k = π
restricted to the first H_k tokens. Each block extends unfinished chains to H_k with q, then runs
``steps`` moves (see :func:`smcdecode.samplers.core.mh_move` for the acceptance ratio, which
includes the reverse proposal of the current suffix and the index-selection term
log|x| − log|x'|). Chains of all prompts run in one batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from smcdecode.engine import Engine
from smcdecode.errors import ArgumentTypeError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.samplers.base import Sampler, bar, collect
from smcdecode.samplers.core import extend, make_problem, mh_move, start_chains
from smcdecode.samplers.result import Result, Trace
from smcdecode.targets.base import Potential


class SuffixMH(Sampler):
    def __init__(self, target: Potential, proposal: Proposal, chains: int = 1, block_size: int = 192, steps: int = 10):
        if not isinstance(target, Potential):
            raise ArgumentTypeError("target", f"expected a Potential, got {type(target).__name__}")
        if not isinstance(proposal, Proposal):
            raise ArgumentTypeError("proposal", f"expected a Proposal, got {type(proposal).__name__}")
        self.target = target
        self.proposal = proposal
        self.chains = check_int("chains", chains, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.steps = check_int("steps", steps, 0)

    def _run(self, engine: Engine, prompts: Any, max_new_tokens: int, seed: int, progress: bool) -> Result:
        problem = make_problem(engine, prompts, self.target, self.proposal, self.chains, max_new_tokens, seed)
        decoder, chains = start_chains(problem)
        trace = Trace()
        n_blocks = math.ceil(max_new_tokens / self.block_size)
        with bar(n_blocks * (1 + self.steps), "SuffixMH", progress) as pbar:
            for k in range(1, n_blocks + 1):
                horizon = min(k * self.block_size, max_new_tokens)
                extend(problem, decoder, chains, horizon)
                problem.update_psi(chains, torch.ones_like(chains.ended), partial_ok=False)
                pbar.update(1)
                for s in range(self.steps):
                    chains, info = mh_move(problem, decoder, chains, horizon)
                    trace.log(
                        "move",
                        block=k,
                        step=s,
                        horizon=horizon,
                        accepted=info.accepted,
                        index=info.index,
                        old_length=info.old_length,
                        new_length=info.new_length,
                        log_target=problem.log_target(chains),
                    )
                    pbar.update(1)
        return collect(problem, chains, None, trace)

    def __repr__(self) -> str:
        return (
            f"SuffixMH({self.target!r}, {self.proposal!r}, chains={self.chains}, "
            f"block_size={self.block_size}, steps={self.steps})"
        )
