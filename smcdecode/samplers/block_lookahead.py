"""``BlockLookahead(alpha, particles=N, block_size=B, candidates=L, rollouts=M, horizon=H)``: the
block variant of lookahead power sampling (Ji et al., arXiv 2601.21590), for π(x) ∝ p(x)^α.

At each step every unfinished particle x (x_<t so far) draws L candidate blocks b_1..b_L of up to
B tokens from p (temperature 1; a block ends early at EOS, a stop completion or
``max_new_tokens``) on forked copies of its cache (:meth:`~smcdecode.backends.Backend.fork`), then
M rollouts of up to H tokens from p after each block, and gives each block the estimated weight

    log ŵ_l = α·log p(b_l | x) − log p(b_l | x) + log Ẑ(x ⊕ b_l),
    log Ẑ(x ⊕ b) = log (1/M) Σ_m p(s^(m) | x ⊕ b)^(α−1)     (Ẑ = 1 for a finished sequence).

**Exact mode** (``keep=None``): the particle continues with block l drawn with probability
ŵ_l / Σ ŵ, and its log weight is incremented by

    log (1/L) Σ_l ŵ_l − log Ẑ(x)            (Ẑ(x): the estimate stored with the particle)

Nested importance sampling: on the space extended by the candidates and their rollouts, the
selected pair (block, rollouts) with the mean weight is properly weighted for the twisted
target p(x ⊕ b)^α · Ẑ(x ⊕ b) (E[(1/L) Σ ŵ_l · f(b_sel)] = Σ_b p(b)^α Ẑ(b) f(b) for any f), and
dividing by the stored Ẑ(x) makes the intermediate targets p^α · Ẑ twisted SMC targets whose
final twist is 1 (see :mod:`~smcdecode.samplers.smc`). So the weighted particles target p^α
exactly and log Ẑ = log-mean of the final weights is an unbiased estimate of Σ_x p(x)^α,
whatever L, M, H and B. Particles are resampled when ESS < κ·N, as in :class:`SMC`.

**Approximate mode** (``keep=K``, the paper's sampler): keep the K candidate blocks of highest
likelihood p(b | x), run rollouts after those only, choose among them with probability ∝ ŵ, and
return unweighted samples.
Biased (top-K selection, estimated ratios, horizon), so labelled approximate; ``particles`` are
then independent samples.

Cost: per step, the L·B candidate tokens and L·M·H rollout tokens per particle run on forks and
count as ``rollout_tokens``; the chosen block is fed once more to the particle's own cache in
one teacher-forced forward (``decode_tokens``). Sequential forwards per block: B (candidates)
+ H (rollouts) + 1. The target must be ``Power(α)`` (the block weights use p itself).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentError, ArgumentTypeError, check_finite_positive, check_int
from smcdecode.proposals.base import sample
from smcdecode.proposals.lookahead import rollout_log_p
from smcdecode.proposals.tempered import Tempered
from smcdecode.readouts import Readouts
from smcdecode.samplers.base import Sampler, bar
from smcdecode.samplers.core import Drawn, collect, logmeanexp, make_problem, start_chains
from smcdecode.samplers.resampling import SCHEMES
from smcdecode.samplers.result import Result, StepTrace, Trace
from smcdecode.samplers.weights import Weights
from smcdecode.stopping import StopSet
from smcdecode.targets.lm import Power


class BlockLookahead(Sampler):
    """Block lookahead power sampling from p^α: each particle draws ``candidates`` blocks of
    ``block_size`` tokens, weighs each with ``rollouts`` rollouts of ``horizon`` tokens, and keeps
    one (module ``smcdecode.samplers.block_lookahead`` gives the weights).

    Args:
        alpha: The power α of the target p^α.
        particles: Particles N per prompt.
        block_size: Tokens per block B.
        candidates: Candidate blocks L per particle and step.
        rollouts: Rollouts M after each candidate block.
        horizon: Tokens H per rollout.
        keep: None for the exact sampler (nested importance sampling, unbiased evidence); K keeps
            only the K most likely blocks (the paper's approximate sampler, unweighted samples).
        ess_threshold: Resample when ESS < ``ess_threshold``·N.
        resampling: The resampling scheme (as in ``SMC``).

    Raises:
        ArgumentError: an argument is out of range, or ``keep > candidates``.
        ArgumentTypeError: ``ess_threshold`` is not a number.
    """

    def __init__(
        self,
        alpha: float,
        particles: int = 8,
        block_size: int = 16,
        candidates: int = 4,
        rollouts: int = 4,
        horizon: int = 16,
        keep: int | None = None,
        ess_threshold: float = 0.5,
        resampling: str = "systematic",
    ):
        self.alpha = check_finite_positive("alpha", alpha)
        self.particles = check_int("particles", particles, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.candidates = check_int("candidates", candidates, 1)
        self.rollouts = check_int("rollouts", rollouts, 1)
        self.horizon = check_int("horizon", horizon, 1)
        if keep is not None:
            check_int("keep", keep, 1)
            if keep > self.candidates:
                raise ArgumentError("keep", f"must be <= candidates ({self.candidates}), got {keep}")
        self.keep = keep
        if resampling not in SCHEMES:
            raise ArgumentError("resampling", f"unknown scheme {resampling!r}; use one of {sorted(SCHEMES)}")
        if not (isinstance(ess_threshold, (int, float)) and not isinstance(ess_threshold, bool)):
            raise ArgumentTypeError("ess_threshold", f"expected a number, got {type(ess_threshold).__name__}")
        if not 0 <= ess_threshold <= 1:
            raise ArgumentError("ess_threshold", f"must lie in [0, 1], got {ess_threshold!r}")
        self.ess_threshold = float(ess_threshold)
        self.resampling = resampling
        self.target = Power(self.alpha)

    @property
    def exact(self) -> bool:
        """True in exact mode (``keep=None``)."""
        return self.keep is None

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        n, big_l, m, h, blk = self.particles, self.candidates, self.rollouts, self.horizon, self.block_size
        problem = make_problem(engine, prompts, self.target, Tempered(1.0), n, max_new_tokens, seed, stop)
        decoder, chains = start_chains(problem)
        main = decoder.streams[0]
        n_prompts, dev, t_max = len(problem.prompt_ids), engine.device, max_new_tokens
        weights = Weights.zeros(n_prompts, n, dev)
        scheme = SCHEMES[self.resampling]
        trace, step = Trace(), 0
        with bar(max_new_tokens, "BlockLookahead", progress) as pbar:
            while True:
                done = problem.complete(chains)
                if bool(done.all()):  # one sync per block
                    break
                b_all = chains.length.shape[0]
                u_blk = problem.rng.rand(b_all, blk, big_l, dtype=torch.float64)  # every row: stream-stable
                u_roll = problem.rng.rand(b_all, big_l * m, h, dtype=torch.float64)
                u_sel = problem.rng.rand(b_all, 1, dtype=torch.float64)
                rows = torch.nonzero(~done).view(-1)  # [A]
                a = int(rows.shape[0])
                src = rows.repeat_interleave(big_l)  # [A·L] main-batch row of each candidate
                r = a * big_l
                # 1. L candidate blocks per particle, on forks, from p
                fork = engine.fork(main.batch, src, reserve=blk)
                lp = chains.view.log_p[src]  # [R, V]
                toks = torch.zeros(r, blk, dtype=torch.long, device=dev)
                tok_lp = torch.zeros(r, blk, device=dev)
                n_tok = torch.zeros(r, dtype=torch.long, device=dev)
                length = chains.length[src]
                state = chains.last_stop_state()[src]
                ended = torch.zeros(r, dtype=torch.bool, device=dev)
                alive = torch.ones(r, dtype=torch.bool, device=dev)
                ub = u_blk[rows].permute(0, 2, 1).reshape(r, blk)  # [R, B]: row a·L + l
                for j in range(blk):
                    tok, lps = sample(lp, None, None, ub[:, j : j + 1])
                    toks[:, j] = torch.where(alive, tok, toks[:, j])
                    tok_lp[:, j] = torch.where(alive, lps, tok_lp[:, j])
                    n_tok = n_tok + alive.long()
                    end = engine.is_eos(tok)
                    if stop is not None:
                        state_new, hit = stop.step(state, tok)
                        state = torch.where(alive, state_new, state)
                        end = end | hit
                    ended = ended | (alive & end)
                    length = length + alive.long()
                    feed = alive & ~end & (length < t_max)  # the block's last token is fed too (rollouts)
                    if bool(feed.any()):  # host sync per candidate token
                        lp = engine.decode(fork, tok, feed).log_p.where(feed[:, None], lp)
                    alive = feed & (j + 1 < blk)
                    if not bool(alive.any()):
                        break
                # 2. M rollouts after each candidate block
                budget = torch.where(ended, 0, (t_max - length).clamp(min=0, max=h))  # [R]
                ur = u_roll[rows].reshape(r, m, h)  # [R, M, H]: candidate row a·L + l
                block_lp = tok_lp.sum(1).view(a, big_l)  # [A, L] log p(b_l | x)
                if self.keep is None:
                    cand = torch.arange(r, device=dev)  # rollouts after every candidate
                else:  # the paper: only the K most likely blocks get rollouts (and can be chosen)
                    kept = block_lp.topk(self.keep, dim=-1).indices  # [A, K]
                    cand = (torch.arange(a, device=dev)[:, None] * big_l + kept).view(-1)
                acc = torch.zeros(cand.shape[0] * m, device=dev)
                if bool((budget[cand] > 0).any()):
                    src_batch = fork if self.keep is None else engine.fork(fork, cand, reserve=h)
                    first = lp[cand]
                    acc = rollout_log_p(
                        engine, src_batch, first, budget[cand], state[cand], stop, ur[cand].view(-1, h), m
                    )
                    if src_batch is not fork:
                        engine.release(src_batch)
                engine.release(fork)
                z = torch.full((r,), -math.inf, device=dev)  # candidates without rollouts are never chosen
                z[cand] = logmeanexp(((self.alpha - 1.0) * acc).view(-1, m), dim=-1)
                log_zhat = z.view(a, big_l)  # [A, L]
                log_w = (self.alpha - 1.0) * block_lp + log_zhat  # [A, L] log ŵ_l (r = p)
                # 3. choose a block per particle
                pick, _ = sample(torch.log_softmax(log_w, dim=-1), None, None, u_sel[rows])  # [A]
                sel = torch.arange(a, device=dev) * big_l + pick  # [A] candidate row
                incr = torch.zeros(b_all, device=dev)
                if self.exact:
                    incr[rows] = logmeanexp(log_w, dim=-1) - chains.current_twist()[rows]
                    weights = weights.add(incr)
                # 4. the chosen block becomes the particle's: one teacher-forced forward
                q = int(n_tok.max())
                nt = torch.zeros(b_all, dtype=torch.long, device=dev)
                nt[rows] = n_tok[sel]
                padded = torch.zeros(b_all, q, dtype=torch.long, device=dev)  # right-aligned (left padding)
                col = torch.arange(q, device=dev)
                shift = (col[None, :] - (q - nt[rows])[:, None]).clamp(min=0)  # [A, Q] block index
                padded[rows] = toks[sel].gather(1, shift.clamp(max=blk - 1))
                scored = engine.score(main.batch, padded, nt)  # [B, Q, V]
                twist = torch.zeros(b_all, device=dev)
                twist[rows] = torch.where(ended[sel] | (length[sel] >= t_max), 0.0, log_zhat[torch.arange(a), pick])
                for jj in range(blk):  # append token jj of each chosen block
                    act = torch.zeros(b_all, dtype=torch.bool, device=dev)
                    act[rows] = jj < n_tok[sel]
                    if not bool(act.any()):
                        break
                    tk = torch.zeros(b_all, dtype=torch.long, device=dev)
                    tk[rows] = toks[sel, jj]
                    lpj = torch.zeros(b_all, device=dev)
                    lpj[rows] = tok_lp[sel, jj]
                    last = torch.zeros(b_all, dtype=torch.bool, device=dev)
                    last[rows] = jj + 1 == n_tok[sel]
                    lt = torch.where(last, twist, chains.current_twist())
                    drawn = Drawn(tk, lpj, lpj, lpj, lt)  # log q: the block's own p (nested IS: no token q)
                    ends, st = problem.ends(chains, tk)
                    chains.append(act, drawn, ends, st)
                view = Readouts(scored.log_p[:, -1])
                live = ~problem.complete(chains) & torch.zeros_like(done).index_fill(0, rows, True)
                chains.view = view.where(live, chains.view)
                ess = weights.ess
                resample = ess < self.ess_threshold * n if self.exact else torch.zeros_like(ess, dtype=torch.bool)
                if self.exact and bool(resample.any()):
                    w = weights.normalized
                    drawn_idx = torch.cat([scheme(g, w[s], n) for s, g in problem.rng.groups(n_prompts)])
                    idx = torch.where(resample[:, None], drawn_idx, torch.arange(n, device=dev).expand(n_prompts, n))
                    flat = (idx + n * torch.arange(n_prompts, device=dev)[:, None]).view(-1)
                    weights = weights.resampled(resample)
                    decoder.select(flat)
                    chains = chains.index_select(flat)
                trace.log(StepTrace(step, ess, resample, Weights(incr.view(n_prompts, n)).log_mean))
                decoder.compact()
                pbar.update(max(0, min(int(chains.length.max()), t_max) - pbar.n))
                step += 1
        log_z = weights.log_mean.tolist() if self.exact else None
        return collect(problem, chains, weights.flat if self.exact else None, trace, log_evidence=log_z)

    def __repr__(self) -> str:
        mode = f", keep={self.keep} (approximate)" if self.keep is not None else ""
        return (
            f"BlockLookahead({self.alpha:g}, particles={self.particles}, block_size={self.block_size}, "
            f"candidates={self.candidates}, rollouts={self.rollouts}, horizon={self.horizon}{mode})"
        )
