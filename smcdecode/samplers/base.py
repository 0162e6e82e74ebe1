"""Sampler base: ``run(engine, prompts, *, max_new_tokens, seed) -> Result``, progress bars and
the conversion of final chains into :class:`Sample` lists."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcdecode.backends import Backend
from smcdecode.samplers.core import Chains, Problem
from smcdecode.samplers.result import Result, Sample, Trace
from smcdecode.stopping import StopSet, StopSpec, stop_set


class Sampler:
    def run(
        self,
        engine: Backend,
        prompts: Any,
        *,
        max_new_tokens: int,
        seed: int = 0,
        progress: bool | None = None,
        stop: StopSpec | StopSet | None = None,
    ) -> Result:
        """Draw samples for every prompt. ``progress=None`` shows bars only on a terminal.

        ``stop``: a list of strings (need a tokenizer) and/or token-id lists; a sample ends at the
        token whose text first completes one of them (that token included), at EOS, or at
        ``max_new_tokens``. The target and the proposal are both taken on that stopped space."""
        if not isinstance(engine, Backend):
            from smcdecode.errors import ArgumentTypeError

            got = type(engine).__name__
            raise ArgumentTypeError("engine", f"expected a smcdecode backend (e.g. smcdecode.Engine), got {got}")
        t0 = time.perf_counter()
        before = engine.counters
        with torch.no_grad():
            stops = stop if isinstance(stop, StopSet) or stop is None else stop_set(engine, stop)
            result = self._run(engine, prompts, max_new_tokens, seed, _show(progress), stops)
        after = engine.counters
        result.wall_time = time.perf_counter() - t0
        result.counters = {k: after[k] - before[k] for k in after}
        result.method = repr(self)
        return result

    def _run(
        self, engine: Backend, prompts: Any, max_new_tokens: int, seed: int, progress: bool, stop: StopSet | None
    ) -> Result:
        raise NotImplementedError  # abstract


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


def collect(
    problem: Problem, chains: Chains, log_w: Tensor | None, trace: Trace, log_evidence: list[float | None] | None = None
) -> Result:
    """Final chains -> Result. ``log_w`` None means uniform weights."""
    n = problem.rows_per_prompt
    b = chains.length.shape[0]
    if log_w is None:
        log_w = torch.zeros(b, device=chains.length.device)
    grouped = log_w.view(-1, n)
    lw = (grouped - torch.logsumexp(grouped, dim=1, keepdim=True)).view(-1).tolist()
    log_p = chains.sum_log_p().tolist()
    log_q = (chains.log_q * chains.positions()).sum(1).tolist()
    log_t = problem.log_target(chains).tolist() if problem.target is not None else [None] * b
    tokens = chains.token_lists()
    samples: list[list[Sample]] = []
    for r in range(b):
        if r % n == 0:
            samples.append([])
        samples[-1].append(
            Sample(tokens[r], problem.engine.decode_text(tokens[r]), lw[r], log_p[r], log_t[r], log_q[r])
        )
    ev: list[float | None] = list(log_evidence) if log_evidence is not None else [None] * len(samples)
    return Result(samples, ev, trace)
