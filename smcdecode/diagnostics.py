"""Diagnostics computed from a :class:`~smcdecode.samplers.Result` trace (pure tensor functions).

* ``weight_ess(log_w, dim)``: 1 / Σ W² of normalised weights W = softmax(log_w) along ``dim``.
* ``acceptance_by_block(result)``: per MH block, the fraction of accepted moves (all chains).
* ``ess_trace(result)``: SMC ESS per step and prompt, [steps, P], with the resampling mask.
* ``unique_particles(result)``: distinct final sequences per prompt.
* ``chain_log_target(result)``: log π of each MH chain after every move, [P, chains, moves];
  ``rhat`` / ``chain_ess`` apply pyro's split R-hat and ESS to it (chain_dim=1, sample_dim=2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from smcdecode.samplers.result import MoveTrace, Result, StepTrace


def weight_ess(log_w: Tensor, dim: int = -1) -> Tensor:
    """Effective sample size 1 / Σ W² of normalised weights along ``dim``.

    Args:
        log_w: Unnormalised log-weights, e.g. [P, N] (P prompts, N particles).
        dim: The particle dimension; W = softmax(log_w) along it.

    Returns:
        The ESS, in [1, N]: ``log_w``'s shape without ``dim`` (e.g. [P]).
    """
    w = torch.softmax(log_w, dim=dim)
    return 1.0 / (w * w).sum(dim)


def acceptance_by_block(result: Result) -> dict[int, float]:
    """Per stage (MH block, or the SMC step a rejuvenation move ran at): fraction accepted.

    Args:
        result: A sampler's result with its trace.

    Returns:
        The acceptance fraction over every chain's moves, by stage (ascending); empty without moves.
    """
    acc: dict[int, list[Tensor]] = {}
    for m in result.trace.infos(MoveTrace):
        acc.setdefault(m.stage, []).append(m.accepted)
    return {k: float(torch.cat(v).double().mean()) for k, v in sorted(acc.items())}


def acceptance_rate(result: Result) -> float | None:
    """Fraction of MH moves accepted over the run (None without moves).

    Args:
        result: A sampler's result with its trace.
    """
    moves = result.trace.infos(MoveTrace)
    return float(torch.cat([m.accepted for m in moves]).double().mean()) if moves else None


def suffix_reuse(result: Result) -> dict[str, float] | None:
    """Of MH moves' proposals: the fraction of proposal tokens y kept from the current suffix
    (``tokens`` = Σ reused / Σ |y|, |y| = |x'| − i for a suffix move, the block for an
    interior-block move) and the fraction of moves whose proposal was x itself, so needed no
    forward (``unchanged``; these count as accepted). None without move records.

    Args:
        result: A sampler's result with its trace.

    Returns:
        ``{"tokens": ..., "unchanged": ...}``, or None.
    """
    moves = result.trace.infos(MoveTrace)
    if not moves:
        return None
    reused = torch.cat([m.reused for m in moves]).double()
    proposed = torch.cat([m.proposed for m in moves]).double()
    return {
        "tokens": float(reused.sum() / proposed.sum().clamp_min(1)),
        "unchanged": float((reused == proposed).double().mean()),
    }


def ess_trace(result: Result) -> tuple[Tensor, Tensor]:
    """(ESS [steps, P], resampled [steps, P] bool) of an SMC run.

    Args:
        result: A sampler's result with its trace.

    Returns:
        ``(ess, resampled)``: float64 [steps, P] and bool [steps, P] on the CPU; [0, P] each
        without SMC steps.
    """
    steps = result.trace.infos(StepTrace)
    if not steps:
        return torch.zeros(0, len(result.samples)), torch.zeros(0, len(result.samples), dtype=torch.bool)
    return (
        torch.stack([s.ess.double().cpu() for s in steps]),
        torch.stack([s.resampled.bool().cpu() for s in steps]),
    )


def unique_particles(result: Result) -> list[int]:
    """Distinct token sequences among each prompt's samples.

    Args:
        result: A sampler's result with its trace.

    Returns:
        One count per prompt.
    """
    return [len({tuple(s.tokens) for s in per}) for per in result.samples]


def chain_log_target(result: Result) -> Tensor:
    """[P, chains, moves] log π of every chain after each move of an MH run.

    Args:
        result: A sampler's result with its trace.

    Returns:
        Float64 [P, chains, moves] on the CPU ([P, 0, 0] when no move recorded log π).
    """
    moves = [m.log_target for m in result.trace.infos(MoveTrace) if m.log_target is not None]
    p = len(result.samples)
    if not moves:
        return torch.zeros(p, 0, 0)
    x = torch.stack([t.double().cpu() for t in moves])  # [moves, P*chains]
    return x.T.reshape(p, -1, x.shape[0])


def rhat(x: Tensor, chain_dim: int = 1, sample_dim: int = 2) -> Tensor:
    """Split R-hat (pyro) of scalar chains; needs ≥ 4 samples per chain.

    Args:
        x: Chains of a scalar, e.g. :func:`chain_log_target`'s [P, chains, moves].
        chain_dim: The chain dimension of ``x``.
        sample_dim: The sample (move) dimension of ``x``.

    Returns:
        R-hat with ``chain_dim`` and ``sample_dim`` reduced (e.g. [P]).
    """
    from pyro.ops.stats import split_gelman_rubin

    return split_gelman_rubin(x, chain_dim=chain_dim, sample_dim=sample_dim)


def chain_ess(x: Tensor, chain_dim: int = 1, sample_dim: int = 2) -> Tensor:
    """Effective sample size (pyro, Geyer's initial monotone sequence) over all chains.

    Args:
        x: Chains of a scalar, e.g. :func:`chain_log_target`'s [P, chains, moves].
        chain_dim: The chain dimension of ``x``.
        sample_dim: The sample (move) dimension of ``x``.

    Returns:
        The ESS with ``chain_dim`` and ``sample_dim`` reduced (e.g. [P]).
    """
    from pyro.ops.stats import effective_sample_size

    return effective_sample_size(x, chain_dim=chain_dim, sample_dim=sample_dim)


def per_token_log_likelihood(result: Result) -> list[float]:
    """log p(x) / |x| of every sample (what the histogram plot shows).

    Args:
        result: A sampler's result with its trace.

    Returns:
        One value per sample, prompt-major (|x| = 0 counts as 1).
    """
    return [s.log_p / max(1, len(s.tokens)) for per in result.samples for s in per]


def summary(result: Result) -> dict[str, float | None]:
    """The run's diagnostics in one dict: ``acceptance``, ``reused_tokens`` and
    ``unchanged_proposals`` (MH moves), ``mean_ess`` and ``resampling_events`` (SMC), and
    ``max_rhat`` (MH with ≥ 2 chains and ≥ 4 moves); None where a value does not apply.

    Args:
        result: A sampler's result with its trace.
    """
    out: dict[str, float | None] = {"acceptance": acceptance_rate(result)}
    reuse = suffix_reuse(result)
    out["reused_tokens"] = None if reuse is None else reuse["tokens"]
    out["unchanged_proposals"] = None if reuse is None else reuse["unchanged"]
    ess, res = ess_trace(result)
    out["mean_ess"] = float(ess.mean()) if ess.numel() else None
    out["resampling_events"] = float(res.sum()) if res.numel() else None
    x = chain_log_target(result)
    if x.numel() and x.shape[1] >= 2 and x.shape[2] >= 4:
        out["max_rhat"] = float(rhat(x).max())
    return out
