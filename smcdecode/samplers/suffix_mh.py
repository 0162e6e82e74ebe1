"""Suffix Metropolis–Hastings (Karan & Du's power sampler, made exact).

Blocks of B tokens; horizon H_k = min(k·B, max_new_tokens); intermediate target π_k = π
restricted to the first H_k tokens. Each block extends the chain to H_k with q, then runs
``steps`` moves. A move on x draws i ~ U{0..|x|−1}, regenerates y ~ q(· | x_<i) to EOS or H_k,
and accepts x' = x_<i ⊕ y with

    log A = [log π_k(x') − log π_k(x)] + [log q(x_≥i | x_<i) − log q(y | x_<i)] + [log|x| − log|x'|]

(the reverse proposal of the current suffix, and the index-selection term that the reference
code drops when EOS makes lengths differ).

Execution: every chain of every prompt is one row of one batch, and each row runs its own
schedule (extension, moves, next block) *asynchronously*: a row whose proposal ends early starts
its next move at the next forward instead of idling until the longest regeneration in the batch
ends, and chains that have finished every block leave the batch. The proposal is drawn coupled
with the current suffix (:func:`kernels.divergence`): y keeps x_j with probability q(x_j | x_<j)
until the first j where it does not, and that j is known before any forward. The move re-reads
the distribution at j by feeding x_{j−1} again (one token) over the kept prefix's KV, draws
y_j ≠ x_j, and goes on with q; so it costs |x'| − j decode tokens (the last token of x' is never
fed) and no prefill, and nothing at all when y = x_≥i (then log A = 0: accepted). A rejected proposal
returns to its old cache columns (:meth:`Backend.restore_rows`). Every row follows the same
sequence of operations as a chain run alone, so the law of each chain is unchanged; the coupling
changes which random numbers are drawn, not the law of y given (x, i). The move itself (start,
acceptance, the rule for a proposal equal to x) is :mod:`~smcdecode.samplers.kernels`'s; this
module only schedules it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentTypeError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.samplers.base import Sampler, bar, check_target_proposal
from smcdecode.samplers.core import CHECK_EVERY, Decoder, Problem, collect, make_problem, start_chains
from smcdecode.samplers.kernels import MoveInfo
from smcdecode.samplers.result import ExtendTrace, MoveTrace, Result, ShrinkTrace, Trace
from smcdecode.samplers.schedule import Moves, Rows, RowsPlan, Schedule, async_step
from smcdecode.stopping import StopSet
from smcdecode.targets.base import Potential

COMPACT_EVERY = 32  # iterations between compaction checks


class SuffixMH(Sampler):
    """Suffix Metropolis–Hastings: ``chains`` chains per prompt, grown in blocks, each block followed
    by ``steps`` suffix moves (module ``smcdecode.samplers.suffix_mh`` gives the acceptance ratio).

    Args:
        target: The target potential π (e.g. ``targets.Power(4.0)``).
        proposal: The proposal q of extensions and moves (e.g. ``proposals.Tempered(0.25)``).
        chains: Chains per prompt; each returns its final state as one sample.
        block_size: Tokens per block B; the horizon grows by B before each round of moves.
        steps: MH moves after each block.
        reuse_suffix: Draw each proposal coupled with the current suffix (same law, fewer tokens);
            False draws it afresh from i: slower, kept for comparison.

    Raises:
        ArgumentTypeError: ``target`` is not a Potential, ``proposal`` not a Proposal, or
            ``reuse_suffix`` not a bool.
        ArgumentError: ``chains``, ``block_size`` or ``steps`` is out of range.
    """

    def __init__(
        self,
        target: Potential,
        proposal: Proposal,
        chains: int = 1,
        block_size: int = 192,
        steps: int = 10,
        reuse_suffix: bool = True,
    ):
        check_target_proposal(target, proposal)
        self.target = target
        self.proposal = proposal
        self.chains = check_int("chains", chains, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.steps = check_int("steps", steps, 0)
        if not isinstance(reuse_suffix, bool):
            raise ArgumentTypeError("reuse_suffix", f"expected a bool, got {type(reuse_suffix).__name__}")
        self.reuse_suffix = reuse_suffix

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        problem = make_problem(engine, prompts, self.target, self.proposal, self.chains, max_new_tokens, seed, stop)
        decoder, cur = start_chains(problem)
        t_max, n_steps = max_new_tokens, self.steps
        n_blocks = math.ceil(t_max / self.block_size)
        n_moves = n_blocks * n_steps
        b0, dev = cur.length.shape[0], engine.device
        sch = Schedule.start(b0, dev)
        hist = {
            k: torch.zeros(b0, max(1, n_moves), device=dev) for k in ("accepted", "index", "reused", "old", "new", "lt")
        }
        ext = {k: torch.zeros(b0, n_blocks, device=dev) for k in ("old", "new")}
        out = cur.clone()  # final states, by original row
        iteration, check_every = 0, CHECK_EVERY
        trace = Trace()
        rows = Rows(cur, cur.clone(), sch)
        with bar(b0 * (n_moves + n_blocks), "SuffixMH", progress) as pbar:
            while True:
                old_len = rows.cur.length.float()
                sch = rows.sch
                m = ((sch.block - 1) * n_steps + sch.step - 1).clamp(0, max(0, n_moves - 1))
                kb = (sch.block - 1).clamp(0, n_blocks - 1)
                rec_ids, moving = sch.ids, sch.moving
                rows, info, complete = self.step(problem, decoder, rows)
                cur, prop, sch = rows.cur, rows.prop, rows.sch
                rec_move, rec_ext = complete & moving, complete & ~moving
                for key, val in (
                    ("accepted", info.accepted.float()),
                    ("index", info.i.float()),
                    ("reused", info.reused.float()),
                    ("old", old_len),
                    ("new", info.new_length.float()),
                    ("lt", problem.log_target(cur)),
                ):
                    hist[key][rec_ids, m] = torch.where(rec_move, val, hist[key][rec_ids, m])
                ext["old"][rec_ids, kb] = torch.where(rec_ext, old_len, ext["old"][rec_ids, kb])
                ext["new"][rec_ids, kb] = torch.where(rec_ext, cur.length.float(), ext["new"][rec_ids, kb])
                iteration += 1
                if iteration % check_every == 0:  # host sync
                    pbar.update(int(ext["new"].gt(0).sum() + hist["new"].gt(0).sum()) - pbar.n)
                    n_done = int(sch.done.sum())
                    if n_done == sch.done.shape[0]:
                        out.put(sch.ids, cur)
                        break
                    if 4 * n_done >= sch.done.shape[0]:  # drop finished chains from the batch
                        out.put(sch.ids[sch.done], cur.index_select(torch.nonzero(sch.done).view(-1)))
                        left = torch.nonzero(~sch.done).view(-1)
                        decoder.keep_rows(left)
                        trace.log(ShrinkTrace(iteration, int(left.shape[0])))
                        problem.rng.select(left)
                        rows = Rows(cur.index_select(left), prop.index_select(left), sch.index_select(left))
                        sch = rows.sch
                    if 4 * sch.done.shape[0] <= b0:
                        check_every = 1  # the tail: stop as soon as the last chains finish
                if iteration % COMPACT_EVERY == 0:
                    decoder.compact()
        for k in range(n_blocks):
            trace.log(ExtendTrace(k + 1, ext["old"][:, k].long(), ext["new"][:, k].long()))
            for s in range(n_steps):
                mi = k * n_steps + s
                accepted, index = hist["accepted"][:, mi].bool(), hist["index"][:, mi].long()
                new = hist["new"][:, mi].long()
                trace.log(
                    MoveTrace(
                        stage=k + 1,
                        sweep=s,
                        kernel="suffix",
                        accepted=accepted,
                        i=index,
                        reused=hist["reused"][:, mi].long(),
                        proposed=new - index,
                        invalid=torch.zeros_like(accepted),
                        old_length=hist["old"][:, mi].long(),
                        new_length=new,
                        horizon=min((k + 1) * self.block_size, t_max),
                        log_target=hist["lt"][:, mi],
                    )
                )
        return collect(problem, out, None, trace)

    def rows_plan(self, max_new_tokens: int) -> RowsPlan:
        """Continuous batching: each row runs its own block and move schedule.

        Args:
            max_new_tokens: Tokens generated per sample at most.
        """
        return RowsPlan(Moves(self.block_size, self.steps, self.reuse_suffix), self.target, self.proposal, self.chains)

    def step(self, problem: Problem, decoder: Decoder, rows: Rows) -> tuple[Rows, MoveInfo, Tensor]:
        """One forward of the run (see :func:`async_step`).

        Args:
            problem: The run's fixed parts (engine, target, proposal, random streams).
            decoder: The main backend and its auxiliary streams.
            rows: Every row's current chain, proposal and schedule.

        Returns:
            ``(rows, info, completed)``: the new rows, the decided moves' info and which rows
            completed a proposal (bool [B]).
        """
        return async_step(problem, decoder, rows, self.block_size, self.steps, self.reuse_suffix)

    def __repr__(self) -> str:
        return (
            f"SuffixMH({self.target!r}, {self.proposal!r}, chains={self.chains}, "
            f"block_size={self.block_size}, steps={self.steps})"
        )
