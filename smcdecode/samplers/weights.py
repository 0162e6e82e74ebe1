"""SMC importance weights, grouped by prompt.

For P prompts with N particles each, ``log_w`` [P, N] holds unnormalised log weights. Per prompt:

    W_n = exp(log w_n) / Σ_m exp(log w_m)                  (normalised weights)
    ESS = 1 / Σ_n W_n²                                      (effective sample size, in [1, N])
    log Ẑ = log (1/N) Σ_n exp(log w_n)                      (log-mean: the evidence estimate)

After resampling a prompt's particles, every one of its log weights is set to its log-mean, so
log Ẑ stays unbiased through resampling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from smcdecode.diagnostics import weight_ess


class Weights(NamedTuple):
    log_w: Tensor  # [P, N]

    @staticmethod
    def zeros(prompts: int, particles: int, device: torch.device | str) -> Weights:
        return Weights(torch.zeros(prompts, particles, device=device))

    @property
    def flat(self) -> Tensor:
        """[P·N], in batch-row order (prompt-major)."""
        return self.log_w.reshape(-1)

    @property
    def normalized(self) -> Tensor:
        """W [P, N], summing to 1 per prompt."""
        return torch.softmax(self.log_w, dim=1)

    @property
    def ess(self) -> Tensor:
        """1 / Σ W² per prompt, [P]."""
        return weight_ess(self.log_w, dim=1)

    @property
    def log_mean(self) -> Tensor:
        """log (1/N) Σ exp(log w) per prompt, [P]."""
        return torch.logsumexp(self.log_w, dim=1) - math.log(self.log_w.shape[1])

    def add(self, log_increment: Tensor) -> Weights:
        """Weights times exp(``log_increment``) ([P, N] or [P·N])."""
        return Weights(self.log_w + log_increment.view_as(self.log_w))

    def resampled(self, groups: Tensor) -> Weights:
        """After resampling the prompts where ``groups`` (bool [P]) is True: their log weights all
        become the group's log-mean; the other prompts keep theirs."""
        return Weights(torch.where(groups[:, None], self.log_mean[:, None], self.log_w))
