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
    """Multinomial resampling: n i.i.d. draws from each group's weights.

    Args:
        generator: The random stream.
        weights: Normalised weights [G, N], one group per row.
        n: Indices to draw per group.

    Returns:
        Ancestor indices [G, n] into the last dim of ``weights``.
    """
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def stratified(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Stratified resampling: u_j = (j + U_j) / n with independent U_j ~ U[0, 1), index = F⁻¹(u_j).

    Args:
        generator: The random stream.
        weights: Normalised weights [G, N], one group per row.
        n: Indices to draw per group.

    Returns:
        Ancestor indices [G, n] into the last dim of ``weights``.
    """
    g = weights.shape[0]
    u = (torch.arange(n, device=weights.device) + torch.rand(g, n, generator=generator, device=weights.device)) / n
    return _inverse_cdf(weights, u)


def systematic(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Systematic resampling: u_j = (j + U) / n with one U per group, index = F⁻¹(u_j).

    Args:
        generator: The random stream.
        weights: Normalised weights [G, N], one group per row.
        n: Indices to draw per group.

    Returns:
        Ancestor indices [G, n] into the last dim of ``weights``.
    """
    g = weights.shape[0]
    u = (torch.arange(n, device=weights.device) + torch.rand(g, 1, generator=generator, device=weights.device)) / n
    return _inverse_cdf(weights, u)


def residual(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Residual resampling: ⌊n·W_i⌋ copies of each i, the rest drawn multinomially from the residual weights.

    Args:
        generator: The random stream.
        weights: Normalised weights [G, N], one group per row.
        n: Indices to draw per group.

    Returns:
        Ancestor indices [G, n] into the last dim of ``weights``.
    """
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
