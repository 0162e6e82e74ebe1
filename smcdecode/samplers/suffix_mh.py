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
ends. A move re-reads the distribution at i by feeding x_{i−1} again (one token) over the kept
prefix's KV, so it costs |y| (+1 below the last horizon) decode tokens and no prefill; a rejected
proposal returns to its old cache columns (:meth:`Engine.restore_rows`). Every row follows the
same sequence of operations as a chain run alone, so the law of each chain is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from smcdecode.engine import Engine
from smcdecode.errors import ArgumentTypeError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.samplers.base import Sampler, bar, collect
from smcdecode.samplers.core import CHECK_EVERY, make_problem, mh_log_accept, start_chains, suffix_log_q
from smcdecode.samplers.result import Result, Trace
from smcdecode.targets.base import Potential

COMPACT_EVERY = 32  # iterations between compaction checks


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
        decoder, cur = start_chains(problem)
        t_max, n_steps = max_new_tokens, self.steps
        n_blocks = math.ceil(t_max / self.block_size)
        n_moves = n_blocks * n_steps
        b, dev, gen = cur.length.shape[0], engine.device, problem.generator
        rows = torch.arange(b, device=dev)
        zeros_b = torch.zeros(b, dtype=torch.bool, device=dev)
        block = torch.ones(b, dtype=torch.long, device=dev)  # k, 1-based
        step = torch.zeros(b, dtype=torch.long, device=dev)  # 0 = extension, 1..steps = moves
        moving, refeed, done = zeros_b.clone(), zeros_b.clone(), zeros_b.clone()
        index = torch.zeros(b, dtype=torch.long, device=dev)
        hist = {k: torch.zeros(b, max(1, n_moves), device=dev) for k in ("accepted", "index", "old", "new", "lt")}
        ext = {k: torch.zeros(b, n_blocks, device=dev) for k in ("old", "new")}
        prop = cur.clone()
        iteration = 0
        with bar(b * (n_moves + n_blocks), "SuffixMH", progress) as pbar:
            while True:
                horizon = (block * self.block_size).clamp(max=t_max)  # [B]
                # 1. generating rows draw one token from q
                live = ~done & ~refeed & ~prop.ended & (prop.length < horizon)
                drawn = problem.draw(decoder.bind(prop.view), problem.alpha)
                tok = drawn.tokens
                prop.append(live, drawn, engine.is_eos(tok))
                # 2. one forward: sampled tokens of unfinished rows, refed tokens of rows starting a move
                feed = (live & ~prop.ended & (prop.length < t_max)) | refeed
                prop.view = decoder.decode(tok, feed, refeed).where(feed, prop.view)
                was_refeed, refeed = refeed, zeros_b
                # 3. finished proposals: accept (extensions always), reject -> old cache columns
                complete = ~done & ~was_refeed & (prop.ended | (prop.length >= horizon))
                problem.update_psi(prop, complete, partial_ok=False)
                log_a = mh_log_accept(
                    problem.log_target(prop),
                    problem.log_target(cur),
                    suffix_log_q(cur, index),
                    suffix_log_q(prop, index),
                    cur.length,
                    prop.length,
                )
                u = torch.rand(b, generator=gen, device=dev)
                accept = complete & (~moving | (torch.log(u) < log_a))
                decoder.restore_rows(complete & moving & ~accept)
                m = ((block - 1) * n_steps + step - 1).clamp(0, max(0, n_moves - 1))
                rec_move = complete & moving
                rec_ext = complete & ~moving
                kb = (block - 1).clamp(0, n_blocks - 1)
                old_len = cur.length.float()
                cur = prop.where(accept, cur)
                for key, val in (
                    ("accepted", accept.float()),
                    ("index", index.float()),
                    ("old", old_len),
                    ("new", prop.length.float()),
                    ("lt", problem.log_target(cur)),
                ):
                    hist[key][rows, m] = torch.where(rec_move, val, hist[key][rows, m])
                ext["old"][rows, kb] = torch.where(rec_ext, old_len, ext["old"][rows, kb])
                ext["new"][rows, kb] = torch.where(rec_ext, cur.length.float(), ext["new"][rows, kb])
                # 4. advance each finished row's schedule and start its next proposal
                step = torch.where(complete, step + 1, step)
                next_block = complete & (step > n_steps)
                block = torch.where(next_block, block + 1, block)
                step = torch.where(next_block, torch.zeros_like(step), step)
                done = done | (complete & (block > n_blocks))
                start_ext = complete & ~done & (step == 0)
                start_move = complete & ~done & (step > 0)
                i = (torch.rand(b, generator=gen, device=dev) * cur.length).long().clamp(min=0)
                i = torch.minimum(i, (cur.length - 1).clamp_min(0))
                index = torch.where(start_move, i, index)
                decoder.start_moves(start_move, index, cur.tokens)
                # `where` builds new tensors, so sharing cur's other fields here aliases nothing
                fresh = dataclasses.replace(
                    cur, length=torch.where(start_move, index, cur.length), ended=cur.ended & ~start_move
                )
                prop = fresh.where(start_ext | start_move, prop)
                moving = torch.where(start_move, True, torch.where(start_ext, False, moving))
                refeed = start_move
                iteration += 1
                if iteration % CHECK_EVERY == 0:
                    pbar.update(int(ext["new"].gt(0).sum() + hist["new"].gt(0).sum()) - pbar.n)
                    if bool(done.all()):
                        break
                if iteration % COMPACT_EVERY == 0:
                    decoder.compact()
        trace = Trace()
        for k in range(n_blocks):
            trace.log("extend", block=k + 1, old_length=ext["old"][:, k].long(), new_length=ext["new"][:, k].long())
            for s in range(n_steps):
                mi = k * n_steps + s
                trace.log(
                    "move",
                    block=k + 1,
                    step=s,
                    horizon=min((k + 1) * self.block_size, t_max),
                    accepted=hist["accepted"][:, mi].bool(),
                    index=hist["index"][:, mi].long(),
                    old_length=hist["old"][:, mi].long(),
                    new_length=hist["new"][:, mi].long(),
                    log_target=hist["lt"][:, mi],
                )
        return collect(problem, cur, None, trace)

    def __repr__(self) -> str:
        return (
            f"SuffixMH({self.target!r}, {self.proposal!r}, chains={self.chains}, "
            f"block_size={self.block_size}, steps={self.steps})"
        )
