"""Backends: the language-model runtimes a sampler can drive (see :mod:`smcdecode.backends.base`).

* :class:`HFBackend` (``smcdecode.Engine``): any Hugging Face causal LM, with a KV cache that
  supports resampling, per-row rollback and checkpoints; every capability.
* :class:`ReferenceBackend`: recomputes every sequence from scratch (no cache); the obviously
  correct implementation the conformance suite :func:`smcdecode.testing.check_backend` and the
  samplers are checked against.
"""

from smcdecode.backends.base import CAPABILITIES, OPERATIONS, Backend, Batch, CapabilityError, CapacityError, Prompts
from smcdecode.backends.hf import Engine, HFBackend, embedded_model_path
from smcdecode.backends.reference import ReferenceBackend
from smcdecode.backends.rows import Rows

__all__ = [
    "Backend",
    "Batch",
    "Rows",
    "Prompts",
    "CAPABILITIES",
    "CapabilityError",
    "CapacityError",
    "OPERATIONS",
    "HFBackend",
    "Engine",
    "ReferenceBackend",
    "embedded_model_path",
]
