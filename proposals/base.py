"""Proposal kernels: a per-step distribution q_t(· | c, x_<t) over the vocabulary.

``log_q(view, target_factor)`` returns the *normalised* log q [B, V] that the sampler draws from;
the sampler stores log q[x_t] of the drawn token from this same tensor, so the stored value is
exact whatever truncation was applied (never recomputed from softmax(z/T)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from smcdecode.targets.base import Requirements, StepView
from torch import Tensor

if TYPE_CHECKING:
    from smcdecode.backends import Backend

TargetFactor = Callable[[StepView], "Tensor | None"]


class Proposal:
    def requirements(self, engine: Backend) -> Requirements:
        return Requirements()

    def log_q(self, view: StepView, target_factor: TargetFactor) -> Tensor:
        """Normalised log q_t(v) for every v, [B, V] (−inf where q is 0)."""
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
    ``generator``."""
    prob = log_q.double().exp()  # [B, V]; exp in float64: float32 underflows to slow denormals
    if exclude is not None:
        drop = torch.zeros_like(prob, dtype=torch.bool).scatter_(1, exclude.clamp_min(0)[:, None], True)
        prob = prob.masked_fill(drop & (exclude[:, None] >= 0), 0.0)
    cdf = prob.cumsum(-1)  # [B, V]
    if u is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)  # [B, 1]
    return tokens[:, 0], log_q.gather(1, tokens)[:, 0]
