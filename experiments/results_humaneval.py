"""HumanEval results on one model: plain, low-temperature, power MH, power SMC, best-of-N,
reward-guided SMC and a layer-contrast target, same seed and settings for every method (see
``results.py``).

    python experiments/results_humaneval.py --model qwen2.5-coder-0.5b-instruct [--methods base,low_temp]
    python experiments/results_humaneval.py --model embedded --limit 2      # smoke test

Defaults: all 164 problems, raw prompt, the harness's stop strings, 384 new tokens, 16 problems
in the batch. Rerun the same command to resume.

The layer-contrast target (power SMC on LayerContrast(L, β = −0.5) ** 4) needs its layer L. Pick it
on the last 20 problems, held out, then run it on the other 144:

    python experiments/results_humaneval.py --model M --select-contrast-layer 8,12,16,20
    python experiments/results_humaneval.py --model M --contrast-layer L --methods layer_contrast --limit 144

The first command writes ``results_humaneval_contrast_layers.json`` (one row per candidate layer).
"""

from __future__ import annotations

import argparse
import sys

from results import run  # type: ignore[import-not-found]

from common import RECORDS  # type: ignore[import-not-found]

T, POWER = "proposal=tempered:temperature=0.25", "target=power:alpha=4"
METHODS = {  # label -> (method spec, answer selection)
    "base": ("ancestral:n=1;proposal=tempered:temperature=1", "sample"),
    "low_temp": (f"ancestral:n=1;{T}", "sample"),
    "power_mh": (f"mh:chains=1,block_size=64,steps=4;{POWER};{T}", "sample"),
    "power_smc": (f"smc:particles=8;{POWER};{T}", "sample"),
    "best_of_8": (f"ancestral:n=8;{T}", "majority"),  # the decode budget of 8 particles
    "reward_smc": (f"smc:particles=8;{POWER}*reward:name=public-tests,weight=4;{T}", "sample"),
}

DEFAULTS = ["--prompt", "raw", "--max-new-tokens", "384", "--batch-size", "16"]
HELD_OUT = 20  # the last problems, where the contrast layer is chosen


def contrast(layer: int) -> tuple[str, str]:
    return f"smc:particles=8;target=contrast:layer={layer},beta=-0.5,alpha=4;{T}", "sample"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--contrast-layer", type=int, default=None, help="the layer of the layer_contrast method")
    ap.add_argument("--select-contrast-layer", default=None, help="comma-separated candidate layers")
    ours, rest = ap.parse_known_args()
    if ours.select_contrast_layer:
        layers = [int(x) for x in ours.select_contrast_layer.split(",")]
        candidates = {f"contrast_L{layer}": contrast(layer) for layer in layers}
        held_out = ["--skip", str(164 - HELD_OUT), "--tag", "_contrast_layers", "--out", f"{RECORDS}/contrast_layers"]
        run("humaneval", candidates, DEFAULTS, held_out + rest)
        sys.exit(0)
    methods = dict(METHODS)
    if ours.contrast_layer is not None:
        methods["layer_contrast"] = contrast(ours.contrast_layer)
    elif "layer_contrast" in " ".join(rest):
        sys.exit("layer_contrast needs --contrast-layer L (choose it with --select-contrast-layer first)")
    run("humaneval", methods, DEFAULTS, rest)
