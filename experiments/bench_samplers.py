"""Sampler cost on the embedded model (prints tables, writes experiments/results/bench_samplers.json).

1. ``SuffixMH`` against a reference-style power sampler written here the way the paper's code
   works: one prompt at a time, batch 1, every extension and every MH proposal regenerates its
   suffix with HF ``generate`` from scratch (re-prefilling prompt + kept prefix), log-probs taken
   from ``generate``'s logits. Same α, proposal temperature, block size, steps and prompts.
2. ``SMC(particles=16)`` against ``Ancestral(n=16)`` with the same proposal and length limit.

    python experiments/bench_samplers.py [--prompts 8] [--max-new-tokens 48] [--block-size 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from smcdecode import Engine, diagnostics, proposals, samplers, targets

from common import print_table, write_results

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "math500.jsonl")
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}.\n"


def math_prompts(n: int) -> list[str]:
    if os.path.exists(DATA):
        with open(DATA) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r["problem"] + SUFFIX for r in rows[:n]]
    return [f"What is {i} + {2 * i}?" + SUFFIX for i in range(n)]


class ReferencePowerSampler:
    """Karan & Du-style block MH with HF generate per move (batch 1, recomputes everything)."""

    def __init__(self, engine: Engine, alpha: float, temperature: float, block_size: int, steps: int):
        self.engine, self.alpha, self.temperature = engine, alpha, temperature
        self.block_size, self.steps = block_size, steps

    def _generate(self, ids: list[int], n: int) -> tuple[list[int], list[float], list[float]]:
        eng = self.engine
        with torch.no_grad():
            out = eng.model.generate(
                torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=True,
                temperature=self.temperature,
                top_k=0,
                top_p=1.0,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=eng.eos_token_ids[0],
            )
        new = out.sequences[0, len(ids) :].tolist()
        lp, lq = [], []
        for t, logits in zip(new, out.logits):
            lp.append(float(torch.log_softmax(logits[0].float(), -1)[t]))
            lq.append(float(torch.log_softmax(logits[0].float() / self.temperature, -1)[t]))
        return new, lp, lq

    def run_one(self, prompt: str, max_new_tokens: int, rng: random.Random) -> list[int]:
        ids = self.engine.encode([prompt])[0]
        x: list[int] = []
        lp: list[float] = []
        lq: list[float] = []
        eos = set(self.engine.eos_token_ids)
        for k in range(1, math.ceil(max_new_tokens / self.block_size) + 1):
            horizon = min(k * self.block_size, max_new_tokens)
            if not (x and x[-1] in eos) and len(x) < horizon:
                y, ylp, ylq = self._generate(ids + x, horizon - len(x))
                x, lp, lq = x + y, lp + ylp, lq + ylq
            for _ in range(self.steps):
                i = rng.randrange(len(x))
                y, ylp, ylq = self._generate(ids + x[:i], horizon - i)
                log_a = self.alpha * (sum(ylp) - sum(lp[i:])) + sum(lq[i:]) - sum(ylq)
                if math.log(rng.random()) < log_a:
                    x, lp, lq = x[:i] + y, lp[:i] + ylp, lq[:i] + ylq
        return x

    def run(self, prompts: list[str], max_new_tokens: int, seed: int) -> float:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        for p in prompts:
            self.run_one(p, max_new_tokens, rng)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--skip-smc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = Engine.embedded()
    prompts = math_prompts(args.prompts)
    temp = 1.0 / args.alpha
    # warm-up
    samplers.Ancestral(proposals.Tempered(temp)).run(engine, prompts[:1], max_new_tokens=2, seed=0, progress=False)

    ours = samplers.SuffixMH(
        targets.Power(args.alpha), proposals.Tempered(temp), chains=1, block_size=args.block_size, steps=args.steps
    )
    res = ours.run(engine, prompts, max_new_tokens=args.max_new_tokens, seed=0, progress=False)
    t_ours = res.wall_time
    reuse = diagnostics.suffix_reuse(res) or {"tokens": 0.0, "unchanged": 0.0}
    reuse_frac, no_forward = reuse["tokens"], reuse["unchanged"]
    fresh = samplers.SuffixMH(
        targets.Power(args.alpha),
        proposals.Tempered(temp),
        chains=1,
        block_size=args.block_size,
        steps=args.steps,
        reuse_suffix=False,
    )
    res_fresh = fresh.run(engine, prompts, max_new_tokens=args.max_new_tokens, seed=0, progress=False)
    t_fresh = res_fresh.wall_time
    acc = sum(a for m in res.trace.of("move") for a in m["accepted"]) / max(
        1, sum(len(m["accepted"]) for m in res.trace.of("move"))
    )
    t_ref = ReferencePowerSampler(engine, args.alpha, temp, args.block_size, args.steps).run(
        prompts, args.max_new_tokens, seed=0
    )
    mh_rows = [
        ["reference (HF generate per move, batch 1)", f"{t_ref:.1f}", "1.00x"],
        ["SuffixMH(reuse_suffix=False): batched, KV reuse", f"{t_fresh:.1f}", f"{t_ref / t_fresh:.2f}x"],
        ["SuffixMH: + proposal coupled with the current suffix", f"{t_ours:.1f}", f"{t_ref / t_ours:.2f}x"],
    ]

    cfg = (
        f"{args.prompts} MATH-500 prompts, alpha={args.alpha:g}, proposal T={temp:g}, "
        f"max_new_tokens={args.max_new_tokens}, block_size={args.block_size}, steps={args.steps}"
    )
    print(cfg)
    print_table(["power sampler", "wall s", "speed-up"], mh_rows)
    print(
        f"(SuffixMH acceptance {acc:.2f}; decode tokens {res.counters['decode_tokens']} "
        f"vs {res_fresh.counters['decode_tokens']} without reuse; prefill tokens {res.counters['prefill_tokens']}; "
        f"{reuse_frac:.0%} of proposal tokens kept from the current suffix; "
        f"{no_forward:.0%} of moves needed no forward)\n"
    )
    payload = {
        "config": vars(args),
        "description": cfg,
        "suffix_mh": {
            "reference_s": t_ref,
            "ours_s": t_ours,
            "speedup": t_ref / t_ours,
            "no_reuse_s": t_fresh,
            "no_reuse_speedup": t_ref / t_fresh,
            "acceptance": acc,
            "reused_token_fraction": reuse_frac,
            "moves_without_forward": no_forward,
            "counters": res.counters,
            "counters_no_reuse": res_fresh.counters,
        },
    }
    if not args.skip_smc:
        anc = samplers.Ancestral(proposals.Tempered(temp), n=args.particles)
        r_anc = anc.run(engine, prompts, max_new_tokens=args.max_new_tokens, seed=0, progress=False)
        smc = samplers.SMC(targets.Power(args.alpha), proposals.Tempered(temp), particles=args.particles)
        r_smc = smc.run(engine, prompts, max_new_tokens=args.max_new_tokens, seed=0, progress=False)
        resamples = sum(sum(r["resampled"]) for r in r_smc.trace.of("step"))
        ratio = r_smc.wall_time / r_anc.wall_time
        print_table(
            ["sampler", "wall s", "time vs ancestral", "resampling events"],
            [
                [f"Ancestral(n={args.particles})", f"{r_anc.wall_time:.1f}", "1.00x", "-"],
                [f"SMC(particles={args.particles})", f"{r_smc.wall_time:.1f}", f"{ratio:.2f}x", str(resamples)],
            ],
        )
        payload["smc"] = {
            "ancestral_s": r_anc.wall_time,
            "smc_s": r_smc.wall_time,
            "ratio": ratio,
            "resampling_events": resamples,
        }
    print(write_results(f"bench_samplers{args.tag}", payload))


if __name__ == "__main__":
    main()
