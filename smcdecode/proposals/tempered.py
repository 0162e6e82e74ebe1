"""``Tempered(T, top_k, top_p)``: q ∝ softmax(log p_N / T) restricted to the top-k tokens and to
the smallest nucleus of mass ≥ top_p (the token that crosses top_p included), renormalised.

``LocallyOptimal()``: q_t(v) ∝ φ_t(v), the target's own token factor. For ``Power(α)`` this is
temperature 1/α, and the SMC incremental weight log φ_t(x_t) − log q_t(x_t) becomes
logsumexp_v log φ_t(v), independent of the token drawn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smcdecode.errors import ArgumentError, ArgumentTypeError, check_finite, check_finite_positive
from smcdecode.proposals.base import Proposal, TargetFactor
from smcdecode.readouts import Readouts

NORMAL_MIN_LOG = math.log(torch.finfo(torch.float32).tiny)


def truncate(log_q: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Apply top-k then top-p to normalised log q [B, V] and renormalise.

    Args:
        log_q: Normalised log q [B, V].
        top_k: Keep the k most probable tokens (ties with the k-th kept too); None: all.
        top_p: Keep the smallest set of most probable tokens of mass ≥ top_p; None or ≥ 1: all.

    Returns:
        The truncated, renormalised log q [B, V] (−inf outside).
    """
    if top_k is not None and top_k < log_q.shape[-1]:
        kth = log_q.topk(top_k, dim=-1).values[:, -1:]
        log_q = log_q.masked_fill(log_q < kth, -math.inf)
        log_q = torch.log_softmax(log_q, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_lq, order = log_q.sort(dim=-1, descending=True)
        # below log(float32 tiny) exp would land in denormals, which are ~20x slower: count as 0
        prob = sorted_lq.masked_fill(sorted_lq < NORMAL_MIN_LOG, -math.inf).exp()
        mass_before = prob.cumsum(-1) - prob  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        log_q = torch.log_softmax(log_q.masked_fill(drop, -math.inf), dim=-1)
    return log_q


class Tempered(Proposal):
    """q ∝ softmax(log p_N / T), restricted to the top-k tokens and to the smallest nucleus of mass
    ≥ top_p, renormalised.

    Args:
        temperature: T > 0 (a tiny T, or ``top_k=1``, is greedy decoding).
        top_k: Keep the k most probable tokens (None: all).
        top_p: Keep the smallest set of tokens of mass ≥ top_p, the token that crosses it included
            (None: all).

    Raises:
        ArgumentTypeError: ``top_k`` is not an int.
        ArgumentError: a value is out of range.
    """

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        self.temperature = check_finite_positive("temperature", temperature)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int):
                raise ArgumentTypeError("top_k", f"expected an int, got {type(top_k).__name__}")
            if top_k < 1:
                raise ArgumentError("top_k", f"must be >= 1, got {top_k}")
        if top_p is not None:
            p = check_finite("top_p", top_p)
            if not 0 < p <= 1:
                raise ArgumentError("top_p", f"must lie in (0, 1], got {top_p}")
        self.top_k = top_k
        self.top_p = top_p

    def log_q(self, view: Readouts, target_factor: TargetFactor) -> Tensor:
        if self.temperature == 1.0:
            log_q = view.log_p  # already normalised
        else:
            log_q = torch.log_softmax(view.log_p / self.temperature, dim=-1)
        return truncate(log_q, self.top_k, self.top_p)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("top_k", self.top_k), ("top_p", self.top_p)) if v is not None)
        return f"Tempered({self.temperature:g}{extra})"


class LocallyOptimal(Proposal):
    """q_t ∝ the target's token factor φ_t (the variance-minimising prefix-only proposal).

    For ``Power(α)`` this is temperature 1/α, and SMC's incremental weight is logsumexp_v log φ_t(v),
    independent of the token drawn. Takes no arguments.

    Raises:
        ArgumentTypeError: at the first draw, when the target has no token factor.
    """

    def log_q(self, view: Readouts, target_factor: TargetFactor) -> Tensor:
        f = target_factor(view)
        if f is None:
            raise ArgumentTypeError("proposal", "LocallyOptimal needs a target with token factors")
        return torch.log_softmax(f, dim=-1)

    def __repr__(self) -> str:
        return "LocallyOptimal()"
