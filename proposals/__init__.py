"""Proposal kernels (importable only as ``smcdecode.proposals``)."""

from smcdecode.proposals.base import Proposal, sample
from smcdecode.proposals.tempered import LocallyOptimal, Tempered, truncate

__all__ = ["Proposal", "Tempered", "LocallyOptimal", "sample", "truncate"]
