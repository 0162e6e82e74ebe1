"""Proposal kernels (importable only as ``smcdecode.proposals``)."""

from smcdecode.proposals.base import Proposal, sample
from smcdecode.proposals.eglr import EGLR
from smcdecode.proposals.tempered import LocallyOptimal, Tempered, truncate

from smcdecode.distributions import entropy, kl

__all__ = ["Proposal", "Tempered", "LocallyOptimal", "EGLR", "sample", "truncate", "entropy", "kl"]
