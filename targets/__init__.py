"""Target potentials (importable only as ``smcdecode.targets``)."""

from smcdecode.targets.base import (
    AuxStream,
    Potential,
    Product,
    Requirements,
    Scaled,
    Sequences,
    StepView,
)
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
    "StepView",
    "Sequences",
    "AuxStream",
    "dola_candidates",
    "js_divergence",
]
