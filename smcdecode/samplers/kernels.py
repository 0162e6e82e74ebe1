"""The suffix Metropolis–Hastings move, written once.

On a chain x (|x| generated tokens) a move draws i ~ U{0..|x|−1}, regenerates y ~ q(· | x_<i) to
EOS, a stop, or the horizon H, and accepts x' = x_<i ⊕ y with probability min(1, A):

    log A = [log π_H(x') − log π_H(x)] + [log q(x_≥i | x_<i) − log q(y | x_<i)] + [log|x| − log|x'|]

(the reverse proposal of the current suffix, and the index-selection term that matters when EOS
makes lengths differ). y is drawn coupled with the current suffix (:func:`divergence`): it keeps
x_j with probability q(x_j | x_<j) up to the first j where it does not, so the kept tokens'
KV is reused, and a move whose y equals x_≥i costs nothing and is accepted (log A = 0).

A move has three phases, each a function of the batch (one row per chain):

* :func:`begin` on ``rows``: draw i, find j, truncate those rows' caches to x_<j (saving the old
  context) and return the proposal's starting chains (x_<j) with the :class:`Move`;
* growing the proposal one token per forward, by the driver: :class:`~smcdecode.samplers.suffix_mh.SuffixMH`
  grows each row at its own phase (one forward per iteration serves rows that extend, move or
  start), SMC rejuvenation grows all rows to completion (:func:`propose` via
  :func:`~smcdecode.samplers.core.extend`);
* :func:`decide` on the rows whose proposal is complete: the sequence potential, log A, the
  uniform draw, the "proposal is x itself" rule, and the return of rejected rows to their old
  cache columns. Rows that are extensions (``moving`` False) are always accepted.

:func:`mh_move` drives one move to completion on every row. New move kernels (an interior-block
move) plug in beside it with the same ``begin``/``decide`` shape.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from smcdecode.samplers.core import Anneal, Chains, Decoder, Problem, extend
from smcdecode.samplers.rng import Rng


class Move(NamedTuple):
    """A started move, per row ([B])."""

    i: Tensor  # the regeneration point
    j: Tensor  # j ≥ i: where the proposal leaves x (= |x| when the proposal is x itself)
    exclude: Tensor  # x_j, which the first draw must avoid (−1: no condition)
    diverged: Tensor  # bool: j < |x| on a started row; its cache was truncated to x_<j


class MoveInfo(NamedTuple):
    """Diagnostics of decided moves, per row ([B])."""

    accepted: Tensor  # bool
    i: Tensor  # the regeneration point
    reused: Tensor  # tokens of x_≥i the proposal kept (j − i)
    log_accept: Tensor  # log A
    old_length: Tensor  # |x|
    new_length: Tensor  # |x'|


def mh_log_accept(
    log_target_new: Tensor,
    log_target_old: Tensor,
    log_q_old_suffix: Tensor,
    log_q_new_suffix: Tensor,
    length_old: Tensor,
    length_new: Tensor,
) -> Tensor:
    """Suffix-MH log acceptance ratio (all arguments [B]):

    [log π(x') − log π(x)] + [log q(x_≥i | x_<i) − log q(y | x_<i)] + [log|x| − log|x'|]."""
    return (
        log_target_new
        - log_target_old
        + log_q_old_suffix
        - log_q_new_suffix
        + torch.log(length_old.clamp_min(1).double()).to(log_target_new.dtype)
        - torch.log(length_new.clamp_min(1).double()).to(log_target_new.dtype)
    )


def divergence(chains: Chains, index: Tensor, rng: Rng) -> tuple[Tensor, Tensor]:
    """Where a move's proposal leaves the current suffix, drawn before any forward.

    The proposal y ~ q(· | x_<i) is drawn *coupled* with the current suffix x_≥i: for
    j = i, i+1, … keep y_j = x_j with probability q(x_j | x_<j) (stored per token); at the first
    j where it is not kept, draw y_j from q(· | x_<j) conditioned on y_j ≠ x_j, and go on with
    plain q after. Each y_j still has law q(· | x_<j):

        P(y_j = x_j) = q(x_j),    P(y_j = v ≠ x_j) = (1 − q(x_j)) · q(v) / (1 − q(x_j)) = q(v),

    so the MH kernel is unchanged, but the kept tokens x_i..x_{j−1} are already in the KV cache:
    the move costs |y| − (j − i) decode tokens, and none when nothing diverges (then x' = x and
    log A = 0). Returns ``keep`` = j ([B], = |x| when nothing diverges) and ``exclude`` = x_j for
    the first draw ([B], −1 when nothing diverges)."""
    b, t_max = chains.tokens.shape
    t = torch.arange(t_max, device=index.device)
    u = rng.rand(b, t_max, dtype=torch.float64).to(index.device)  # [B, T]
    leave = (u >= chains.log_q.double().exp()) & (t[None] >= index[:, None]) & chains.positions()  # [B, T]
    keep = torch.where(leave.any(1), leave.long().argmax(1), chains.length)  # first True
    exclude = torch.where(keep < chains.length, chains.tokens.gather(1, keep.clamp(max=t_max - 1)[:, None])[:, 0], -1)
    return keep, exclude


def suffix_log_q(chains: Chains, index: Tensor) -> Tensor:
    """Σ_{t ≥ i} log q of each row's generated tokens, [B]."""
    t = torch.arange(chains.tokens.shape[1], device=index.device)
    return (chains.log_q * ((t[None] >= index[:, None]) & chains.positions())).sum(1)


def begin(
    problem: Problem, decoder: Decoder, cur: Chains, rows: Tensor, reuse: bool = True, index: Tensor | None = None
) -> tuple[Chains, Move]:
    """Start a move on ``rows`` (bool [B]): i ~ U{0..|x|−1} (or the given ``index``), the divergence point j
    (:func:`divergence`; j = i without ``reuse``: same law, no coupling), and the truncation of
    the rows that diverge to x_<j (:meth:`Decoder.start_moves`, which saves their old context;
    their next decode feeds x_{j−1} again and returns the distribution at j). A proposal with
    auxiliary randomness (lookahead rollouts) is never coupled: its q(x_j | x_<j, u_j) depends on
    the rollouts u_j, which a proposal draws afresh, so keeping x_j with the stored probability
    would not give y_j the law q. Returns the
    proposal's starting chains (x_<j on diverged rows, ``cur`` elsewhere) and the move."""
    rng, n = problem.rng, cur.length  # [B]
    reuse = reuse and not problem.proposal.auxiliary  # q(· | x_<j, u_j) with fresh u: no coupling
    if index is None:
        u = rng.rand(n.shape[0]).to(n.device)
        index = torch.minimum((u * n).long(), (n - 1).clamp_min(0))  # [B]
    if reuse:
        keep, exclude = divergence(cur, index, rng)
    else:
        keep, exclude = index, torch.full_like(index, -1)
    diverged = rows & (keep < n)
    decoder.start_moves(diverged, keep)
    # `where` builds new tensors, so sharing cur's other fields here aliases nothing
    fresh = dataclasses.replace(cur, length=torch.where(diverged, keep, n), ended=cur.ended & ~diverged)
    return fresh, Move(index, keep, exclude, diverged)


def decide(
    problem: Problem,
    decoder: Decoder,
    cur: Chains,
    prop: Chains,
    index: Tensor,
    keep: Tensor,
    complete: Tensor,
    moving: Tensor,
    alpha: float | None = None,
    ids: Tensor | None = None,
    partial_ok: bool = False,
) -> tuple[Chains, MoveInfo]:
    """Accept or reject the proposals of the ``complete`` rows (bool [B]) of moves started at
    i = ``index``, j = ``keep`` (see :class:`Move`); rows not ``moving`` are extensions, always accepted.
    ``alpha``: the exponent of φ in force (annealing); ``ids``: the original row of each batch
    row (sequence potentials); ``partial_ok``: unfinished proposals carry the prefix twist ψ
    (SMC's intermediate targets, which ``cur`` carries too) instead of 0, and with ``problem.twist``
    the lookahead twist stored with each prefix multiplies the target. Returns the new chains
    (``cur`` on rows not accepted) and the diagnostics, meaningful on ``complete & moving`` rows."""
    problem.update_psi(prop, complete, partial_ok=partial_ok, ids=ids)
    lt_prop, lt_cur = problem.log_target(prop, alpha), problem.log_target(cur, alpha)
    if partial_ok and problem.twist:  # SMC's twisted intermediate target p^α·Ẑ (Ẑ = 1 when finished)
        lt_prop, lt_cur = lt_prop + prop.current_twist(), lt_cur + cur.current_twist()
    log_a = mh_log_accept(
        lt_prop,
        lt_cur,
        suffix_log_q(cur, index),
        suffix_log_q(prop, index),
        cur.length,
        prop.length,
    )
    u = problem.rng.rand(log_a.shape[0]).to(log_a.device)
    same = keep == cur.length  # the proposal is x itself: log A = 0
    accept = complete & (~moving | same | (torch.log(u) < log_a))
    decoder.restore_rows(complete & moving & ~accept)
    info = MoveInfo(accept, index, keep - index, log_a, cur.length, prop.length)
    return prop.where(accept, cur), info


def propose(
    problem: Problem,
    decoder: Decoder,
    cur: Chains,
    horizon: int,
    q_schedule: Anneal | None = None,
    index: Tensor | None = None,
) -> tuple[Chains, Move]:
    """Begin a move on every row and grow every proposal to its end (EOS, a stop, ``horizon``):
    x' = x_<i ⊕ y, with every stream's cache holding x' afterwards and the old context of every
    diverged row saved for :meth:`Decoder.restore_rows`. ``q_schedule``: the annealing schedule
    the stored log q were drawn with (see :func:`~smcdecode.samplers.core.extend`); ``index``: a
    fixed regeneration point instead of i ~ U{0..|x|−1}."""
    everyone = torch.ones_like(cur.ended)
    fresh, move = begin(problem, decoder, cur, everyone, index=index)
    prop = fresh.clone()
    prop.view = decoder.decode(torch.zeros_like(move.i), move.diverged).where(move.diverged, cur.view)
    extend(problem, decoder, prop, horizon, exclude=move.exclude, q_schedule=q_schedule)
    return prop, move


def mh_move(
    problem: Problem,
    decoder: Decoder,
    cur: Chains,
    horizon: int,
    alpha: float | None = None,
    q_schedule: Anneal | None = None,
) -> tuple[Chains, MoveInfo]:
    """One suffix-MH move on every row for π restricted to the first ``horizon`` tokens, driven
    to completion: the move costs the diverged part of y in decode tokens (plus one to re-read
    the distribution where it diverges) and no prefill; a rejected row returns to its old cache
    columns. ``alpha``: the exponent of φ in force (annealing). The target is SMC's intermediate
    one: an unfinished sequence carries its prefix twist ψ (if the target has one), as ``cur`` does."""
    decoder.compact()
    prop, move = propose(problem, decoder, cur, horizon, q_schedule)
    everyone = torch.ones_like(cur.ended)
    return decide(problem, decoder, cur, prop, move.i, move.j, everyone, everyone, alpha, partial_ok=True)
