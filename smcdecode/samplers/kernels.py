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

:func:`mh_move` drives one move to completion on every row.

The interior-block move (:func:`block_move`, same shape: :func:`block_begin`, :func:`grow_block`,
:func:`rescore`, :func:`block_decide`) replaces a block x_[i, i+B) and keeps what follows it,
rescoring that suffix in its new context with one teacher-forced forward; see its docstring for the
move, the handling of EOS and stops, and the exactness argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor

from smcdecode.samplers.core import CHECK_EVERY, Anneal, Chains, DecoderOps, Problem, extend
from smcdecode.samplers.result import MoveTrace
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
    proposed: Tensor | None = None  # tokens the proposal covered (block moves: e' − i; suffix: |x'| − i)
    invalid: Tensor | None = None  # bool: the proposal left the sequence space (block moves; A = 0)


def move_trace(
    stage: int, sweep: int, kernel: str, info: MoveInfo, horizon: int | None = None, log_target: Tensor | None = None
) -> MoveTrace:
    """The trace record of a decided move (``stage``: the MH block or SMC step it ran at)."""
    return MoveTrace(
        stage=stage,
        sweep=sweep,
        kernel=kernel,
        accepted=info.accepted,
        i=info.i,
        reused=info.reused,
        proposed=info.new_length - info.i if info.proposed is None else info.proposed,
        invalid=torch.zeros_like(info.accepted) if info.invalid is None else info.invalid,
        old_length=info.old_length,
        new_length=info.new_length,
        horizon=horizon,
        log_target=log_target,
    )


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


def divergence(chains: Chains, index: Tensor, rng: Rng, end: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Where a move's proposal leaves the current suffix, drawn before any forward.

    The proposal y ~ q(· | x_<i) is drawn *coupled* with the current suffix x_≥i: for
    j = i, i+1, … keep y_j = x_j with probability q(x_j | x_<j) (stored per token); at the first
    j where it is not kept, draw y_j from q(· | x_<j) conditioned on y_j ≠ x_j, and go on with
    plain q after. Each y_j still has law q(· | x_<j):

        P(y_j = x_j) = q(x_j),    P(y_j = v ≠ x_j) = (1 − q(x_j)) · q(v) / (1 − q(x_j)) = q(v),

    so the MH kernel is unchanged, but the kept tokens x_i..x_{j−1} are already in the KV cache:
    the move costs |y| − (j − i) decode tokens, and none when nothing diverges (then x' = x and
    log A = 0). Returns ``keep`` = j ([B], = |x| when nothing diverges) and ``exclude`` = x_j for
    the first draw ([B], −1 when nothing diverges).

    ``end`` [B] (default |x|) bounds the coupled stretch to x_[i, end): an interior-block move
    couples its block only; ``keep`` = end when the block is kept whole."""
    b, t_max = chains.tokens.shape
    t = torch.arange(t_max, device=index.device)
    stop = chains.length if end is None else end  # [B]
    u = rng.rand(b, t_max, dtype=torch.float64).to(index.device)  # [B, T]
    leave = (u >= chains.log_q.double().exp()) & (t[None] >= index[:, None]) & (t[None] < stop[:, None])  # [B, T]
    keep = torch.where(leave.any(1), leave.long().argmax(1), stop)  # first True
    exclude = torch.where(keep < stop, chains.tokens.gather(1, keep.clamp(max=t_max - 1)[:, None])[:, 0], -1)
    return keep, exclude


def suffix_log_q(chains: Chains, index: Tensor) -> Tensor:
    """Σ_{t ≥ i} log q of each row's generated tokens, [B]."""
    return span_log_q(chains, index, chains.length)


def span_log_q(chains: Chains, start: Tensor, end: Tensor) -> Tensor:
    """Σ_{start ≤ t < end} log q of each row's tokens, [B] (stale entries outside are never read,
    so a −inf there cannot turn the sum into NaN)."""
    t = torch.arange(chains.tokens.shape[1], device=start.device)
    inside = (t[None] >= start[:, None]) & (t[None] < end[:, None])  # [B, T]
    return torch.where(inside, chains.log_q, torch.zeros_like(chains.log_q)).sum(1)


def begin(
    problem: Problem, decoder: DecoderOps, cur: Chains, rows: Tensor, reuse: bool = True, index: Tensor | None = None
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
    decoder: DecoderOps,
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
    decoder: DecoderOps,
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
    decoder: DecoderOps,
    cur: Chains,
    horizon: int,
    alpha: float | None = None,
    q_schedule: Anneal | None = None,
    partial_ok: bool = False,
) -> tuple[Chains, MoveInfo]:
    """One suffix-MH move on every row for π restricted to the first ``horizon`` tokens, driven
    to completion: the move costs the diverged part of y in decode tokens (plus one to re-read
    the distribution where it diverges) and no prefill; a rejected row returns to its old cache
    columns. ``alpha``: the exponent of φ in force (annealing). ``partial_ok``: the target is SMC's
    intermediate one, where an unfinished sequence carries its prefix twist ψ (if the target has
    one), as ``cur`` does; else unfinished sequences have ψ = 0 (MH samplers' horizons)."""
    decoder.compact()
    prop, move = propose(problem, decoder, cur, horizon, q_schedule)
    everyone = torch.ones_like(cur.ended)
    return decide(problem, decoder, cur, prop, move.i, move.j, everyone, everyone, alpha, partial_ok=partial_ok)


# ---------------------------------------------------------------------------------- interior block


class BlockMove(NamedTuple):
    """A started interior-block move, per row ([B]); see :func:`block_move`."""

    i: Tensor  # block start, i ~ U{0..|x|−1}
    end: Tensor  # e = min(i + span, |x|): the block is x_[i, e)
    interior: Tensor  # bool: e < |x|, the suffix x_≥e is kept and rescored
    cap: Tensor  # longest x' the proposal may build: e (interior), min(i + span, H) (tail)
    j: Tensor  # where the proposal leaves x (= e when it keeps the block whole: x' = x)
    exclude: Tensor  # x_j, which the first draw must avoid (−1: no condition)
    diverged: Tensor  # bool: j < e; the row's cache was truncated to x_<j


def block_log_accept(
    log_target_new: Tensor,
    log_target_old: Tensor,
    log_q_old_block: Tensor,
    log_q_new_block: Tensor,
    length_old: Tensor,
    length_new: Tensor,
    valid: Tensor,
) -> Tensor:
    """Interior-block log acceptance ratio (all arguments [B]): −inf where x' is not a sequence
    of the space (``valid`` False), else

        [log π(x') − log π(x)] + [log q(x_[i,e) | x_<i) − log q(y | x_<i)] + [log|x| − log|x'|]

    with π over the whole sequence (block *and* rescored suffix) and q over the block only."""
    log_a = mh_log_accept(log_target_new, log_target_old, log_q_old_block, log_q_new_block, length_old, length_new)
    return torch.where(valid, log_a, torch.full_like(log_a, -math.inf))


def block_begin(
    problem: Problem, decoder: DecoderOps, cur: Chains, span: int, horizon: int, index: Tensor | None = None
) -> tuple[Chains, BlockMove]:
    """Start a block move on every row: i ~ U{0..|x|−1} (or ``index``), the block's end e, its
    proposal's cap, and the divergence point j of the proposal coupled with x_[i, e)
    (:func:`divergence`); rows that diverge are truncated to x_<j (old context saved)."""
    n = cur.length  # [B]
    if index is None:
        u = problem.rng.rand(n.shape[0]).to(n.device)
        index = torch.minimum((u * n).long(), (n - 1).clamp_min(0))  # [B]
    end = torch.minimum(index + span, n)
    interior = end < n
    cap = torch.where(interior, end, (index + span).clamp(max=horizon))
    keep, exclude = divergence(cur, index, problem.rng, end)
    diverged = keep < end
    decoder.start_moves(diverged, keep)
    fresh = dataclasses.replace(cur, length=torch.where(diverged, keep, n), ended=cur.ended & ~diverged)
    return fresh, BlockMove(index, end, interior, cap, keep, exclude, diverged)


def grow_block(
    problem: Problem, decoder: DecoderOps, prop: Chains, move: BlockMove, horizon: int, q_schedule: Anneal | None = None
) -> Tensor:
    """Draw the new block of every diverged row in place, one token per forward: from x_j (≠ x_j
    first) to e on interior rows, to an end (EOS, a stop) or the cap on tail rows. Returns the rows
    whose proposal already left the sequence space ([B] bool): an interior block that ends (EOS or
    a stop inside it), or a tail that reaches its cap below the horizon without ending. Interior
    rows stop with their last block token drawn and not fed (:func:`rescore` feeds it)."""
    t_max = problem.max_new_tokens
    invalid = torch.zeros_like(move.diverged)
    steps = int(torch.where(move.diverged, move.cap - move.j, 0).max())  # one host sync per move
    if steps == 0:
        return invalid
    # re-read the distribution at j (truncate queued x_{j−1} for re-feeding)
    view = decoder.decode(torch.zeros_like(move.i), move.diverged).where(move.diverged, prop.view)
    feed_below = torch.where(move.interior, move.end, t_max)  # a drawn token is fed while length < this
    for step in range(steps):
        active = move.diverged & ~invalid & ~prop.ended & (prop.length < move.cap)  # [B]
        if step % CHECK_EVERY == CHECK_EVERY - 1 and not bool(active.any()):
            break
        a_q: float | Tensor = problem.alpha if q_schedule is None else q_schedule.at_rows(prop.length + 1)
        drawn = problem.draw(decoder.bind(view), a_q, move.exclude if step == 0 else None)
        ends, state = problem.ends(prop, drawn.tokens)
        prop.append(active, drawn, ends, state)
        short_tail = ~move.interior & ~prop.ended & (prop.length >= move.cap) & (move.cap < horizon)
        invalid = invalid | (active & ((move.interior & ends) | short_tail))
        feed = active & ~invalid & ~prop.ended & (prop.length < feed_below)
        if step + 1 == steps and horizon >= t_max:
            break  # nothing left to feed
        view = decoder.decode(drawn.tokens, feed).where(feed, view)
    prop.view = view
    return invalid


def rescore(
    problem: Problem,
    decoder: DecoderOps,
    cur: Chains,
    prop: Chains,
    move: BlockMove,
    invalid: Tensor,
    horizon: int,
    q_schedule: Anneal | None = None,
) -> Tensor:
    """Rescore the kept suffix s = x_≥e of every interior row whose new block is complete, in
    its new context x_<i ⊕ y, with one teacher-forced forward (:meth:`Decoder.score`) of
    y_{e−1} ⊕ s (s's last token left out when x' is complete): per token log φ, log p and the
    proposal's log q (what a later suffix move's reverse proposal reads), the stop automaton's
    states, the next-token view, |x'| = |x| and whether x' ended. Returns ``invalid`` with the rows
    whose x' leaves the sequence space: s ends before its last token (a stop now completes
    earlier), or its last token's "ends" changed below the horizon."""
    rows = move.interior & move.diverged & ~invalid  # [B]
    n, e, t_max = cur.length, move.end, problem.max_new_tokens
    m = torch.where(rows, n - e, 0)  # [B] suffix lengths
    width = int(m.max())  # one host sync per move
    if width == 0:
        return invalid
    big_t = prop.tokens.shape[1]
    c = torch.arange(width, device=n.device)
    real = c[None, :] < m[:, None]  # [B, W]
    suffix = prop.tokens.gather(1, (e[:, None] + c[None, :]).clamp(max=big_t - 1))  # [B, W]
    ends = problem.engine.is_eos(suffix)
    states = torch.zeros_like(suffix)
    if problem.stop is not None:
        after_block = prop.stop_state.gather(1, (e - 1).clamp_min(0)[:, None])[:, 0]
        states, hits = problem.stop.scan(after_block, suffix)  # [B, W] each
        ends = ends | hits
    last = real & (c[None, :] == (m - 1)[:, None])
    ended = (ends & last).any(1)  # [B]
    early = (ends & real & ~last).any(1)
    bad = rows & (early | ((ended != cur.ended) & (n < horizon)))
    invalid, rows = invalid | bad, rows & ~bad
    complete = ended | (n >= t_max)
    n_tok = torch.where(rows, m + 1 - complete.long(), 0)  # y_{e−1} ⊕ s, less s's last when complete
    q = width + 1
    k = torch.arange(q, device=n.device)
    at = e[:, None] + k[None, :] - (q - n_tok)[:, None]  # [B, Q] position whose distribution column k reads
    fed = prop.tokens.gather(1, (at - 1).clamp(0, big_t - 1))  # the token fed in column k sits at at − 1
    scored = decoder.score(torch.where(at - 1 >= e[:, None] - 1, fed, 0), n_tok)  # [B, Q, V] per stream
    b_idx = torch.arange(n.shape[0], device=n.device)
    for col in range(q):
        pos = at[:, col]  # [B]
        write = rows & (pos >= e) & (pos < n)
        view = decoder.bind(scored.at(col), scored.positions[:, col])
        a_q: float | Tensor = problem.alpha if q_schedule is None else q_schedule.at_rows(pos + 1)
        here = pos.clamp(0, big_t - 1)
        got = problem.score(view, a_q, prop.tokens[b_idx, here])
        for name, val in (("log_q", got.log_q), ("log_phi", got.log_phi), ("log_p", got.log_p)):
            arr = getattr(prop, name)
            arr[b_idx, here] = torch.where(write, val, arr[b_idx, here])
    t = torch.arange(big_t, device=n.device)
    in_suffix = rows[:, None] & (t[None] >= e[:, None]) & (t[None] < n[:, None])  # [B, T]
    new_states = states.gather(1, (t[None] - e[:, None]).clamp(0, width - 1))
    prop.stop_state = torch.where(in_suffix, new_states, prop.stop_state)
    prop.length = torch.where(rows, n, prop.length)
    prop.ended = torch.where(rows, ended, prop.ended)
    goes_on = rows & ~complete
    prop.view = scored.at(q - 1).where(goes_on, prop.view)
    return invalid


def block_decide(
    problem: Problem,
    decoder: DecoderOps,
    cur: Chains,
    prop: Chains,
    move: BlockMove,
    invalid: Tensor,
    alpha: float | None = None,
    partial_ok: bool = False,
) -> tuple[Chains, MoveInfo]:
    """Accept or reject every row's block proposal (:func:`block_log_accept`; a row whose proposal
    kept x_[i, e) whole is x itself: accepted, log A = 0); rejected rows return to their old cache
    columns, accepted ones keep the new block's and the rescored suffix's. ``partial_ok``: as in
    :func:`decide` (SMC's intermediate targets: unfinished proposals carry the prefix twist)."""
    moved = move.diverged & ~invalid
    problem.update_psi(prop, moved, partial_ok=partial_ok)
    new_end = torch.where(move.interior, move.end, prop.length)  # e' = min(i + span, |x'|)
    log_a = block_log_accept(
        problem.log_target(prop, alpha),
        problem.log_target(cur, alpha),
        span_log_q(cur, move.i, move.end),
        span_log_q(prop, move.i, new_end),
        cur.length,
        prop.length,
        ~invalid,
    )
    log_a = torch.where(move.diverged, log_a, torch.zeros_like(log_a))
    u = problem.rng.rand(log_a.shape[0]).to(log_a.device)
    accept = ~move.diverged | (moved & (torch.log(u) < log_a))
    decoder.restore_rows(move.diverged & ~accept)
    info = MoveInfo(accept, move.i, move.j - move.i, log_a, cur.length, prop.length, new_end - move.i, invalid)
    return prop.where(accept, cur), info


def block_move(
    problem: Problem,
    decoder: DecoderOps,
    cur: Chains,
    horizon: int,
    span: int,
    alpha: float | None = None,
    q_schedule: Anneal | None = None,
    index: Tensor | None = None,
    partial_ok: bool = False,
) -> tuple[Chains, MoveInfo]:
    """One interior-block MH move on every row for π restricted to the first ``horizon`` tokens
    (``partial_ok``: SMC's intermediate target, as in :func:`mh_move`).

    The move. On x (|x| = n tokens, a sequence of the stopped space at horizon H: no end before
    its last token, and its last token ends it unless n = H) draw i ~ U{0..n−1} and let
    e = min(i + B, n), B = ``span``.

    * Interior (e < n): draw a block y of exactly B tokens from q(· | x_<i) (coupled with x_[i, e),
      :func:`divergence`: same law), keep the suffix s = x_≥e, and propose x' = x_<i ⊕ y ⊕ s
      (|x'| = n). s is rescored in its new context by one teacher-forced forward (:func:`rescore`).
    * Tail (e = n): draw y from q(· | x_<i) to an end (EOS, a stop) or the cap min(i + B, H) and
      propose x' = x_<i ⊕ y (a suffix move whose proposal may not exceed B tokens).

    EOS and stops: x' must be a sequence of the space, else A = 0 (the row stays): an interior y
    may not end (no EOS, no stop completed inside it), the rescored s may not end before its last
    token, and below the horizon its last token must still end it (a stop it completed may no
    longer complete in the new context); a tail that reaches its cap below H without ending is
    not a sequence either. The proposal's law is plain q throughout: these proposals are simply
    refused, so no renormalised q (whose normaliser would be needed along x's old block too) is
    ever computed; a refused proposal stops drawing at once.

    Exactness. The move is MH with the auxiliary index i. For a valid x', the same i is the same
    kind of move on x' (interior: |x'| = n, e' = e; tail: |x'| ≤ i + B so e' = |x'|) and proposes x
    back with the block x_[i, e). So Q(x → x') = q(y | x_<i) / n and Q(x' → x) = q(x_[i, e) | x_<i) / |x'|
    and the MH ratio is :func:`block_log_accept`: π over block *and* suffix, q over the block
    only (s is kept, not proposed), and log n − log |x'| (0 for interior moves). Detailed balance
    holds for each i, hence for the mixture over i. Refused proposals (x' outside the space) only
    move probability to "stay", which never breaks it. Tested by the exact one-move transition
    matrix on enumerated sequence spaces (π K = π) and χ² against the exact π.

    Cost: |y| − (j − i) decode tokens for the block (plus one to re-read the distribution at j)
    and one forward of |s| + 1 tokens (ragged over rows) for the suffix; no sequential decode of s,
    nothing at all when y = x_[i, e). The suffix's old KV is dropped on acceptance (its context
    changed); on rejection the row returns to its old columns (:meth:`Decoder.restore_rows`)."""
    decoder.compact()
    fresh, move = block_begin(problem, decoder, cur, span, horizon, index)
    prop = fresh.clone()
    invalid = grow_block(problem, decoder, prop, move, horizon, q_schedule)
    invalid = rescore(problem, decoder, cur, prop, move, invalid, horizon, q_schedule)
    return block_decide(problem, decoder, cur, prop, move, invalid, alpha, partial_ok=partial_ok)
