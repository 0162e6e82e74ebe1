"""Samplers: ``run(engine, prompts, *, max_new_tokens, seed) -> Result``."""

from smcdecode.diagnostics import weight_ess as ess
from smcdecode.samplers.ancestral import Ancestral
from smcdecode.samplers.base import Sampler
from smcdecode.samplers.block_lookahead import BlockLookahead
from smcdecode.samplers.block_mh import BlockMH
from smcdecode.samplers.pool import RolloutPool
from smcdecode.samplers.resampling import SCHEMES, multinomial, residual, stratified, systematic
from smcdecode.samplers.result import ExtendTrace, MoveTrace, Result, Sample, StepTrace, Trace
from smcdecode.samplers.smc import SMC
from smcdecode.samplers.suffix_mh import SuffixMH

__all__ = [
    "Ancestral",
    "SuffixMH",
    "BlockMH",
    "SMC",
    "BlockLookahead",
    "RolloutPool",
    "Sampler",
    "Result",
    "Sample",
    "Trace",
    "MoveTrace",
    "StepTrace",
    "ExtendTrace",
    "ess",
    "SCHEMES",
    "multinomial",
    "stratified",
    "systematic",
    "residual",
]
