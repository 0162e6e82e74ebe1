"""Same-seed samples of every sampler on tiny random models, recorded once from a known-good
revision (``python tests/golden.py --write``) and compared by ``tests/test_golden.py``: a
refactoring that claims to preserve behaviour must reproduce them token for token."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from smcdecode import proposals, samplers, targets
from smcdecode.backends import Backend, Engine
from smcdecode.stopping import StopSet
from smcdecode.testing import tiny_llama

PATH = os.path.join(os.path.dirname(__file__), "data", "golden_samples.json")
VOCAB_BYTES = [b"", b"a", b"b", b"ab", b"c", b"d", b"e", b"f"]
PROMPTS = [[1, 2, 3], [4, 1], [2, 2, 5, 6, 1]]


def _model() -> Any:
    return tiny_llama(vocab=8, layers=3, seed=3, scale=8.0)


def _engine() -> Backend:
    return Engine(_model(), eos_token_ids=[0])


def _stop() -> StopSet:
    return StopSet.build(["ab", [5, 6]], 8, vocab_bytes=VOCAB_BYTES)


def _reward(prompt: list[int], continuation: list[int]) -> float:
    return 0.3 * sum(1 for t in continuation if t == 4)


CASES: dict[str, Callable[[], tuple[samplers.Sampler, dict[str, Any]]]] = {
    "ancestral": lambda: (samplers.Ancestral(proposals.Tempered(0.7), n=3), {}),
    "ancestral_stop": lambda: (samplers.Ancestral(proposals.Tempered(1.0), n=3), {"stop": _stop()}),
    "mh_power": lambda: (
        samplers.SuffixMH(targets.Power(4.0), proposals.Tempered(0.5), chains=2, block_size=3, steps=3),
        {},
    ),
    "mh_power_stop": lambda: (
        samplers.SuffixMH(targets.Power(2.0), proposals.Tempered(1.0), chains=2, block_size=4, steps=4),
        {"stop": _stop()},
    ),
    "mh_noreuse": lambda: (
        samplers.SuffixMH(
            targets.Power(3.0), proposals.Tempered(0.5), chains=2, block_size=8, steps=3, reuse_suffix=False
        ),
        {},
    ),
    "mh_contrast": lambda: (
        samplers.SuffixMH(
            targets.LayerContrast(layer=1, beta=-0.5) ** 2, proposals.Tempered(0.7), chains=2, block_size=4, steps=2
        ),
        {},
    ),
    "smc_power": lambda: (
        samplers.SMC(targets.Power(4.0), proposals.Tempered(0.5), particles=4, ess_threshold=0.9),
        {},
    ),
    "smc_rejuvenate_anneal": lambda: (
        samplers.SMC(
            targets.Power(4.0),
            proposals.Tempered(0.5),
            particles=4,
            ess_threshold=0.9,
            block_size=2,
            rejuvenate=2,
            anneal=3,
        ),
        {},
    ),
    "smc_optimal_stop": lambda: (
        samplers.SMC(targets.Power(3.0), proposals.LocallyOptimal(), particles=4, ess_threshold=0.7),
        {"stop": _stop()},
    ),
    "smc_reward": lambda: (
        samplers.SMC(
            targets.Power(2.0) * targets.Reward(_reward),
            proposals.Tempered(1.0),
            particles=4,
            block_size=3,
            rejuvenate=1,
        ),
        {},
    ),
    "eglr": lambda: (samplers.Ancestral(proposals.EGLR(span=1, entropy_threshold=0.5, temperature=0.8), n=2), {}),
    "block_mh_stop": lambda: (
        samplers.BlockMH(
            targets.Power(2.0), proposals.Tempered(0.8), chains=2, block_size=5, steps=4, span=2, suffix_every=3
        ),
        {"stop": _stop()},
    ),
    "smc_block_mix": lambda: (
        samplers.SMC(
            (targets.LM() * targets.Reward(_reward)) ** 3.0,
            proposals.Tempered(0.7),
            particles=4,
            ess_threshold=0.9,
            block_size=2,
            rejuvenate=2,
            anneal=3,
            move="mix",
            span=2,
        ),
        {},
    ),
}


def record(name: str) -> dict[str, Any]:
    sampler, kw = CASES[name]()
    result = sampler.run(_engine(), PROMPTS, max_new_tokens=9, seed=11, progress=False, **kw)
    return {
        "tokens": [[s.tokens for s in group] for group in result.samples],
        "log_weight": [[round(s.log_weight, 4) for s in group] for group in result.samples],
        "log_evidence": [None if z is None else round(z, 4) for z in result.log_evidence],
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/golden.py --write")
    out = {name: record(name) for name in CASES}
    with open(PATH, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {len(out)} cases to {PATH}")
