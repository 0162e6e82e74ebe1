"""Reward potentials: log ψ(c, x) = λ · r(c, x) on complete sequences.

With ``prefix=True`` the reward is also evaluated on partial sequences at block boundaries and
used as an SMC twist: the incremental weight gains λ·(r(x_≤t) − r(x_≤s)) for the previous
boundary s, and the final value replaces the twist at completion, so the target is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from smcdecode.errors import ArgumentTypeError, RewardError, check_finite
from smcdecode.targets.base import Potential, Sequences


class Reward(Potential):
    """A reward potential log ψ(c, x) = λ · r(c, x) on complete sequences.

    Args:
        fn: The reward r: ``fn(prompt, continuation) -> float`` (strings with a tokenizer,
            token-id lists without); with ``batched=True``, ``fn(prompts, continuations) -> floats``.
        weight: λ.
        prefix: Also evaluate the reward on partial sequences at SMC block boundaries, as a twist
            (the target is unchanged).
        batched: Call ``fn`` once per batch of rows.

    Raises:
        ArgumentTypeError: ``fn`` is not callable.
        ArgumentError: ``weight`` is not finite.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        weight: float = 1.0,
        prefix: bool = False,
        batched: bool = False,
    ):
        if not callable(fn):
            raise ArgumentTypeError("fn", f"expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.weight = check_finite("weight", weight)
        self.prefix = bool(prefix)
        self.batched = bool(batched)

    @property
    def has_sequence_potential(self) -> bool:
        return True

    def sequence_log_potential(self, seqs: Sequences) -> Tensor:
        """λ·r of each row, [B] float64.

        Args:
            seqs: The rows: their prompts and continuations (texts when the backend has a tokenizer).

        Raises:
            RewardError: ``fn`` raised, or returned a value that is not a finite number (the error
                names the prompt and sample).
        """
        prompts, conts = seqs.texts()
        if self.batched:
            try:
                values = list(self.fn(prompts, conts))
            except Exception as e:
                raise RewardError(
                    f"reward raised {type(e).__name__}: {e}", seqs.prompt_index[0], seqs.sample_index[0]
                ) from e
            if len(values) != len(conts):
                raise RewardError(
                    f"batched reward returned {len(values)} values for {len(conts)} sequences",
                    seqs.prompt_index[0],
                    seqs.sample_index[0],
                )
        else:
            values = []
            for r, (p, c) in enumerate(zip(prompts, conts)):
                try:
                    values.append(self.fn(p, c))
                except Exception as e:
                    raise RewardError(
                        f"reward raised {type(e).__name__}: {e}", seqs.prompt_index[r], seqs.sample_index[r]
                    ) from e
        out = []
        for r, v in enumerate(values):
            try:
                f = float(v)
            except (TypeError, ValueError) as e:
                raise RewardError(
                    f"reward returned {v!r}, not a number", seqs.prompt_index[r], seqs.sample_index[r]
                ) from e
            if not math.isfinite(f):
                raise RewardError(f"reward returned {f}", seqs.prompt_index[r], seqs.sample_index[r])
            out.append(self.weight * f)
        return torch.tensor(out, dtype=torch.float64)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", "fn")
        return f"Reward({name}, weight={self.weight:g}{', prefix=True' if self.prefix else ''})"
