"""SMC resample-move over N particles per prompt.

Steps are blocks of B tokens (B = 1: token-level SMC) or runs up to a delimiter string. For each
generated token the incremental log weight is

    log w_t = α_t·log φ_t(x_t) − log q_t(x_t) + (α_t − α_{t−1})·Σ_{s<t} log φ_s(x_s)

(the last term only with ``anneal=R``: α_t = 1 + (α−1)·min(t/R, 1)). At every block boundary the
sequence potential adds α·(log ψ(x_≤t) − log ψ(x_≤s)) (always at the final α): the reward at
completion, and the twist on partial sequences when the target is ``Reward(..., prefix=True)``.
Finished particles keep their weight. When ESS = 1/Σ W² < κ·N for a prompt its particles are
resampled with the chosen scheme and their log weights all set to the group's log-mean, so
log Ẑ = logmeanexp(log w) stays unbiased (:class:`~smcdecode.samplers.weights.Weights`).
``rejuvenate=k`` then runs k MH moves on the current intermediate target (π restricted to the
longest particle's length, with the exponent α_t that is part of the loop's state): suffix moves
(:func:`~smcdecode.samplers.kernels.mh_move`), interior-block moves of ``span`` tokens
(:func:`~smcdecode.samplers.kernels.block_move`, ``move="block"``) or both alternating
(``move="mix"``, suffix first); each leaves that target invariant, so any sequence of them does.
With ``LocallyOptimal`` q the token term equals logsumexp_v α·log φ(v) (Power-SMC).

Streaming (:meth:`SMC.stream`, continuous batching): each problem runs this same loop
(``SMC._loop``) with its own random stream on its rows of one shared batch, the problems'
forwards merged (:mod:`~smcdecode.samplers.multiplex`), so a problem's result is the one of
``run(engine, [prompt], seed=seed)``; rollout proposals and hidden-state targets/proposals run one
problem at a time.

Lookahead twist (``twist=True``, with a proposal that provides one: :class:`~smcdecode.proposals.Lookahead`).
The particle state is extended with the proposal's auxiliary draws u (rollouts), and the
intermediate target after t tokens is

    γ_t(x_≤t, u_≤t) = p(x_≤t)^α · ψ_t(x_≤t, u_≤t) · Π_{s≤t} r(u_s | x_<s),

with ψ_t = Ẑ(x_≤t), the rollout estimate of the future mass Z(x_≤t) = Σ_s p(s | x_≤t)^α made when
x_t was drawn, stored with the particle (``Chains.log_twist``). The increment of token t is
γ_t / (γ_{t−1} · r(u_t) · q(x_t | x_<t, u_t)):

    log w_t = α·log p(x_t) − log q(x_t | x_<t, u_t) + log Ẑ(x_≤t) − log Ẑ(x_<t)

dividing by the *stored* Ẑ(x_<t), the value that weighted the particle at the previous step
(dividing by a fresh re-estimate would not telescope). Why this is exact: SMC is unbiased for
the normalising constant and consistent for the final target whatever the intermediate targets
are, as long as each is a positive function on the extended space wherever the next proposal
puts mass (only the ratio γ_t/γ_{t−1} enters each increment and the product telescopes). A
finished sequence has twist 1 (Z = 1 for it: the empty completion), so the final target is
p(x)^α · Π r(u) whose x-marginal is exactly p^α, and log Ẑ estimates log Σ_x p(x)^α without bias,
whatever K, M, H (and however poor Ẑ is: it only changes the variance). Rejuvenation moves target
γ_t too: the MH ratio includes Ẑ of the proposed and current prefixes, the moves regenerate fresh
rollouts (no coupling with the current suffix), and the auxiliary draws u of the kept prefix stay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentError, ArgumentTypeError, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.readouts import Requirements
from smcdecode.samplers.base import Sampler, bar, check_target_proposal
from smcdecode.samplers.core import (
    Anneal,
    Chains,
    DecoderOps,
    Problem,
    check_run_args,
    collect,
    extend,
    make_problem,
    start_chains,
)
from smcdecode.samplers.kernels import block_move, mh_move, move_trace
from smcdecode.samplers.multiplex import multiplex
from smcdecode.samplers.resampling import SCHEMES
from smcdecode.samplers.result import Result, StepTrace, Trace
from smcdecode.samplers.stream import Finished
from smcdecode.samplers.weights import Weights
from smcdecode.stopping import StopSet, StopSpec, stop_set
from smcdecode.targets.base import Potential

MOVES = ("suffix", "block", "mix")


class SMC(Sampler):
    """SMC resample-move over ``particles`` particles per prompt (module ``smcdecode.samplers.smc``
    gives the weights, the resampling rule and the twist).

    Args:
        target: The target potential π; a target ``base ** α`` lets ``anneal`` ramp α.
        proposal: The proposal q (``LocallyOptimal()`` makes the token term independent of the
            token drawn).
        particles: Particles N per prompt.
        ess_threshold: Resample a prompt's particles when ESS < ``ess_threshold``·N (0: never,
            1: at every step).
        resampling: ``"multinomial"``, ``"stratified"``, ``"systematic"`` or ``"residual"``.
        block_size: Tokens per SMC step (1: token-level SMC).
        rejuvenate: MH moves after every resampling (0: none).
        anneal: Ramp the exponent α_t = 1 + (α−1)·min(t/R, 1) over R tokens (None: no annealing).
        delimiter: End each step at a token whose text contains this string, instead of every
            ``block_size`` tokens.
        move: Rejuvenation kernel: ``"suffix"``, ``"block"`` (interior blocks of ``span`` tokens)
            or ``"mix"`` (alternating, suffix first).
        span: Tokens of an interior block for ``move="block"|"mix"``.
        twist: Use the proposal's twist (``proposals.Lookahead``) in the intermediate targets.

    Raises:
        ArgumentTypeError: ``target``/``proposal``/``twist`` has the wrong type.
        ArgumentError: an argument is out of range or the combination is not exact (interior-block
            moves with a rollout proposal, a twist from a proposal that provides none, annealing
            with a delimiter).
    """

    def __init__(
        self,
        target: Potential,
        proposal: Proposal,
        particles: int = 16,
        ess_threshold: float = 0.5,
        resampling: str = "systematic",
        block_size: int | None = 1,
        rejuvenate: int = 0,
        anneal: int | None = None,
        delimiter: str | None = None,
        move: str = "suffix",
        span: int = 16,
        twist: bool = False,
    ):
        check_target_proposal(target, proposal)
        if resampling not in SCHEMES:
            raise ArgumentError("resampling", f"unknown scheme {resampling!r}; use one of {sorted(SCHEMES)}")
        if not (isinstance(ess_threshold, (int, float)) and 0 <= ess_threshold <= 1):
            raise ArgumentError("ess_threshold", f"must lie in [0, 1], got {ess_threshold!r}")
        if delimiter is None:
            if block_size is None:
                raise ArgumentError("block_size", "give block_size or delimiter")
            check_int("block_size", block_size, 1)
        elif not isinstance(delimiter, str) or not delimiter:
            raise ArgumentError("delimiter", "must be a non-empty string")
        if anneal is not None:
            check_int("anneal", anneal, 1)
            if delimiter is not None:
                raise ArgumentError("anneal", "annealing needs token-synchronous blocks (block_size), not a delimiter")
        if move not in MOVES:
            raise ArgumentError("move", f"unknown move {move!r}; use one of {', '.join(MOVES)}")
        if move != "suffix" and delimiter is not None:
            raise ArgumentError(
                "move", "interior-block moves need token-synchronous blocks (block_size), not a delimiter"
            )
        self.move = move
        self.span = check_int("span", span, 1)
        if not isinstance(twist, bool):
            raise ArgumentTypeError("twist", f"expected a bool, got {type(twist).__name__}")
        if twist and not proposal.provides_twist:
            raise ArgumentError(
                "twist", f"{proposal!r} provides no twist; use a lookahead proposal (proposals.Lookahead)"
            )
        self.twist = twist
        if move != "suffix" and proposal.auxiliary:
            raise ArgumentError(
                "move",
                f"interior-block moves keep the suffix, whose rollouts {proposal!r} drew given the old prefix: "
                "not exact with a rollout proposal; use move='suffix'",
            )
        self.target = target
        self.proposal = proposal
        self.particles = check_int("particles", particles, 1)
        self.ess_threshold = float(ess_threshold)
        self.resampling = resampling
        self.block_size = block_size
        self.rejuvenate = check_int("rejuvenate", rejuvenate, 0)
        self.anneal = anneal
        self.delimiter = delimiter

    def kernel(self, s: int) -> str:
        """ "suffix" or "block": the kernel of rejuvenation move ``s`` (0-based) after a resampling.

        Args:
            s: The move's index among the rejuvenation moves after one resampling, from 0
                (``move="mix"`` alternates, starting with a suffix move).
        """
        if self.move == "mix":
            return "suffix" if s % 2 == 0 else "block"
        return self.move

    def _stop_tokens(self, engine: Backend) -> torch.Tensor | None:
        """Vocabulary mask of tokens whose text contains the delimiter (a block ends after one)."""
        if self.delimiter is None:
            return None
        if engine.tokenizer is None:
            raise ArgumentError("delimiter", "a delimiter needs an engine with a tokenizer")
        mask = torch.zeros(engine.vocab_size, dtype=torch.bool, device=engine.device)
        mask[engine.token_ids_containing(self.delimiter)] = True
        return mask

    def _prepare(
        self,
        engine: Backend,
        prompts: Any,
        max_new_tokens: int,
        seed: int,
        stop: StopSet | None,
        stop_tokens: torch.Tensor | None,
    ) -> Problem:
        """The run's :class:`Problem` (its own random stream, seeded with ``seed``); checks the arguments."""
        problem = make_problem(engine, prompts, self.target, self.proposal, self.particles, max_new_tokens, seed, stop)
        problem.stop_tokens = stop_tokens
        problem.twist = self.twist
        if self.anneal is not None and problem.alpha == 1.0:
            raise ArgumentError("anneal", "annealing needs a target of the form base ** alpha with alpha != 1")
        return problem

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        problem = self._prepare(engine, prompts, max_new_tokens, seed, stop, self._stop_tokens(engine))
        decoder, chains = start_chains(problem)
        with bar(max_new_tokens, "SMC", progress) as pbar:
            return self._loop(problem, decoder, chains, lambda h: pbar.update(max(0, h - pbar.n)))

    def _loop(
        self, problem: Problem, decoder: DecoderOps, chains: Chains, progress: Callable[[int], None] | None = None
    ) -> Result:
        """The SMC loop of one run, from the particles after the prompts to the collected result:
        ``SMC.run`` drives it on its own :class:`~smcdecode.samplers.core.Decoder`, ``SMC.stream``
        on each problem's rows of a shared batch. ``progress(horizon)`` after every step."""
        n, max_new_tokens = self.particles, problem.max_new_tokens
        anneal = Anneal(problem.alpha, self.anneal) if self.anneal is not None else None
        scheme = SCHEMES[self.resampling]
        trace = Trace()
        n_prompts, dev = len(problem.prompt_ids), problem.engine.device
        weights = Weights.zeros(n_prompts, n, dev)
        alpha_t = 1.0 if anneal is not None else problem.alpha  # the α of φ in the weights
        block = self.block_size or max_new_tokens
        step = 0
        while True:
            done = problem.complete(chains)
            if bool(done.all()):  # one sync per block
                break
            horizon = min(int(chains.length[~done].max()) + block, max_new_tokens)
            if self.delimiter is not None:
                horizon = max_new_tokens
            psi_before = chains.log_psi.clone()
            incr = torch.zeros_like(weights.flat)  # [P·N]
            alpha_t = extend(problem, decoder, chains, horizon, anneal=anneal, log_w=incr, alpha_w=alpha_t)
            problem.update_psi(chains, ~done, partial_ok=True)
            incr += torch.where(~done, problem.alpha * (chains.log_psi - psi_before), torch.zeros_like(incr))
            weights = weights.add(incr)
            ess = weights.ess  # [P]
            resample = ess < self.ess_threshold * n  # [P]
            any_resample = bool(resample.any())  # one sync per block: skip the KV copy when possible
            idx = torch.arange(n, device=dev).expand(n_prompts, n)
            if any_resample:
                w = weights.normalized  # [P, N]
                drawn = torch.cat([scheme(g, w[s], n) for s, g in problem.rng.groups(n_prompts)])  # [P, N]
                idx = torch.where(resample[:, None], drawn, idx)
                rows = (idx + n * torch.arange(n_prompts, device=dev)[:, None]).view(-1)  # [P·N]
                weights = weights.resampled(resample)
                decoder.select(rows)
                chains = chains.index_select(rows)
            trace.log(
                StepTrace(
                    step=step,
                    ess=ess,
                    resampled=resample,
                    log_z_increment=Weights(incr.view(n_prompts, n)).log_mean,
                    horizon=horizon,
                    unique=_unique_counts(idx),
                )
            )
            if self.rejuvenate and any_resample:
                h_mh, a_mh = int(chains.length.max()), alpha_t if anneal is not None else None
                for s in range(self.rejuvenate):
                    kernel = self.kernel(s)
                    # partial_ok: the moves target this step's twisted intermediate target
                    if kernel == "suffix":
                        chains, info = mh_move(
                            problem, decoder, chains, h_mh, alpha=a_mh, q_schedule=anneal, partial_ok=True
                        )
                    else:
                        chains, info = block_move(
                            problem, decoder, chains, h_mh, self.span, alpha=a_mh, q_schedule=anneal, partial_ok=True
                        )
                    trace.log(move_trace(step, s, kernel, info))
            decoder.compact()
            if progress is not None:
                progress(min(horizon, max_new_tokens))
            step += 1
        if anneal is not None and alpha_t != problem.alpha:
            # bring every particle to the final exponent (an exact importance correction)
            weights = weights.add((problem.alpha - alpha_t) * chains.sum_log_phi())
        log_z = weights.log_mean.tolist()
        return collect(problem, chains, weights.flat, trace, log_evidence=log_z)

    def streams(self, engine: Backend) -> bool:
        """Problems share one batch in :meth:`stream` unless the proposal has rollouts
        (``Lookahead``: each problem's rollout tokens stay its own) or the target or proposal
        needs the hidden state (EGLR's re-application binds to its own cache): those run one
        problem at a time.

        Args:
            engine: The backend the sampler would run on (it resolves the requirements).
        """
        return not self.proposal.auxiliary and not self._requirements(engine).hidden

    def _requirements(self, engine: Backend) -> Requirements:
        return self.proposal.requirements(engine) | self.target.requirements(engine)

    def stream(
        self,
        engine: Backend,
        problems: Iterable[tuple[Any, Any, int]],
        *,
        in_flight: int,
        max_new_tokens: int,
        stop: StopSpec | StopSet | None = None,
    ) -> Iterator[Finished]:
        """Continuous batching for SMC: ``in_flight`` problems share one batch of
        ``in_flight × particles`` rows, each running its own unchanged SMC loop (its own random
        stream seeded by its own seed, step counter, annealing, ESS test, resampling, moves and
        stops) on its rows (:mod:`~smcdecode.samplers.multiplex`); a problem's forwards are merged
        with the others', a finished problem is yielded at once (with its log Ẑ) and the next
        waiting problem takes its rows. A problem's samples, weights and log Ẑ are those of
        ``run(engine, [prompt], seed=seed)``, whichever problems share the batch (up to
        floating-point differences of batched forwards). Proposals with rollouts and targets or
        proposals needing the hidden state run one problem at a time (see :meth:`streams`).

        Args:
            engine: The backend that runs the model.
            problems: (key, prompt, seed) triples, consumed lazily.
            in_flight: Problems in the batch at once.
            max_new_tokens: Tokens generated per sample at most.
            stop: Stop patterns, as in ``run``.

        Yields:
            A ``Finished`` per problem (its samples, log Ẑ and token counts), in the order they finish.

        Raises:
            ArgumentTypeError: ``engine`` is not a smcdecode backend.
            ArgumentError: ``in_flight`` is below 1 or ``max_new_tokens`` is out of range.
        """
        if not isinstance(engine, Backend):
            raise ArgumentTypeError("engine", f"expected a smcdecode backend, got {type(engine).__name__}")
        check_int("in_flight", in_flight, 1)
        if not self.streams(engine):
            yield from super().stream(engine, problems, in_flight=in_flight, max_new_tokens=max_new_tokens, stop=stop)
            return
        check_run_args(max_new_tokens, 0)
        stops = stop if isinstance(stop, StopSet) or stop is None else stop_set(engine, stop)
        stop_tokens = self._stop_tokens(engine)

        def prepare(prompt: Any, seed: int) -> Problem:
            return self._prepare(engine, [prompt], max_new_tokens, seed, stops, stop_tokens)

        yield from multiplex(
            engine, problems, in_flight=in_flight, rows=self.particles, prepare=prepare, body=self._loop
        )

    def __repr__(self) -> str:
        how = f"delimiter={self.delimiter!r}" if self.delimiter is not None else f"block_size={self.block_size}"
        extra = f", anneal={self.anneal}" if self.anneal else ""
        extra += ", twist=True" if self.twist else ""
        if self.move != "suffix":
            extra += f", move={self.move!r}, span={self.span}"
        return (
            f"SMC({self.target!r}, {self.proposal!r}, particles={self.particles}, "
            f"ess_threshold={self.ess_threshold:g}, resampling={self.resampling!r}, {how}, "
            f"rejuvenate={self.rejuvenate}{extra})"
        )


def _unique_counts(idx: torch.Tensor) -> torch.Tensor:
    """Number of distinct ancestors per group, [P]."""
    s = idx.sort(dim=1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(1)
