"""``EGLR(span, max_iters, entropy_threshold, tol, temperature)``: entropy-gated latent recursion.

At a step whose next-token entropy H(p_N) (nats) exceeds ``entropy_threshold``, the top ``span``
decoder layers are applied again to the current position's last hidden state, up to ``max_iters``
times, stopping once KL(p_k−1 ‖ p_k) < ``tol`` between successive next-token distributions:

    h_0 = h_N,   h_k = Layers_{N−span+1..N}(h_k−1),   p_k = softmax(lm_head(norm(h_k)))
    q_t = softmax(log p_K / T)      (p_K the last one computed; p_0 = p_N below the threshold)

The re-applied layers attend to the cached prefix and never write to the cache (the first pass's
entries stay), so scoring and parity are untouched. q_t is a deterministic function of the prefix
and the returned log q is exactly what is sampled from, so suffix MH and SMC correct EGLR
rollouts to any target. ``max_iters=0`` is exactly ``Tempered(temperature)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smcdecode.distributions import entropy, kl
from smcdecode.errors import ArgumentError, check_finite, check_finite_positive, check_int
from smcdecode.proposals.base import Proposal, TargetFactor
from smcdecode.readouts import HIDDEN, Readouts, Requirements

if TYPE_CHECKING:
    from smcdecode.backends import Backend


class EGLR(Proposal):
    """Entropy-gated latent recursion: at steps whose next-token entropy exceeds the threshold, the top
    ``span`` layers are re-applied to the current position until the next-token distribution
    settles, and the token is drawn from the result (module ``smcdecode.proposals.eglr`` gives the recursion).

    Needs a backend with the ``hidden`` and ``reapply`` capabilities (the HF backend, Llama-style
    decoders).

    Args:
        span: Top decoder layers re-applied (1..N).
        max_iters: Re-applications at most per step (0: exactly ``Tempered(temperature)``).
        entropy_threshold: Recurse only where H(p_N) exceeds this, in nats.
        tol: Stop recursing when the KL between successive next-token distributions drops below it.
        temperature: The temperature of the final draw.

    Raises:
        ArgumentError: a value is out of range (``span`` beyond the model's depth: at the first run).
    """

    def __init__(
        self, span: int, max_iters: int = 4, entropy_threshold: float = 2.0, tol: float = 1e-3, temperature: float = 1.0
    ):
        self.span = check_int("span", span, 1)
        self.max_iters = check_int("max_iters", max_iters, 0)
        self.entropy_threshold = check_finite("entropy_threshold", entropy_threshold)
        self.tol = check_finite_positive("tol", tol)
        self.temperature = check_finite_positive("temperature", temperature)

    def requirements(self, engine: Backend) -> Requirements:
        """``HIDDEN`` when the proposal recurses.

        Args:
            engine: The backend the proposal will run on (its depth bounds ``span``).

        Raises:
            ArgumentError: ``span`` exceeds the model's depth.
        """
        if self.span > engine.num_layers:
            raise ArgumentError("span", f"must lie in 1..{engine.num_layers}, got {self.span}")
        return Requirements([HIDDEN] if self.max_iters > 0 else [])

    def recursed_log_p(self, view: Readouts) -> tuple[Tensor, Tensor, Tensor]:
        """(log p_K [B, V], iterations run per row [B], gated rows [B] bool).

        Args:
            view: The step's readouts: ``log_p`` [B, V], and ``HIDDEN`` [B, D] with ``recur``
                bound when a row is gated and ``max_iters`` > 0.

        Returns:
            ``(log_p_K, iterations, gated)``: float [B, V], long [B], bool [B].

        Raises:
            ArgumentError: a row is gated but ``view`` lacks ``HIDDEN`` or ``recur``.
        """
        log_p = view.log_p
        gated = entropy(log_p) > self.entropy_threshold  # [B]
        iters = torch.zeros_like(gated, dtype=torch.long)
        if self.max_iters == 0 or not bool(gated.any()):
            return log_p, iters, gated
        h = view.get(HIDDEN)
        if h is None or view.recur is None:
            raise ArgumentError("proposal", "EGLR needs the sampler to provide the HIDDEN readout and recur")
        cur, active = log_p, gated.clone()
        for _ in range(self.max_iters):
            h_new, lp_new = view.recur(h, self.span)  # [B, D], [B, V]
            h = torch.where(active[:, None], h_new.to(h.dtype), h)
            step_kl = kl(cur, lp_new)
            cur = torch.where(active[:, None], lp_new, cur)
            iters = iters + active.long()
            active = active & (step_kl >= self.tol)
            if not bool(active.any()):
                break
        return cur, iters, gated

    def log_q(self, view: Readouts, target_factor: TargetFactor) -> Tensor:
        log_p, _, _ = self.recursed_log_p(view)
        if self.temperature == 1.0:
            return log_p
        return torch.log_softmax(log_p / self.temperature, dim=-1)

    def __repr__(self) -> str:
        return (
            f"EGLR(span={self.span}, max_iters={self.max_iters}, entropy_threshold={self.entropy_threshold:g}, "
            f"tol={self.tol:g}, temperature={self.temperature:g})"
        )
