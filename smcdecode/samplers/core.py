"""Shared machinery of every sampler: the batch of partial sequences, the multi-stream decoder,
and the token-extension loop (the Metropolis–Hastings move is :mod:`~smcdecode.samplers.kernels`).

Target decomposition. A target is written π = base ** α (α = 1 when it is not a power):
log π(x) = α_t · [Σ_t log φ_t(x_t) + log ψ(x)], where φ and ψ are the base's token factors and
sequence potential. The per-token scalars kept for every generated position are the base's
log φ, the proposal's log q and the model's log p; nothing of vocabulary size is kept per
position, only the next-token readout of each row (``Chains.view``).

Sequence space. A continuation ends at EOS, at ``max_new_tokens``, or at the token that first
completes a stop pattern (``Problem.stop``, a :class:`~smcdecode.stopping.StopSet`): ``Chains.ended``
covers EOS and stops alike, so π and q are both defined on the stopped space and every ratio below
(MH index term, reverse proposal, SMC weights) is taken on it. The stop automaton's state after
each generated token is kept per position (``Chains.stop_state``), so a move that regenerates from
position i resumes the automaton where x_<i left it.

Twist (SMC with a lookahead proposal, ``Problem.twist``). The proposal's estimate of the future
mass Ẑ(x_≤t) is stored per position (``Chains.log_twist``); the intermediate target of a partial
sequence is p(x_≤t)^α · Ẑ(x_≤t) and a finished sequence's twist is 1, so the increment of token t
is  α·log φ_t − log q_t + log Ẑ(x_≤t) − log Ẑ(x_<t)  with the *stored* Ẑ(x_<t) (see
:mod:`~smcdecode.proposals.lookahead`).

Invariant: for every row that has not ended and has fewer than ``max_new_tokens``
tokens, every stream's KV cache holds prompt + all generated tokens, and ``view`` holds the
next-token readouts. Finished rows keep a stale view that is never read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from smcdecode.backends import Backend, Batch
from smcdecode.errors import ArgumentError
from smcdecode.proposals.base import Context, Proposal, sample
from smcdecode.readouts import Aux, Readouts, Requirements
from smcdecode.samplers.result import Result, Sample, Trace
from smcdecode.samplers.rng import OneStream, Rng
from smcdecode.stopping import StopSet
from smcdecode.targets.base import Potential, Sequences

CHECK_EVERY = 8  # decode steps between host checks of "are all rows finished?"


@dataclass
class Drawn:
    """One token drawn per row with its per-token scalars (all [B])."""

    tokens: Tensor
    log_q: Tensor  # of the distribution actually sampled from
    log_phi: Tensor  # base token factor
    log_p: Tensor  # model log-prob
    log_twist: Tensor | None = None  # twist log ψ(x_≤t) of the drawn token (Problem.twist), else None


@dataclass
class Chains:
    """B partial sequences (chains or particles). Shapes: [B] or [B, T] with T = max_new_tokens."""

    tokens: Tensor  # [B, T] long
    length: Tensor  # [B] long, generated tokens
    ended: Tensor  # [B] bool, produced EOS or completed a stop pattern
    log_phi: Tensor  # [B, T] base token factor of each generated token
    log_q: Tensor  # [B, T] proposal log-prob of each generated token (exact, stored at sampling)
    log_p: Tensor  # [B, T] model log-prob of each generated token
    log_psi: Tensor  # [B] base sequence potential (twist while partial, final at completion)
    stop_state: Tensor  # [B, T] long: stop-automaton state after each generated token (0 without stops)
    view: Readouts  # next-token readouts per row
    log_twist: Tensor  # [B, T] lookahead twist log ψ(x_≤t) after each generated token (0: none, or finished)

    def index_select(self, idx: Tensor) -> Chains:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Chains(**{k: (v.index_select(idx) if k == "view" else v[idx]) for k, v in kw.items()})

    def where(self, mask: Tensor, other: Chains) -> Chains:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "view":
                out[f.name] = a.where(mask, b)
            else:
                out[f.name] = torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
        return Chains(**out)

    def clone(self) -> Chains:
        return self.index_select(torch.arange(self.length.shape[0], device=self.length.device))

    def positions(self) -> Tensor:
        """[B, T] bool: generated positions."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return t[None, :] < self.length[:, None]

    def sum_log_phi(self) -> Tensor:
        return (self.log_phi * self.positions()).sum(1)

    def sum_log_p(self) -> Tensor:
        return (self.log_p * self.positions()).sum(1)

    def last_stop_state(self) -> Tensor:
        """[B] stop-automaton state after each row's last generated token (0 for an empty row)."""
        prev = self.stop_state.gather(1, (self.length - 1).clamp_min(0)[:, None])[:, 0]
        return torch.where(self.length > 0, prev, torch.zeros_like(prev))

    def current_twist(self) -> Tensor:
        """[B] log ψ of each row's current prefix (0 for an empty row)."""
        prev = self.log_twist.gather(1, (self.length - 1).clamp_min(0)[:, None])[:, 0]
        return torch.where(self.length > 0, prev, torch.zeros_like(prev))

    def append(self, active: Tensor, step: Drawn, ends: Tensor, stop_state: Tensor) -> None:
        """Write the drawn token of every ``active`` row at its next position, in place; ``ends``
        [B]: the token ends the sequence (EOS or a stop completion, see :meth:`Problem.ends`)."""
        rows = torch.arange(self.length.shape[0], device=self.length.device)
        col = self.length.clamp(max=self.tokens.shape[1] - 1)
        for name, val in (
            ("tokens", step.tokens),
            ("log_q", step.log_q),
            ("log_phi", step.log_phi),
            ("log_p", step.log_p),
            ("stop_state", stop_state),
            *((("log_twist", step.log_twist),) if step.log_twist is not None else ()),
        ):
            arr = getattr(self, name)
            arr[rows, col] = torch.where(active, val, arr[rows, col])
        self.length = self.length + active.long()
        self.ended = self.ended | (active & ends)

    def put(self, ids: Tensor, other: Chains) -> None:
        """Rows ``ids`` of self become ``other``'s rows, in place (the view is left as it is)."""
        for f in fields(self):
            if f.name != "view":
                getattr(self, f.name)[ids] = getattr(other, f.name)

    def token_lists(self) -> list[list[int]]:
        toks, lens = self.tokens.tolist(), self.length.tolist()
        return [t[:n] for t, n in zip(toks, lens)]


class DecoderOps(Protocol):
    """The decoder operations a sampler loop uses (:class:`Decoder`; SMC's streamed problems use
    a proxy over their rows of a shared batch, :mod:`~smcdecode.samplers.multiplex`)."""

    hidden: bool

    def decode(self, tokens: Tensor, active: Tensor) -> Readouts: ...

    def score(self, tokens: Tensor, n_tokens: Tensor) -> Scored: ...

    def bind(self, view: Readouts, positions: Tensor | None = None) -> Readouts: ...

    def start_moves(self, rows: Tensor, keep: Tensor) -> None: ...

    def restore_rows(self, rows: Tensor) -> None: ...

    def select(self, idx: Tensor) -> None: ...

    def compact(self) -> None: ...


@dataclass
class Stream:
    engine: Backend
    key: Aux | None  # None for the main stream
    batch: Batch
    prompt_len: Tensor  # [B]
    own_prompt: list[int] | None  # an Aux stream's fixed prompt (None: each row's own)


class Decoder:
    """The main backend plus one stream per ``Aux`` key, driven in lockstep; returns the main
    backend's readouts merged with each stream's final log-probs under its key."""

    def __init__(self, engine: Backend, req: Requirements, prompt_ids: list[list[int]], rows_per_prompt: int):
        self.engine = engine
        self.rows_per_prompt = rows_per_prompt
        self.hidden = req.hidden
        self.prompt_ids = prompt_ids
        self.backend_keys = req.backend_keys()
        self.aux = req.aux
        self.streams: list[Stream] = []

    def start(self) -> Readouts:
        """Prefill every stream once per prompt, then repeat rows for the chains/particles."""
        n = self.rows_per_prompt
        outs: dict[Aux | None, Readouts] = {}
        for key in (None, *self.aux):
            eng = self.engine if key is None or key.engine is None else key.engine
            own = None if key is None else key.prompt_ids(eng)
            ids = self.prompt_ids if own is None else [own] * len(self.prompt_ids)
            batch, outs[key] = eng.start(ids, n, self.backend_keys if key is None else ())
            plen = torch.tensor([len(p) for p in ids], device=eng.device).repeat_interleave(n)
            self.streams.append(Stream(eng, key, batch, plen, own))
        return _merged(outs)

    def decode(self, tokens: Tensor, active: Tensor) -> Readouts:
        """One token per row (rows with ``active`` False are not added). Rows truncated by
        :meth:`start_moves` feed their last kept token again instead (see ``Backend.truncate``)."""
        outs: dict[Aux | None, Readouts] = {}
        for s in self.streams:
            outs[s.key] = s.engine.decode(s.batch, tokens.to(s.engine.device), active.to(s.engine.device))
        return _merged(outs)

    def admit(self, rows: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        """Rows ``rows`` (long [k]) start afresh on ``prompt_ids`` (one per row) in every stream
        (see ``Backend.admit``); returns their next-token readouts, [k]."""
        outs: dict[Aux | None, Readouts] = {}
        for s in self.streams:
            ids = prompt_ids if s.own_prompt is None else [s.own_prompt] * len(prompt_ids)
            r = rows.to(s.engine.device)
            outs[s.key] = s.engine.admit(s.batch, r, ids)
            s.prompt_len[r] = torch.tensor([len(p) for p in ids], device=s.engine.device)
        return _merged(outs)

    def start_moves(self, rows: Tensor, keep: Tensor) -> None:
        """For ``rows``: snapshot the context (for :meth:`restore_rows`) and truncate it to prompt +
        the first ``keep`` generated tokens; the next :meth:`decode` returns the distribution there."""
        for s in self.streams:
            r, k = rows.to(s.engine.device), keep.to(s.engine.device)
            s.engine.save_rows(s.batch, r)
            s.engine.truncate(s.batch, r, s.prompt_len + k)

    def score(self, tokens: Tensor, n_tokens: Tensor) -> Scored:
        """Teacher-force ``tokens`` [B, Q] on every stream in one forward each (row b appends its
        last ``n_tokens[b]``, see :meth:`Backend.score`) and return the readouts at every column;
        ``Scored.at(Q − 1)`` is each row's next-token view after its new context."""
        outs: dict[Aux | None, Readouts] = {}
        for s in self.streams:
            outs[s.key] = s.engine.score(s.batch, tokens.to(s.engine.device), n_tokens.to(s.engine.device))
        q = tokens.shape[1]
        lengths = self.streams[0].batch.lengths  # after the forward
        positions = (lengths[:, None] - q + torch.arange(q, device=lengths.device)[None, :]).clamp_min(0)
        return Scored(_merged(outs), positions)

    def bind(self, view: Readouts, positions: Tensor | None = None) -> Readouts:
        """Attach ``recur`` for the main stream's cache: at each row's last position, or at
        ``positions`` [B] (the position of the token whose readout ``view`` is: a scored column)."""
        if self.hidden:
            main = self.streams[0]
            pos = main.batch.lengths - 1 if positions is None else positions
            view.recur = lambda h, span: main.engine.reapply(main.batch, h, span, pos)
        return view

    def keep_rows(self, idx: Tensor) -> None:
        """Keep only rows ``idx`` (long [B']) of every stream, in that order (drop finished chains)."""
        for s in self.streams:
            i = idx.to(s.engine.device)
            s.engine.select(s.batch, i)
            s.prompt_len = s.prompt_len[i]

    def restore_rows(self, rows: Tensor) -> None:
        for s in self.streams:
            s.engine.restore_rows(s.batch, rows.to(s.engine.device))

    def select(self, idx: Tensor) -> None:
        """Resample rows; every index must stay within its row's prompt group."""
        for s in self.streams:
            i = idx.to(s.engine.device)
            s.engine.select(s.batch, i, within_groups=True)
            s.prompt_len = s.prompt_len[i]

    def compact(self) -> None:
        for s in self.streams:
            s.engine.compact(s.batch)


@dataclass
class Scored:
    """Readouts of one teacher-forced forward at every column ([B, Q, ·], every stream's keys);
    column k's token sits at ``positions[:, k]``."""

    readouts: Readouts
    positions: Tensor  # [B, Q] long (meaningful on each row's real columns)

    def at(self, k: int) -> Readouts:
        """The readouts after column k's token, [B, ·] (bind ``positions[:, k]``)."""
        return self.readouts.column(k)


def _merged(outs: dict[Aux | None, Readouts]) -> Readouts:
    """The main stream's readouts (key None) plus each auxiliary stream's final log-probs."""
    main = outs[None]
    return main.merged({k: v.log_p.to(main.log_p.device) for k, v in outs.items() if k is not None})


@dataclass
class Problem:
    """Everything fixed during one run: engine, target split into base ** alpha, proposal."""

    engine: Backend
    target: Potential | None
    proposal: Proposal
    prompts: Sequence[Any]
    prompt_ids: list[list[int]]
    rows_per_prompt: int
    max_new_tokens: int
    rng: Rng
    base: Potential | None = None
    alpha: float = 1.0
    stop_tokens: Tensor | None = None  # [V] bool: an SMC block ends after one of these (delimiter)
    stop: StopSet | None = None  # the sequence ends at a token that completes one of these patterns
    requirements: Requirements = field(default_factory=Requirements)
    twist: bool = False  # SMC's intermediate targets carry the proposal's twist (see the module docstring)

    def __post_init__(self) -> None:
        if self.target is not None:
            self.base, self.alpha = self.target.exponent_split()
        req = self.proposal.requirements(self.engine)
        self.engine.require(req.capabilities(), repr(self.proposal))
        if self.target is not None:
            t_req = self.target.requirements(self.engine)
            self.engine.require(t_req.capabilities(), repr(self.target))
            req = req | t_req
        self.requirements = req

    def base_factor(self, view: Readouts) -> Tensor | None:
        return None if self.base is None else self.base.token_log_factor(view)

    def context(self, decoder: DecoderOps, chains: Chains, active: Tensor) -> Context | None:
        """The :class:`~smcdecode.proposals.base.Context` of a draw on ``chains`` (None unless the
        proposal has auxiliary randomness): the main stream's batch holds each row's x_<t (a
        proposal with rollouts runs on a :class:`Decoder` of its own, never a shared batch)."""
        if not self.proposal.auxiliary:
            return None
        assert isinstance(decoder, Decoder), "a proposal with rollouts needs its own Decoder"
        main = decoder.streams[0]
        return Context(
            engine=main.engine,
            batch=main.batch,
            length=chains.length,
            active=active,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            stop_state=chains.last_stop_state(),
            rng=self.rng,
            log_twist=chains.current_twist(),
        )

    def draw(
        self, view: Readouts, alpha: float | Tensor, exclude: Tensor | None = None, ctx: Context | None = None
    ) -> Drawn:
        """Draw x_t ~ q_t for every row; q may use the target's factor α·φ (LocallyOptimal;
        ``alpha`` a float or one per row, [B]). Rows with ``exclude[b]`` ≥ 0 draw from q
        conditioned on x_t ≠ exclude[b] (see :func:`~smcdecode.samplers.kernels.divergence`); log q
        is always q's own. ``ctx``: see :meth:`context` (proposals with rollouts need it)."""
        log_q_all, phi, twist = self._log_q(view, alpha, ctx)
        u = self.rng.rand(log_q_all.shape[0], 1, dtype=torch.float64)  # [B, 1]
        tok, _ = sample(log_q_all, None, exclude, u)  # [B]
        return self._scalars(view, tok, log_q_all, phi, twist)

    def score(self, view: Readouts, alpha: float | Tensor, tokens: Tensor) -> Drawn:
        """The per-token scalars of given ``tokens`` [B] read at ``view`` (teacher-forced), by the
        same path as :meth:`draw`: log q is the proposal's own, with the target factor α·φ.
        (Proposals with rollouts have no q of a given token without their draw: they refuse.)"""
        log_q_all, phi, _ = self._log_q(view, alpha, None)
        return self._scalars(view, tokens, log_q_all, phi, None)

    def _log_q(
        self, view: Readouts, alpha: float | Tensor, ctx: Context | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(log q [B, V], the base factor φ [B, V] or None, the proposal's twist table or None)."""
        phi = self.base_factor(view)  # [B, V] or None
        a = alpha[:, None] if isinstance(alpha, Tensor) else alpha
        log_q, twist = self.proposal.propose(view, lambda _v: None if phi is None else a * phi, ctx)
        return log_q, phi, (twist if self.twist else None)

    @staticmethod
    def _scalars(view: Readouts, tok: Tensor, log_q_all: Tensor, phi: Tensor | None, twist: Tensor | None) -> Drawn:
        lq = log_q_all.gather(1, tok[:, None])[:, 0]
        lphi = torch.zeros_like(lq) if phi is None else phi.gather(1, tok[:, None])[:, 0]
        lt = None if twist is None else twist.gather(1, tok[:, None])[:, 0]
        return Drawn(tok, lq, lphi, view.log_p.gather(1, tok[:, None])[:, 0], lt)

    def twist_of(self, chains: Chains, drawn: Drawn, ends: Tensor) -> Tensor:
        """[B] log ψ(x_≤t) after appending ``drawn`` (``ends``: the token ends the sequence): the
        proposal's twist, 1 (log 0) once the sequence is finished, the current one when the
        proposal gave none."""
        new = chains.current_twist() if drawn.log_twist is None else drawn.log_twist
        finished = ends | (chains.length + 1 >= self.max_new_tokens)
        return torch.where(finished, torch.zeros_like(new), new)

    def ends(self, chains: Chains, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Does appending ``tokens`` [B] end each row (EOS, or the first completion of a stop
        pattern)? Returns that [B] bool and the stop automaton's state after the token [B]."""
        eos = self.engine.is_eos(tokens)
        if self.stop is None:
            return eos, torch.zeros_like(tokens)
        state, hit = self.stop.step(chains.last_stop_state(), tokens)
        return eos | hit, state

    def sequences(self, chains: Chains, rows: list[int] | None = None, ids: list[int] | None = None) -> Sequences:
        """``rows`` of ``chains`` as sequences; ``ids`` maps each batch row to its original row
        (prompt r // rows_per_prompt) when finished rows have left the batch."""
        toks = chains.token_lists()
        rows = list(range(len(toks))) if rows is None else rows
        orig = rows if ids is None else [ids[r] for r in rows]
        n = self.rows_per_prompt
        return Sequences(
            prompts=self.prompts,
            prompt_index=[r // n for r in orig],
            sample_index=[r % n for r in orig],
            tokens=[toks[r] for r in rows],
            decode=self.engine.decode_text,
        )

    def complete(self, chains: Chains) -> Tensor:
        return chains.ended | (chains.length >= self.max_new_tokens)

    def update_psi(self, chains: Chains, rows: Tensor, partial_ok: bool, ids: Tensor | None = None) -> None:
        """Recompute the base sequence potential of ``rows`` (bool [B]): at completion always;
        on partial rows only when the target is a prefix twist and ``partial_ok``. Others get 0.
        ``ids``: original row of each batch row (see :meth:`sequences`)."""
        if self.base is None or not self.base.has_sequence_potential:
            return
        complete = self.complete(chains)
        want = rows & (complete | torch.tensor(partial_ok and self.base.prefix, device=rows.device))
        idx = torch.nonzero(want).view(-1).tolist()  # host sync: sequence potentials run on host
        psi = torch.zeros_like(chains.log_psi)
        if idx:
            orig = None if ids is None else ids.tolist()
            values = self.base.sequence_log_potential(self.sequences(chains, idx, orig))
            if values is not None:
                psi[torch.tensor(idx, device=psi.device)] = values.to(psi)
        chains.log_psi = torch.where(rows, psi, chains.log_psi)

    def log_target(self, chains: Chains, alpha_phi: float | None = None) -> Tensor:
        """α_φ · Σ log φ + α · log ψ of each row's current sequence (α_φ = α unless annealing)."""
        a = self.alpha if alpha_phi is None else alpha_phi
        return a * chains.sum_log_phi() + self.alpha * chains.log_psi


def start_chains(problem: Problem) -> tuple[Decoder, Chains]:
    decoder = Decoder(problem.engine, problem.requirements, problem.prompt_ids, problem.rows_per_prompt)
    return decoder, empty_chains(problem, decoder.start())


def empty_chains(problem: Problem, view: Readouts) -> Chains:
    """Chains with no generated token, one per row of ``view`` (the readouts after the prompts)."""
    eng = problem.engine
    b, t = view.log_p.shape[0], problem.max_new_tokens
    z = torch.zeros(b, t, device=eng.device)
    return Chains(
        tokens=torch.zeros(b, t, dtype=torch.long, device=eng.device),
        length=torch.zeros(b, dtype=torch.long, device=eng.device),
        ended=torch.zeros(b, dtype=torch.bool, device=eng.device),
        log_phi=z,
        log_q=z.clone(),
        log_p=z.clone(),
        log_psi=torch.zeros(b, device=eng.device),
        stop_state=torch.zeros(b, t, dtype=torch.long, device=eng.device),
        view=view,
        log_twist=z.clone(),
    )


@dataclass(frozen=True)
class Anneal:
    """The schedule α_t = 1 + (α − 1) · min(t / steps, 1)."""

    alpha: float
    steps: int

    def at(self, t: int) -> float:
        return 1.0 + (self.alpha - 1.0) * min(t / self.steps, 1.0)

    def at_rows(self, t: Tensor) -> Tensor:
        """α_t for each row's own t ([B] long)."""
        return (1.0 + (self.alpha - 1.0) * (t.double() / self.steps).clamp(max=1.0)).float()


def extend(
    problem: Problem,
    decoder: DecoderOps,
    chains: Chains,
    horizon: int,
    anneal: Anneal | None = None,
    log_w: Tensor | None = None,
    exclude: Tensor | None = None,
    q_schedule: Anneal | None = None,
    alpha_w: float = 1.0,
) -> float:
    """Extend every unfinished row with q up to ``horizon`` generated tokens (or its end: EOS, a
    stop pattern; or an SMC delimiter token), in place. With ``log_w`` given, add the SMC
    incremental weight of every token:

        log w += α_t · log φ_t(x_t) − log q_t(x_t) + (α_t − α_{t−1}) · Σ_{s<t} log φ_s(x_s)
                 [+ log ψ(x_≤t) − log ψ(x_<t)   with ``problem.twist``: the stored twists]

    where α_t = ``anneal.at(t)`` (t = 1-based step; rows are token-synchronous) or the constant
    α; the last term (annealing) applies to every row, finished ones included. ``alpha_w`` is the
    α already in ``log_w``; returns the α in it afterwards.

    ``exclude`` conditions each row's *first* draw on x ≠ exclude[b] (see
    :func:`~smcdecode.samplers.kernels.divergence`).
    ``q_schedule`` draws each row's token t with α_t of its own position (the q an annealed
    extension used), so a move's forward and reverse proposals are the same kernel."""
    t_max = problem.max_new_tokens
    todo = ~chains.ended & (chains.length < horizon)
    if not bool(todo.any()):  # one sync per extension
        return alpha_w
    start = int(chains.length[todo].min())
    stopped = torch.zeros_like(chains.ended)
    for step in range(start, horizon):
        active = ~chains.ended & ~stopped & (chains.length < horizon)  # [B]
        if (step - start) % CHECK_EVERY == CHECK_EVERY - 1 and not bool(active.any()):
            break
        view = chains.view
        a_t = problem.alpha if anneal is None else anneal.at(step + 1)
        a_q: float | Tensor = a_t if q_schedule is None else q_schedule.at_rows(chains.length + 1)
        ctx = problem.context(decoder, chains, active)
        drawn = problem.draw(decoder.bind(view), a_q, exclude if step == start else None, ctx)
        tok = drawn.tokens
        ends, state = problem.ends(chains, tok)
        if problem.twist:
            drawn.log_twist = problem.twist_of(chains, drawn, ends)
        if log_w is not None:
            if anneal is not None:
                log_w += (a_t - alpha_w) * chains.sum_log_phi()  # before this token is counted
                alpha_w = a_t
            log_w += torch.where(active, a_t * drawn.log_phi - drawn.log_q, torch.zeros_like(drawn.log_q))
            if problem.twist:
                assert drawn.log_twist is not None
                log_w += torch.where(active, twist_increment(chains, drawn), torch.zeros_like(drawn.log_q))
        chains.append(active, drawn, ends, state)
        if problem.stop_tokens is not None:
            stopped = stopped | (active & problem.stop_tokens[tok])
        feed = active & ~chains.ended & (chains.length < t_max)
        if step + 1 == horizon == t_max:
            break  # nothing left to feed
        chains.view = decoder.decode(tok, feed).where(feed, view)
    return alpha_w


def twist_increment(chains: Chains, drawn: Drawn) -> Tensor:
    """[B] log ψ(x_≤t) − log ψ(x_<t): the new twist over the one *stored* with the prefix (the
    value that weighted it; dividing by a fresh estimate instead would bias the weights)."""
    assert drawn.log_twist is not None
    return drawn.log_twist - chains.current_twist()


def check_run_args(max_new_tokens: int, seed: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ArgumentError("max_new_tokens", f"must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentError("seed", f"must be an int, got {seed!r}")


def make_problem(
    engine: Backend,
    prompts: Any,
    target: Potential | None,
    proposal: Proposal,
    rows_per_prompt: int,
    max_new_tokens: int,
    seed: int,
    stop: StopSet | None = None,
) -> Problem:
    check_run_args(max_new_tokens, seed)
    ids = engine.encode(prompts)
    for k, p in enumerate(ids):
        if len(p) + max_new_tokens > engine.max_positions:
            raise ArgumentError(
                "max_new_tokens",
                f"prompt {k} ({len(p)} tokens) + {max_new_tokens} exceeds the context ({engine.max_positions})",
            )
    rng = OneStream(torch.Generator(device=engine.device).manual_seed(seed))
    problem = Problem(engine, target, proposal, list(prompts), ids, rows_per_prompt, max_new_tokens, rng)
    problem.stop = stop
    return problem


def logmeanexp(x: Tensor, dim: int = -1) -> Tensor:
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def collect(
    problem: Problem, chains: Chains, log_w: Tensor | None, trace: Trace, log_evidence: list[float | None] | None = None
) -> Result:
    """Final chains -> Result. ``log_w`` None means uniform weights."""
    n = problem.rows_per_prompt
    b = chains.length.shape[0]
    if log_w is None:
        log_w = torch.zeros(b, device=chains.length.device)
    grouped = log_w.view(-1, n)
    lw = (grouped - torch.logsumexp(grouped, dim=1, keepdim=True)).view(-1).tolist()
    log_p = chains.sum_log_p().tolist()
    log_q = (chains.log_q * chains.positions()).sum(1).tolist()
    log_t = problem.log_target(chains).tolist() if problem.target is not None else [None] * b
    tokens = chains.token_lists()
    samples: list[list[Sample]] = []
    for r in range(b):
        if r % n == 0:
            samples.append([])
        samples[-1].append(
            Sample(tokens[r], problem.engine.decode_text(tokens[r]), lw[r], log_p[r], log_t[r], log_q[r])
        )
    ev: list[float | None] = list(log_evidence) if log_evidence is not None else [None] * len(samples)
    return Result(samples, ev, trace)
