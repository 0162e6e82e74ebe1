"""Proposal kernels (importable only as ``smcdecode.proposals``)."""

from smcdecode.proposals.base import Proposal, sample
from smcdecode.proposals.eglr import EGLR, entropy, kl
from smcdecode.proposals.tempered import LocallyOptimal, Tempered, truncate

__all__ = ["Proposal", "Tempered", "LocallyOptimal", "EGLR", "sample", "truncate", "entropy", "kl"]
