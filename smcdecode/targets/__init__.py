"""Target potentials (importable only as ``smcdecode.targets``)."""

from smcdecode.readouts import Readouts, Requirements
from smcdecode.targets.base import Potential, Product, Scaled, Sequences
from smcdecode.targets.lm import (
    LM,
    Contrast,
    EntropyGate,
    LayerContrast,
    Power,
    dola_candidates,
    js_divergence,
)
from smcdecode.targets.reward import Reward

__all__ = [
    "LM",
    "Power",
    "LayerContrast",
    "EntropyGate",
    "Contrast",
    "Reward",
    "Potential",
    "Product",
    "Scaled",
    "Requirements",
    "Readouts",
    "Sequences",
    "dola_candidates",
    "js_divergence",
]
