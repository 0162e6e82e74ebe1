"""``Lookahead(alpha, candidates=K, rollouts=M, horizon=H, epsilon=ε)``: rollout-estimated future
mass as a proposal for the power target π(x) ∝ p(x)^α ("Scalable Power Sampling", Ji et al.,
arXiv 2601.21590), and its estimate as an SMC twist.

The exact token conditional of π is

    π(x_t | x_<t) ∝ p(x_t | x_<t)^α · Z(x_≤t),    Z(x_≤t) = Σ_s p(s | x_≤t)^α = E_{s~p}[p(s | x_≤t)^(α−1)]

over the completions s of x_≤t on the stopped sequence space (EOS, a stop string, or
``max_new_tokens``; a finished prefix has Z = 1). At a step, for the K most probable next tokens v
(by p), the row's cache is forked (:meth:`~smcdecode.backends.Backend.fork`, no re-prefill), v is
fed once, the fork is copied M times and M rollouts s^(1..M) of up to H tokens are drawn **from p
itself (temperature 1)**, each ending early at EOS, a stop completion or ``max_new_tokens``:

    log Ẑ(v) = log (1/M) Σ_m p(s^(m) | x_<t ⊕ v)^(α−1)          (log-mean-exp, horizon-truncated)
    c(v)     = p(v)^α · Ẑ(v) / Σ_{v' ∈ top-K} p(v')^α · Ẑ(v')   (v in the top K)
    q(v)     = (1 − ε) · c(v) + ε · p(v)^α / Σ_{v'} p(v')^α     (every v)

``jackknife=True`` replaces c by the leave-one-out jackknife M·c − (M−1)·mean_j c_{−j} (c_{−j}
computed without rollout j; bias O(1/M) → O(1/M²)), clipped at 0 and renormalised. The defensive
component ε · p^α keeps q > 0 wherever π is (tokens outside the top K included); ε = 0 with
K < V is the paper's sampler, whose q misses part of π's support. The sampled token's log q is
that of this exact mixture *given the rollouts*, so SMC and MH correct it: on the extended space
of (x, rollouts) the target π(x) · Π_t r(u_t | x_<t) has π as its x-marginal, and q(x_t | x_<t, u_t)
is a proposal on it (an MH move draws fresh rollouts: no coupling with the current suffix).

**Used alone** (``Ancestral(Lookahead(...))``) it is the paper's approximate sampler: biased by
the estimated ratios (O(1/M)), the truncated horizon and the top-K restriction, by an amount
nobody can state in general. **Inside SMC** (``SMC(Power(α), Lookahead(α, ...))``) it is exact
whatever K, M, H: the weight corrects q, and with ``SMC(..., twist=True)`` Ẑ also serves as the
twist of the intermediate targets (see :mod:`~smcdecode.samplers.smc`).

Twist. ``propose`` returns log ψ(x_<t ⊕ v) for every v: log Ẑ(v) for the candidates, the smallest
candidate's log Ẑ for the other tokens (a defensive draw), and the current prefix's twist on rows
without rollouts (a gated step carries the twist over). Any positive function of the state and
of its rollouts is a valid twist; only the final target (twist 1) matters.

Cost controls: ``every=k`` runs rollouts only at steps t ≡ 0 (mod k) (t = tokens generated so
far), ``entropy_threshold=h`` only where the next-token entropy H(p) (nats) exceeds h (the gate
of :class:`~smcdecode.proposals.EGLR`); elsewhere q = p^α / Σ p^α, exactly the defensive
component. A step with rollouts costs H batched forwards over the B·K·M rollout rows of every
active row of every problem (the first one over B·K rows) and copies of their caches; the
backend counts those tokens as ``rollout_tokens``, apart from the decode work.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smcdecode.distributions import entropy
from smcdecode.errors import ArgumentError, ArgumentTypeError, check_finite, check_finite_positive, check_int
from smcdecode.proposals.base import Context, Proposal, TargetFactor, sample
from smcdecode.readouts import Readouts

if TYPE_CHECKING:
    from smcdecode.backends import Backend, Batch
    from smcdecode.stopping import StopSet


class Lookahead(Proposal):
    """Rollout-estimated future mass: samples from the estimated token conditional of p^α
    (module ``smcdecode.proposals.lookahead`` gives the estimator and the mixture).

    Alone (``Ancestral``) it is approximate; inside ``SMC`` (with ``twist=True``) or ``SuffixMH`` the
    weights or the MH ratio correct it, whatever K, M and H are.

    Args:
        alpha: The power α of the target p^α.
        candidates: Next tokens K whose future mass is estimated.
        rollouts: Rollouts M per candidate.
        horizon: Tokens H per rollout.
        epsilon: Weight ε of the p^α/Σp^α component of the mixture (keeps q > 0 wherever π is).
        jackknife: Apply the leave-one-out correction to the candidate probabilities (needs M ≥ 2).
        every: Run rollouts every k tokens (other steps draw from p^α/Σp^α).
        entropy_threshold: Run rollouts only where H(p) exceeds this, in nats (None: always).

    Raises:
        ArgumentTypeError: ``jackknife`` is not a bool.
        ArgumentError: a value is out of range.
    """

    auxiliary = True
    provides_twist = True

    def __init__(
        self,
        alpha: float,
        candidates: int = 4,
        rollouts: int = 4,
        horizon: int = 16,
        epsilon: float = 0.05,
        jackknife: bool = False,
        every: int = 1,
        entropy_threshold: float | None = None,
    ):
        self.alpha = check_finite_positive("alpha", alpha)
        self.candidates = check_int("candidates", candidates, 1)
        self.rollouts = check_int("rollouts", rollouts, 1)
        self.horizon = check_int("horizon", horizon, 1)
        eps = check_finite("epsilon", epsilon)
        if not 0.0 <= eps <= 1.0:
            raise ArgumentError("epsilon", f"must lie in [0, 1], got {epsilon}")
        self.epsilon = eps
        if not isinstance(jackknife, bool):
            raise ArgumentTypeError("jackknife", f"expected a bool, got {type(jackknife).__name__}")
        if jackknife and self.rollouts < 2:
            raise ArgumentError("jackknife", "the leave-one-out jackknife needs rollouts >= 2")
        self.jackknife = jackknife
        self.every = check_int("every", every, 1)
        self.entropy_threshold = (
            None if entropy_threshold is None else check_finite("entropy_threshold", entropy_threshold)
        )

    def log_q(self, view: Readouts, target_factor: TargetFactor) -> Tensor:
        """Not available: q depends on rollouts drawn by a sampler (``propose``).

        Args:
            view: The step's readouts (unused).
            target_factor: The target's token factor (unused).

        Raises:
            ArgumentTypeError: always.
        """
        raise ArgumentTypeError(
            "proposal", "Lookahead's q depends on rollouts drawn by a sampler; use it inside Ancestral, SMC or SuffixMH"
        )

    def gate(self, log_p: Tensor, ctx: Context) -> Tensor:
        """[B] bool: rows that run rollouts at this step.

        Args:
            log_p: The next-token log-probs [B, V] (their entropy is gated).
            ctx: The live rows: ``active`` [B] and ``length`` [B] (tokens generated so far).
        """
        roll = ctx.active.clone()
        if self.every > 1:
            roll &= ctx.length % self.every == 0
        if self.entropy_threshold is not None:
            roll &= entropy(log_p) > self.entropy_threshold
        return roll

    def propose(self, view: Readouts, target_factor: TargetFactor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        """Run the rollouts of the gated rows and return (log q [B, V], log Ẑ [B, V]).

        Args:
            view: The step's readouts (``view.log_p`` [B, V]).
            target_factor: The target's token factor (unused: the estimate targets p^α).
            ctx: The live rows, the backend and the random stream (required).

        Returns:
            ``(log_q, log_twist)``: the mixture's log q [B, V] and the twist table [B, V] (see the
            module docstring).

        Raises:
            ArgumentTypeError: ``ctx`` is None (a sampler must provide the rows and the random stream).
        """
        if ctx is None:
            self.log_q(view, target_factor)  # raises: no closed form without a sampler's rows
        assert ctx is not None
        log_p = view.log_p  # [B, V]
        b, v_size = log_p.shape
        k, m, h = min(self.candidates, v_size), self.rollouts, self.horizon
        tempered = torch.log_softmax(self.alpha * log_p, dim=-1)  # [B, V]: the defensive component
        twist = ctx.log_twist[:, None].expand(b, v_size).clone()  # [B, V]: carried over by default
        u = ctx.rng.rand(b, h, k * m, dtype=torch.float64)  # [B, H, K·M]: drawn for every row (stream-stable)
        rows = torch.nonzero(self.gate(log_p, ctx)).view(-1)  # [A]; host sync, once per step
        if rows.numel() == 0:
            return tempered, twist
        lp = log_p[rows]  # [A, V]
        cand = lp.topk(k, dim=-1).indices  # [A, K]
        log_z = self.estimate(ctx, rows, cand, u[rows])  # [A, K, M] per-rollout log weights
        log_zhat = torch.logsumexp(log_z, dim=-1) - math.log(m)  # [A, K]
        log_c = torch.log_softmax(self.alpha * lp.gather(1, cand) + log_zhat, dim=-1)  # [A, K]
        if self.jackknife:
            log_c = self._jackknife(lp.gather(1, cand), log_z, log_c)
        scattered = torch.full_like(lp, -math.inf).scatter(1, cand, log_c)  # [A, V]
        keep = math.log1p(-self.epsilon) if self.epsilon < 1 else -math.inf
        defend = math.log(self.epsilon) if self.epsilon > 0 else -math.inf
        log_q = tempered.clone()
        log_q[rows] = torch.logaddexp(keep + scattered, defend + tempered[rows])
        floor = log_zhat.min(dim=-1, keepdim=True).values.expand_as(lp)  # [A, V]
        twist[rows] = floor.scatter(1, cand, log_zhat)
        return log_q, twist

    def _jackknife(self, log_p_cand: Tensor, log_z: Tensor, log_c: Tensor) -> Tensor:
        """Leave-one-out jackknife of c (all [A, K] / [A, K, M]): M·c − (M−1)·mean_j c_{−j}."""
        m = log_z.shape[-1]
        eye = torch.eye(m, dtype=torch.bool, device=log_z.device)
        loo = log_z[..., None, :].masked_fill(eye, -math.inf)  # [A, K, M(j), M]
        log_zj = torch.logsumexp(loo, dim=-1) - math.log(m - 1)  # [A, K, M]: Ẑ without rollout j
        c_j = torch.softmax(self.alpha * log_p_cand[..., None] + log_zj, dim=1)  # [A, K, M], over K
        c = log_c.exp()
        jk = (m * c - (m - 1) * c_j.mean(-1)).clamp_min(0.0)  # [A, K]
        total = jk.sum(-1, keepdim=True)
        jk = torch.where(total > 0, jk / total.clamp_min(1e-30), c)
        return jk.log()

    @torch.no_grad()
    def estimate(self, ctx: Context, rows: Tensor, cand: Tensor, u: Tensor) -> Tensor:
        """Per-rollout log weights (α − 1)·log p(s^(m) | x_<t ⊕ v), [A, K, M], for the candidates
        ``cand`` [A, K] of batch rows ``rows`` [A]; ``u`` [A, H, K·M] are the rollouts' uniforms.
        A candidate that ends the sequence (EOS, a stop, the last position) has no completion
        but the empty one: weight 0 (Ẑ = 1).

        Args:
            ctx: The live rows, the backend and the batch to fork.
            rows: Long [A], the batch rows that run rollouts.
            cand: Long [A, K], their candidate next tokens.
            u: Float64 [A, H, K·M], the rollouts' uniforms.

        Returns:
            Float [A, K, M] log weights.
        """
        eng: Backend = ctx.engine
        a, k = cand.shape
        m, h = self.rollouts, self.horizon
        src = rows.repeat_interleave(k)  # [A·K] main-batch row of each candidate
        v = cand.reshape(-1)  # [A·K]
        budget = (ctx.max_new_tokens - (ctx.length[src] + 1)).clamp(min=0, max=h)  # rollout tokens allowed
        ends = eng.is_eos(v)
        state = ctx.stop_state[src]
        if ctx.stop is not None:
            state, hit = ctx.stop.step(state, v)
            ends = ends | hit
        budget = torch.where(ends, torch.zeros_like(budget), budget)  # [A·K]
        live = budget > 0
        if not bool(live.any()):  # host sync
            return torch.zeros(a, k, m, device=eng.device)
        fork: Batch = eng.fork(ctx.batch, src, reserve=1)
        first = eng.decode(fork, v, live).log_p  # [A·K, V]: the distribution after x_<t ⊕ v
        acc = rollout_log_p(eng, fork, first, budget, state, ctx.stop, u.permute(0, 2, 1).reshape(a * k * m, h), m)
        eng.release(fork)
        return ((self.alpha - 1.0) * acc).view(a, k, m)

    def __repr__(self) -> str:
        extra = ""
        if self.jackknife:
            extra += ", jackknife=True"
        if self.every != 1:
            extra += f", every={self.every}"
        if self.entropy_threshold is not None:
            extra += f", entropy_threshold={self.entropy_threshold:g}"
        return (
            f"Lookahead({self.alpha:g}, candidates={self.candidates}, rollouts={self.rollouts}, "
            f"horizon={self.horizon}, epsilon={self.epsilon:g}{extra})"
        )


@torch.no_grad()
def rollout_log_p(
    eng: Backend, batch: Batch, first: Tensor, budget: Tensor, state: Tensor, stop: StopSet | None, u: Tensor, m: int
) -> Tensor:
    """Σ log p of M rollouts from each row of ``batch`` (R rows, each holding a prefix already fed;
    ``first`` [R, V] the distribution after it), drawn from p at temperature 1 on copies of the
    rows (``Backend.fork``): row r's rollouts are rows r·M .. r·M + M − 1 of the result [R·M].
    A rollout stops after ``budget[r]`` tokens (0: none), at EOS or at a stop completion
    (``state`` [R]: the stop automaton's state after the prefix). ``u`` [R·M, H]: the uniforms."""
    r, h = first.shape[0], u.shape[1]
    rep = torch.arange(r, device=eng.device).repeat_interleave(m)  # [R·M]
    roll = eng.fork(batch, rep, reserve=max(h - 1, 1))
    lp = first[rep]  # [R·M, V]
    budget, state = budget[rep], state[rep]
    alive = budget > 0
    acc = torch.zeros(r * m, device=eng.device)
    for j in range(h):
        tok, lps = sample(lp, None, None, u[:, j : j + 1])  # [R·M], [R·M]
        acc = acc + torch.where(alive, lps, torch.zeros_like(lps))
        end = eng.is_eos(tok)
        if stop is not None:
            state, hit = stop.step(state, tok)
            end = end | hit
        alive = alive & ~end & (budget > j + 1)
        if j + 1 == h or not bool(alive.any()):  # host sync per rollout token
            break
        lp = eng.decode(roll, tok, alive).log_p.where(alive[:, None], lp)
    eng.release(roll)
    return acc
