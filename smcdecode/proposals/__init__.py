"""Proposal kernels (importable only as ``smcdecode.proposals``)."""

from smcdecode.distributions import entropy, kl
from smcdecode.proposals.base import Proposal, sample
from smcdecode.proposals.eglr import EGLR
from smcdecode.proposals.lookahead import Lookahead
from smcdecode.proposals.tempered import LocallyOptimal, Tempered, truncate

__all__ = ["Proposal", "Tempered", "LocallyOptimal", "EGLR", "Lookahead", "sample", "truncate", "entropy", "kl"]
