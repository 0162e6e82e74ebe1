"""The asynchronous schedule of suffix MH: every row (chain) runs its own blocks and moves.

Blocks of B tokens; horizon H_k = min(k·B, max_new_tokens). A row extends its chain to H_k with
q (an *extension*, always accepted), then makes ``steps`` suffix-MH moves
(:mod:`~smcdecode.samplers.kernels`) on π restricted to the first H_k tokens, then goes to block
k + 1. :func:`async_step` is one forward for every row, each at its own phase, so a row whose
proposal ends early starts its next move at the next forward instead of idling. Used by
:class:`~smcdecode.samplers.suffix_mh.SuffixMH` (one batch of prompts) and by continuous batching
(:mod:`~smcdecode.samplers.stream`; Ancestral is the schedule with one block and no moves).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from smcdecode.proposals.base import Proposal
from smcdecode.samplers import kernels
from smcdecode.samplers.core import Chains, Decoder, Problem
from smcdecode.samplers.kernels import MoveInfo
from smcdecode.targets.base import Potential


@dataclass(frozen=True)
class Moves:
    """The asynchronous schedule: ``steps`` suffix-MH moves after extending to each block end."""

    block_size: int
    steps: int
    reuse_suffix: bool = True


@dataclass(frozen=True)
class RowsPlan:
    """What continuous batching runs: the schedule, the target (None: plain q), q, rows per problem."""

    moves: Moves
    target: Potential | None
    proposal: Proposal
    n: int


def async_step(
    problem: Problem, decoder: Decoder, rows: Rows, block_size: int, steps: int, reuse_suffix: bool = True
) -> tuple[Rows, MoveInfo, Tensor]:
    """One forward for every row, each at its own phase: rows that generate draw a token from
    q (the first one after a divergence ≠ x_j), rows starting a move re-feed x_{j−1}; then the
    rows whose proposal completed are decided (extensions always accepted, a rejected move
    returns to its old cache columns), advance their schedule and begin their next proposal.
    Returns the new rows, the decided moves' info and which rows completed (bool [B])."""
    cur, prop, sch, t_max = rows.cur, rows.prop, rows.sch, problem.max_new_tokens
    horizon = (sch.block * block_size).clamp(max=t_max)  # [B]
    live = ~sch.done & ~sch.refeed & ~prop.ended & (prop.length < horizon)
    ctx = problem.context(decoder, prop, live)
    drawn = problem.draw(decoder.bind(prop.view), problem.alpha, torch.where(live, sch.exclude, -1), ctx)
    sch.exclude = torch.where(live, -1, sch.exclude)
    tok = drawn.tokens
    prop.append(live, drawn, *problem.ends(prop, tok))
    feed = (live & ~prop.ended & (prop.length < t_max)) | sch.refeed  # [B]
    prop.view = decoder.decode(tok, feed).where(feed, prop.view)
    rows.fed += feed.long()
    was_refeed, sch.refeed = sch.refeed, torch.zeros_like(sch.refeed)
    complete = ~sch.done & ~was_refeed & (prop.ended | (prop.length >= horizon))
    cur, info = kernels.decide(problem, decoder, cur, prop, sch.index, sch.keep, complete, sch.moving, ids=sch.ids)
    n_blocks = math.ceil(t_max / block_size)
    start_ext, start_move = sch.advance(complete, steps, n_blocks)
    fresh, move = kernels.begin(problem, decoder, cur, start_move, reuse_suffix)
    sch.index = torch.where(start_move, move.i, sch.index)
    sch.keep = torch.where(start_move, move.j, sch.keep)
    sch.exclude = torch.where(move.diverged, move.exclude, sch.exclude)
    prop = fresh.where(start_ext | start_move, prop)
    sch.moving = torch.where(start_move, True, torch.where(start_ext, False, sch.moving))
    sch.refeed = move.diverged
    return Rows(cur, prop, sch, rows.fed), info, complete


@dataclass
class Rows:
    """The batch of a run: each row's current chain, its proposal in progress and its schedule."""

    cur: Chains
    prop: Chains
    sch: Schedule
    fed: Tensor = None  # type: ignore[assignment]  # [B] long: tokens fed for the row (its decode work)

    def __post_init__(self) -> None:
        if self.fed is None:
            self.fed = torch.zeros_like(self.cur.length)


@dataclass
class Schedule:
    """Where each row (chain) is in its own block/move schedule; all fields [B]."""

    ids: Tensor  # original row of each batch row (rows leave the batch when their chain is done)
    block: Tensor  # k, 1-based
    step: Tensor  # 0 = extension, 1..steps = moves
    moving: Tensor  # the current proposal is a move (not an extension)
    refeed: Tensor  # the next forward feeds x_{j−1} again (the move starts at j)
    done: Tensor  # every block and move finished
    index: Tensor  # i of the current move
    keep: Tensor  # where its proposal leaves x (j ≥ i; = |x| when the proposal is x itself)
    exclude: Tensor  # the first draw after the divergence is ≠ x_j (−1: no condition)

    @staticmethod
    def start(b: int, device: torch.device) -> Schedule:
        z = torch.zeros(b, dtype=torch.long, device=device)
        f = torch.zeros(b, dtype=torch.bool, device=device)
        ids = torch.arange(b, device=device)
        return Schedule(ids, z + 1, z, f, f, f, z, z, z - 1)

    def index_select(self, idx: Tensor) -> Schedule:
        return Schedule(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def advance(self, complete: Tensor, n_steps: int, n_blocks: int) -> tuple[Tensor, Tensor]:
        """Rows whose proposal completed go to their next step (block); returns the rows that
        start an extension and those that start a move."""
        self.step = torch.where(complete, self.step + 1, self.step)
        next_block = complete & (self.step > n_steps)
        self.block = torch.where(next_block, self.block + 1, self.block)
        self.step = torch.where(next_block, torch.zeros_like(self.step), self.step)
        self.done = self.done | (complete & (self.block > n_blocks))
        going = complete & ~self.done
        return going & (self.step == 0), going & (self.step > 0)
