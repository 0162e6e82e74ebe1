"""``RolloutPool(spans, temperatures, per_cell)``: the L × T Cartesian pool of rollouts.

Cell (L, T) draws ``per_cell`` ancestral rollouts from ``EGLR(span=L, temperature=T, ...)``;
span 0 means no recursion (plain temperature T), so ``spans=[0]`` is the temperature-only pool.
Every sample is labelled with its cell in ``Sample.meta`` ({"span": L, "temperature": T}); the
pool feeds self-consistency (majority vote) or best-of-N downstream. Weights are uniform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from smcdecode.backends import Backend
from smcdecode.errors import ArgumentError, check_finite_positive, check_int
from smcdecode.proposals.base import Proposal
from smcdecode.proposals.eglr import EGLR
from smcdecode.proposals.tempered import Tempered
from smcdecode.samplers.ancestral import Ancestral
from smcdecode.samplers.base import Sampler
from smcdecode.samplers.result import CellTrace, Result, Sample, Trace
from smcdecode.stopping import StopSet


class RolloutPool(Sampler):
    """The L × T Cartesian pool of ancestral rollouts: cell (L, T) draws ``per_cell`` samples from
    ``EGLR(span=L, temperature=T)`` (span 0: plain temperature T). Each sample carries its cell in
    ``Sample.meta``; weights are uniform.

    Args:
        spans: The spans L of the pool (0: no recursion).
        temperatures: The temperatures T of the pool.
        per_cell: Samples per cell.
        max_iters: EGLR's ``max_iters``.
        entropy_threshold: EGLR's ``entropy_threshold``.
        tol: EGLR's ``tol``.

    Raises:
        ArgumentError: ``spans`` or ``temperatures`` is empty or holds an invalid value.
    """

    def __init__(
        self,
        spans: Sequence[int],
        temperatures: Sequence[float],
        per_cell: int = 1,
        max_iters: int = 4,
        entropy_threshold: float = 2.0,
        tol: float = 1e-3,
    ):
        if not spans or not temperatures:
            raise ArgumentError("spans", "need at least one span and one temperature")
        self.spans = [check_int("spans", s, 0) for s in spans]
        self.temperatures = [check_finite_positive("temperatures", t) for t in temperatures]
        self.per_cell = check_int("per_cell", per_cell, 1)
        self.max_iters, self.entropy_threshold, self.tol = max_iters, entropy_threshold, tol

    def cell_proposal(self, span: int, temperature: float) -> Proposal:
        """The proposal of cell (span, temperature): ``Tempered`` for span 0, else ``EGLR``.

        Args:
            span: Top decoder layers re-applied (0: no recursion).
            temperature: The proposal's temperature.
        """
        if span == 0:
            return Tempered(temperature)
        return EGLR(span, self.max_iters, self.entropy_threshold, self.tol, temperature)

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        pooled: list[list[Sample]] | None = None
        trace = Trace()
        for c, (span, temp) in enumerate((s, t) for s in self.spans for t in self.temperatures):
            res = Ancestral(self.cell_proposal(span, temp), n=self.per_cell).run(
                engine, prompts, max_new_tokens=max_new_tokens, seed=seed + 7919 * c, progress=progress, stop=stop
            )
            for per in res.samples:
                for s in per:
                    s.meta = {"span": span, "temperature": temp}
            pooled = res.samples if pooled is None else [a + b for a, b in zip(pooled, res.samples)]
            trace.log(CellTrace(span, temp, res.wall_time))
        assert pooled is not None
        for per in pooled:
            for s in per:
                s.log_weight = -math.log(len(per))
        return Result(pooled, [None] * len(pooled), trace)

    def __repr__(self) -> str:
        return f"RolloutPool(spans={self.spans}, temperatures={self.temperatures}, per_cell={self.per_cell})"
