"""Random streams of a run: one for the whole batch, or one per problem.

Every random draw of a sampler goes through ``problem.rng.rand(B, *tail)`` (one row per batch
row) or ``problem.rng.groups()`` (per-problem draws such as SMC resampling). Two kinds:

* :class:`OneStream`: a single ``torch.Generator`` for the batch (``Sampler.run``): a prompt's
  samples depend on the seed and on which prompts share the call.
* :class:`ProblemStreams`: one generator per problem, seeded by the problem's own seed; row b
  draws from the stream of its problem, in the order of that problem's rows. A problem's draws
  then depend only on its seed and on the sequence of draws its own rows make, so its samples
  are the same whether it runs alone or among others, and whichever batch rows it occupies
  (the evaluation loop that keeps the batch full relies on this). Costs one small ``rand``
  call per problem in the batch per draw.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class OneStream:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        """Uniforms [B, ...] on the generator's device."""
        return torch.rand(shape, generator=self.generator, device=self.generator.device, dtype=dtype)

    def groups(self, n_groups: int) -> Iterator[tuple[slice, torch.Generator]]:
        """The generator of every group (all the same here): yields (slice of the groups, generator)."""
        yield slice(0, n_groups), self.generator

    def select(self, idx: Tensor) -> None:
        """Row b becomes old row ``idx[b]`` (nothing to track with one stream)."""


class ProblemStreams:
    """One generator per problem; ``problem[b]`` is the problem of batch row b (−1: a free row,
    which draws from a stream of its own that nothing reads)."""

    def __init__(self, device: torch.device | str, rows: int):
        self.device = torch.device(device)
        self.problem = torch.full((rows,), -1, dtype=torch.long)  # [B], host
        self.generators: dict[int, torch.Generator] = {}
        self._spare = torch.Generator(device=self.device).manual_seed(0)
        self._plan: list[tuple[Tensor, torch.Generator]] | None = None

    def add(self, problem: int, seed: int, rows: Tensor) -> None:
        """Problem ``problem`` (a key unique in this run) with its own ``seed`` takes ``rows``
        (long [k], in the order of its samples)."""
        self.generators[problem] = torch.Generator(device=self.device).manual_seed(seed)
        self.problem[rows.cpu()] = problem
        self._plan = None

    def remove(self, problem: int) -> None:
        self.generators.pop(problem, None)
        self.problem[self.problem == problem] = -1
        self._plan = None

    def select(self, idx: Tensor) -> None:
        self.problem = self.problem[idx.cpu()]
        self._plan = None

    def _rows(self) -> list[tuple[Tensor, torch.Generator]]:
        if self._plan is None:
            plan = []
            for key in sorted(set(self.problem.tolist())):
                gen = self.generators.get(key, self._spare) if key >= 0 else self._spare
                plan.append((torch.nonzero(self.problem == key).view(-1).to(self.device), gen))
            self._plan = plan
        return self._plan

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        """Uniforms [B, ...]: the rows of each problem from that problem's generator, in row order."""
        out = torch.empty(shape, device=self.device, dtype=dtype)
        for rows, gen in self._rows():
            out[rows] = torch.rand((rows.shape[0], *shape[1:]), generator=gen, device=self.device, dtype=dtype)
        return out

    def groups(self, n_groups: int) -> Iterator[tuple[slice, torch.Generator]]:
        """For per-problem draws over ``n_groups`` equal groups of consecutive rows (SMC's
        prompts): each group's generator."""
        size = self.problem.shape[0] // n_groups
        for g in range(n_groups):
            key = int(self.problem[g * size])
            yield slice(g, g + 1), self.generators.get(key, self._spare)


Rng = OneStream | ProblemStreams
