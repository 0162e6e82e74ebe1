"""MATH-500 level-1 results on one model: plain, low-temperature, power MH and power SMC, same
seed and settings for every method (see ``results.py``).

    python experiments/results_math500.py --model qwen2.5-coder-0.5b-instruct --data PATH/math500.jsonl
    python experiments/results_math500.py --model embedded --data PATH/math500.jsonl --limit 2   # smoke test

Defaults: the level-1 problems, chat template, EOS only, 512 new tokens, 16 problems in the
batch, math-verify grading. Rerun the same command to resume.
"""

from __future__ import annotations

from results import run  # type: ignore[import-not-found]

T, POWER = "proposal=tempered:temperature=0.25", "target=power:alpha=4"
METHODS = {  # label -> (method spec, answer selection)
    "base": ("ancestral:n=1;proposal=tempered:temperature=1", "sample"),
    "low_temp": (f"ancestral:n=1;{T}", "sample"),
    "power_mh": (f"mh:chains=1,block_size=128,steps=4;{POWER};{T}", "sample"),
    "power_smc": (f"smc:particles=8;{POWER};{T}", "sample"),
}

if __name__ == "__main__":
    run("math500", METHODS, ["--prompt", "chat", "--levels", "1", "--max-new-tokens", "512", "--batch-size", "16"])
