"""Rollout pools and entropy gating on the built-in arithmetic task with the embedded model.

1. Rollout pools with the same number of rollouts per problem: temperature-only
   (spans=[0] × 4 temperatures × 4 each) against layer × temperature (spans 0, 2, 4, 8 × the same
   4 temperatures × 1 each). Oracle coverage (any rollout correct) and majority-vote accuracy.
2. Layer-contrast decoding (q ∝ contrast factor^alpha, i.e. LocallyOptimal for LayerContrast**alpha)
   with a fixed β against the entropy-gated schedule (β=-0.5 above the threshold, 0 below).

Prints tables and writes experiments/results/eglr_pool.json.

    python experiments/eglr_pool.py [--limit 60]
"""

from __future__ import annotations

import argparse
import collections

import torch

from smcdecode import Engine, proposals, samplers, targets
from smcdecode.demo import wilson
from smcdecode.tasks import arithmetic

from common import print_table, write_results

TEMPS = [0.25, 0.5, 0.75, 1.0]


def pool_scores(res, probs) -> tuple[int, int]:
    oracle = vote = 0
    for prob, per in zip(probs, res.samples):
        answers = [arithmetic.extract(s.text) for s in per]
        oracle += any(a == prob.answer for a in answers)
        counts = collections.Counter(a for a in answers if a is not None)
        vote += bool(counts) and counts.most_common(1)[0][0] == prob.answer
    return oracle, vote


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--entropy-threshold", type=float, default=1.0)
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = Engine.embedded()
    engine = base.with_eos_tokens(base.token_ids_containing("\n"))
    probs = arithmetic.problems(args.limit, seed=1)
    prompts = [arithmetic.prompt(p) for p in probs]
    n = len(probs)
    out: dict = {"config": vars(args)}

    rows = []
    pools = {
        "T-only (span 0) x 4 temps x 4": samplers.RolloutPool(
            [0], TEMPS, per_cell=4, entropy_threshold=args.entropy_threshold
        ),
        "L x T (spans 0,2,4,8) x 4 temps x 1": samplers.RolloutPool(
            [0, 2, 4, 8], TEMPS, per_cell=1, entropy_threshold=args.entropy_threshold
        ),
    }
    for name, pool in pools.items():
        res = pool.run(engine, prompts, max_new_tokens=args.max_new_tokens, seed=0)
        oracle, vote = pool_scores(res, probs)
        rows.append(
            [
                name,
                f"{oracle / n:.3f} [{wilson(oracle, n)[0]:.2f}, {wilson(oracle, n)[1]:.2f}]",
                f"{vote / n:.3f} [{wilson(vote, n)[0]:.2f}, {wilson(vote, n)[1]:.2f}]",
                f"{res.wall_time:.1f}",
            ]
        )
        out[name] = {"oracle": oracle / n, "majority": vote / n, "wall_time": res.wall_time}
    print(f"{n} problems, 16 rollouts per problem, EGLR max_iters=4, threshold={args.entropy_threshold} nats")
    print_table(["pool", "oracle coverage [95% CI]", "majority vote [95% CI]", "wall s"], rows)

    rows = []
    fixed = targets.LayerContrast(layer=args.layer, beta=-0.5, plausibility=0.1) ** 4
    gated = (
        targets.LayerContrast(
            layer=args.layer, plausibility=0.1, beta=targets.EntropyGate(args.entropy_threshold, above=-0.5, below=0.0)
        )
        ** 4
    )
    for name, target in (
        ("fixed beta=-0.5", fixed),
        (f"entropy-gated (H>{args.entropy_threshold}: -0.5, else 0)", gated),
        ("no contrast (beta=0)", targets.Power(4)),
    ):
        sampler = samplers.Ancestral(proposals.LocallyOptimal(), n=1, target=target)
        res = sampler.run(engine, prompts, max_new_tokens=args.max_new_tokens, seed=0)
        k = sum(arithmetic.grade(p, per[0].text) for p, per in zip(probs, res.samples))
        lo, hi = wilson(k, n)
        rows.append([name, f"{k / n:.3f} [{lo:.2f}, {hi:.2f}]", f"{res.wall_time:.1f}"])
        out[name] = {"accuracy": k / n, "wall_time": res.wall_time}
    print(f"\nlayer-contrast decoding, layer {args.layer} vs final, q ∝ factor^4 (LocallyOptimal)")
    print_table(["beta", "accuracy [95% CI]", "wall s"], rows)
    print(write_results("eglr_pool", out))


if __name__ == "__main__":
    main()
