"""HumanEval results on one model: plain, low-temperature, power MH, power SMC, best-of-N and
reward-guided SMC, same seed and settings for every method (see ``results.py``).

    python experiments/results_humaneval.py --model qwen2.5-coder-0.5b-instruct [--methods base,low_temp]
    python experiments/results_humaneval.py --model embedded --limit 2      # smoke test

Defaults: all 164 problems, raw prompt, the harness's stop strings, 384 new tokens, 16 problems
in the batch. Rerun the same command to resume.
"""

from __future__ import annotations

from results import run  # type: ignore[import-not-found]

T, POWER = "proposal=tempered:temperature=0.25", "target=power:alpha=4"
METHODS = {  # label -> (method spec, answer selection)
    "base": ("ancestral:n=1;proposal=tempered:temperature=1", "sample"),
    "low_temp": (f"ancestral:n=1;{T}", "sample"),
    "power_mh": (f"mh:chains=1,block_size=64,steps=4;{POWER};{T}", "sample"),
    "power_smc": (f"smc:particles=8;{POWER};{T}", "sample"),
    "best_of_8": (f"ancestral:n=8;{T}", "majority"),  # the decode budget of 8 particles
    "reward_smc": (f"smc:particles=8;{POWER}*reward:name=public-tests,weight=4;{T}", "sample"),
}

if __name__ == "__main__":
    run("humaneval", METHODS, ["--prompt", "raw", "--max-new-tokens", "384", "--batch-size", "16"])
