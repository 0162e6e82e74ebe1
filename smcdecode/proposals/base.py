"""Proposal kernels: a per-step distribution q_t(· | c, x_<t) over the vocabulary.

``log_q(view, target_factor)`` returns the *normalised* log q [B, V] that the sampler draws from;
the sampler stores log q[x_t] of the drawn token from this same tensor, so the stored value is
exact whatever truncation was applied (never recomputed from softmax(z/T)).

Samplers call :meth:`Proposal.propose`, which by default is ``log_q`` and no twist. A proposal
with *auxiliary randomness* (``auxiliary = True``: lookahead rollouts, drawn afresh at every
draw) gets a :class:`Context` (the live rows, the backend, the random stream) and may return a
twist table besides log q: q is then q(x_t | x_<t, u_t) given the auxiliary draw u_t, which is
exact for SMC weights and for MH on the extended space (x, u) — as long as a move draws u afresh
(no coupling with the current suffix: :func:`~smcdecode.samplers.kernels.begin` turns it off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smcdecode.readouts import Readouts, Requirements

if TYPE_CHECKING:
    from smcdecode.backends import Backend, Batch
    from smcdecode.stopping import StopSet

TargetFactor = Callable[[Readouts], "Tensor | None"]


@dataclass
class Context:
    """What a proposal with auxiliary randomness sees beyond the readouts, bound by the sampler
    at each draw. Shapes [B] (one per row of the view)."""

    engine: Backend
    batch: Batch  # the main stream: row b's cache holds prompt + x_<t (fork it, never modify it)
    length: Tensor  # long: tokens generated so far (the draw is token length + 1)
    active: Tensor  # bool: rows whose draw is used (the others may get any valid q)
    max_new_tokens: int
    stop: StopSet | None
    stop_state: Tensor  # long: stop-automaton state after x_<t (0 without stops)
    rng: Any  # the run's random stream (``rand(B, ...)``, see ``smcdecode.samplers.rng``)
    log_twist: Tensor  # float: the current twist log ψ(x_<t) (0 when the sampler keeps none)


class Proposal:
    """Base class of proposals: a per-step distribution q_t(· | c, x_<t) over the vocabulary.

    Subclasses implement ``log_q`` (or ``propose``, for proposals with auxiliary randomness), and
    ``requirements`` when they read more than the final layer.
    """

    #: q depends on random draws made with it (rollouts): needs a :class:`Context`, and MH moves
    #: must draw those afresh (no coupling with the current suffix)
    auxiliary: bool = False
    #: :meth:`propose` returns a twist table usable as SMC's intermediate-target twist
    provides_twist: bool = False

    def requirements(self, engine: Backend) -> Requirements:
        """The readout keys this proposal reads (as ``Potential.requirements``).

        Args:
            engine: The backend the proposal will run on.
        """
        return Requirements()

    def propose(
        self, view: Readouts, target_factor: TargetFactor, ctx: Context | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Normalised log q_t(v) for every v and the optional twist.

        Args:
            view: The step's readouts (``view.log_p`` [B, V], ...).
            target_factor: The target's token factor, a function of the readouts (``LocallyOptimal``
                reads it).
            ctx: The live rows, the backend and the random stream, for proposals with auxiliary
                randomness (rollouts).

        Returns:
            (log q [B, V], log twist [B, V] or None): the twist of x_≤t = x_<t ⊕ v for every v, a
            positive function of the state and of this draw's auxiliary variables.
        """
        return self.log_q(view, target_factor), None

    def log_q(self, view: Readouts, target_factor: TargetFactor) -> Tensor:
        """Normalised log q_t(v) for every v.

        Args:
            view: The step's readouts.
            target_factor: The target's token factor, a function of the readouts.

        Returns:
            log q, [B, V] (−inf where q is 0).
        """
        raise NotImplementedError  # abstract


def sample(
    log_q: Tensor, generator: torch.Generator | None, exclude: Tensor | None = None, u: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row from exp(log_q) [B, V]; return (tokens [B], log q of them [B]).

    With ``exclude`` ([B] long, −1 for none) row b draws from q conditioned on x ≠ exclude[b]
    (q with that token's mass removed, renormalised); the returned log q is still that of the
    unconditioned q. Inverse-CDF sampling with a float64 cumulative sum: exact (a token of
    probability 0 has an empty interval and is never drawn) and ~4x cheaper than
    ``torch.multinomial``, whose exponential draws over the whole vocabulary dominate a small
    model's decode step. ``u``: the uniforms to use ([B, 1] float64) instead of drawing them from
    ``generator``.

    Args:
        log_q: Normalised log q [B, V].
        generator: The random generator of the uniforms (None: torch's global one; unused with ``u``).
        exclude: Long [B], a token each row must not draw (−1: none); None: no exclusion.
        u: Float64 [B, 1] uniforms in [0, 1) to use instead of drawing them.

    Returns:
        ``(tokens, log_q)``: long [B] and the unconditioned log q of each drawn token, [B].
    """
    prob = log_q.double().exp()  # [B, V]; exp in float64: float32 underflows to slow denormals
    if exclude is not None:
        drop = torch.zeros_like(prob, dtype=torch.bool).scatter_(1, exclude.clamp_min(0)[:, None], True)
        prob = prob.masked_fill(drop & (exclude[:, None] >= 0), 0.0)
    cdf = prob.cumsum(-1)  # [B, V]
    if u is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)  # [B, 1]
    return tokens[:, 0], log_q.gather(1, tokens)[:, 0]
