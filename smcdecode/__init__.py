"""smcdecode: exact Monte Carlo sampling from sequence-level targets defined by a language model
(power p^α, layer-contrast-tempered, reward-augmented) over a batched, cache-reusing engine."""

from smcdecode import backends, models, proposals, readouts, samplers, targets
from smcdecode.backends import Backend, Batch, Engine, ReferenceBackend
from smcdecode.errors import ArgumentError, ArgumentTypeError, RewardError, SmcdecodeError
from smcdecode.readouts import HIDDEN, Aux, Layer, Readouts, Requirements
from smcdecode.samplers.result import Result, Sample

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Backend",
    "ReferenceBackend",
    "backends",
    "Batch",
    "Readouts",
    "Requirements",
    "Layer",
    "Aux",
    "HIDDEN",
    "readouts",
    "Result",
    "Sample",
    "targets",
    "proposals",
    "samplers",
    "models",
    "SmcdecodeError",
    "ArgumentError",
    "ArgumentTypeError",
    "RewardError",
    "__version__",
]
