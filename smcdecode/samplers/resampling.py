"""Resampling schemes with one signature: ``scheme(generator, weights [G, N], n) -> indices [G, n]``.

``weights`` are normalised along the last dim. Every scheme is unbiased: E[#copies of i] = n·W_i.
* multinomial: n i.i.d. draws.
* stratified:  u_j = (j + U_j) / n, U_j ~ U[0,1) independent, index = F^{-1}(u_j).
* systematic:  u_j = (j + U) / n with one U per group.
* residual:    ⌊n·W_i⌋ deterministic copies, the remaining R = n − Σ⌊n·W_i⌋ drawn multinomially
               from the residual weights (n·W_i − ⌊n·W_i⌋) / R.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Scheme = Callable[[torch.Generator, Tensor, int], Tensor]


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=weights.shape[-1] - 1)


def multinomial(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def stratified(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    g = weights.shape[0]
    u = (torch.arange(n, device=weights.device) + torch.rand(g, n, generator=generator, device=weights.device)) / n
    return _inverse_cdf(weights, u)


def systematic(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    g = weights.shape[0]
    u = (torch.arange(n, device=weights.device) + torch.rand(g, 1, generator=generator, device=weights.device)) / n
    return _inverse_cdf(weights, u)


def residual(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    scaled = n * weights.double()
    counts = scaled.floor()
    remainder = n - counts.sum(-1, keepdim=True)  # [G, 1]
    res = scaled - counts
    res = torch.where(remainder > 0, res, torch.ones_like(res))  # any valid weights when R = 0
    draws = torch.multinomial(res.float(), n, replacement=True, generator=generator)  # [G, n]
    take = torch.arange(n, device=weights.device)[None, :] < remainder  # first R draws count
    counts = counts.scatter_add(-1, draws, take.double())
    ends = counts.cumsum(-1)  # [G, N], last = n
    j = torch.arange(n, device=weights.device, dtype=ends.dtype).expand(weights.shape[0], n)
    return torch.searchsorted(ends, j.contiguous(), right=True).clamp(max=weights.shape[-1] - 1)


SCHEMES: dict[str, Scheme] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}
