"""Divergences and entropy of categorical distributions given as log-probs (last dim), in nats:

H(p) = −Σ p log p,   KL(p ‖ q) = Σ p (log p − log q),   JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),
m = (p + q) / 2.   Terms with p = 0 contribute 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy(log_p: Tensor) -> Tensor:
    """Entropy H(p) = −Σ_v p(v)·log p(v) in nats, over the last dim of ``log_p`` [..., V]; returns [...].

    Args:
        log_p: Normalised log-probs [..., V] (−inf for p = 0).
    """
    return -(log_p.exp() * log_p).nan_to_num(0.0).sum(-1)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v)) in nats, over the last dim ([..., V] → [...]).

    Args:
        log_p: Normalised log-probs of p [..., V].
        log_q: Normalised log-probs of q, broadcastable with ``log_p``.
    """
    return (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1)


def js_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen–Shannon divergence ½·KL(p ‖ m) + ½·KL(q ‖ m), m = (p + q)/2, over the last dim
    ([..., V] → [...], broadcasting).

    Args:
        log_p: Normalised log-probs of p [..., V].
        log_q: Normalised log-probs of q, broadcastable with ``log_p``.
    """
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (kl(log_p, log_m) + kl(log_q, log_m))
