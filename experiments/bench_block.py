"""Interior-block MH against suffix MH on a power target (prints a table, writes
experiments/results/bench_block[TAG].json).

Samplers, all on p^α with proposal T = 1/α, one chain per prompt, one block (horizon =
max_new_tokens: every chain is extended once, then makes ``--steps`` moves):

* ``SuffixMH``: suffix moves (asynchronous schedule, proposal coupled with the current suffix);
* ``BlockMH``: interior-block moves of ``--span`` tokens (suffix kept and rescored by one
  teacher-forced forward; a tail block is a suffix move of at most ``--span`` tokens);
* ``mix``: ``BlockMH(suffix_every=2)``, block and suffix moves alternating.

Per sampler: acceptance rate (moves whose proposal was x itself count as accepted, as everywhere),
moves that needed no forward, proposals refused for leaving the sequence space (EOS or a stop
inside an interior block), and the cost of the moves alone: each sampler also runs with
``steps=0`` (the extension only, same seed) and the difference is divided by the moves — decode
tokens per chain-move, forward passes per move step (a step moves every chain), wall seconds per
move step. Mixing: the lag-k autocorrelation of each chain's log p(x) after every move (averaged
over the chains that moved) and its effective sample size (pyro, Geyer's initial monotone
sequence; a chain whose log p never changed counts as 1) summed over chains, per second of move
wall time. The chains start from q's samples (no burn-in is dropped).

    python experiments/bench_block.py --data math500.jsonl            # the embedded model
    python experiments/bench_block.py --data math500.jsonl --model qwen2.5-coder-0.5b-instruct --tag _qwen

Without ``--data`` (a MATH-500 JSONL with a "problem" field) synthetic arithmetic prompts are used.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

import smcdecode as sd
from smcdecode import diagnostics, proposals, samplers, targets
from smcdecode.models import resolve

from common import print_table, write_results

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}.\n"


def math_prompts(path: str | None, n: int) -> list[str]:
    if path:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r["problem"] + SUFFIX for r in rows[:n]]
    return [f"What is {17 * i + 3} + {29 * i + 11}?" + SUFFIX for i in range(n)]


def make(kind: str, args: argparse.Namespace, steps: int) -> samplers.Sampler:
    target, proposal = targets.Power(args.alpha), proposals.Tempered(1.0 / args.alpha)
    common = {"chains": args.chains, "block_size": args.max_new_tokens, "steps": steps}
    if kind == "SuffixMH":
        return samplers.SuffixMH(target, proposal, **common)
    every = {"BlockMH": 0, "mix": 2}[kind]
    return samplers.BlockMH(target, proposal, span=args.span, suffix_every=every, **common)


def autocorrelation(x: torch.Tensor, lags: int) -> list[float]:
    """Lag-1..lags autocorrelation of chains x [P, N], averaged over the chains that moved (a
    chain whose log p never changed has no defined autocorrelation)."""
    from pyro.ops.stats import autocorrelation as acf

    moving = x.std(-1) > 0
    if not bool(moving.any()):
        return [float("nan")] * lags
    r = acf(x[moving], dim=-1)  # [P', N]
    return [float(r[:, k].mean()) for k in range(1, min(lags, x.shape[1] - 1) + 1)]


def effective_sample_size(x: torch.Tensor) -> torch.Tensor:
    """ESS of each chain x [P, N] (pyro); a chain whose log p never changed counts as 1."""
    # one chain at a time: pyro's batched estimate turns every chain NaN when one is constant
    return torch.tensor([float(diagnostics.chain_ess(c[None, None, :])[0]) if c.std() > 0 else 1.0 for c in x])


def measure(kind: str, engine: sd.Backend, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    run = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "progress": False}
    base = make(kind, args, 0).run(engine, prompts, **run)
    res = make(kind, args, args.steps).run(engine, prompts, **run)
    moves = res.trace.of("move")
    n_chain_moves = sum(len(m["accepted"]) for m in moves)
    reuse = diagnostics.suffix_reuse(res) or {"unchanged": 0.0}
    invalid = sum(sum(m["invalid"]) for m in moves)
    cost = {k: res.counters[k] - base.counters[k] for k in ("decode_tokens", "forwards", "positions_computed")}
    wall = res.wall_time - base.wall_time
    log_p = diagnostics.chain_log_target(res) / args.alpha  # [P, chains, moves]: log p(x) after each move
    chains = log_p.reshape(-1, log_p.shape[-1])  # [P·chains, moves]
    ess = effective_sample_size(chains)
    return {
        "sampler": repr(make(kind, args, args.steps)),
        "acceptance": diagnostics.acceptance_rate(res),
        "no_forward": reuse["unchanged"],
        "invalid": invalid / max(1, n_chain_moves),
        "decode_tokens_per_chain_move": cost["decode_tokens"] / max(1, n_chain_moves),
        "forwards_per_move_step": cost["forwards"] / max(1, args.steps),
        "positions_per_chain_move": cost["positions_computed"] / max(1, n_chain_moves),
        "wall_s": res.wall_time,
        "extension_wall_s": base.wall_time,
        "move_wall_s": wall,
        "wall_per_move_step_s": wall / max(1, args.steps),
        "autocorrelation": autocorrelation(chains, args.lags),
        "ess": float(ess.sum()),
        "ess_per_s": float(ess.sum()) / max(wall, 1e-9),
        "chains_that_never_moved": int((chains.std(-1) == 0).sum()),
        "final_mean_log_p": float(log_p[..., -1].mean()),
        "counters": res.counters,
        "counters_extension": base.counters,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a registry name or a path (default embedded)")
    ap.add_argument("--data", default=None, help="MATH-500 JSONL (default: synthetic prompts)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--chains", type=int, default=1, help="chains per prompt")
    ap.add_argument("--steps", type=int, default=16, help="moves per chain")
    ap.add_argument("--span", type=int, default=16, help="tokens of an interior block")
    ap.add_argument("--lags", type=int, default=4)
    ap.add_argument("--samplers", default="SuffixMH,BlockMH,mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    engine = sd.Engine.embedded() if args.model == "embedded" else sd.Engine.from_pretrained(resolve(args.model))
    prompts = math_prompts(args.data, args.prompts)
    samplers.Ancestral(proposals.Tempered(1.0)).run(engine, prompts[:1], max_new_tokens=2, progress=False)  # warm-up
    out = {kind: measure(kind, engine, prompts, args) for kind in args.samplers.split(",")}
    cfg = (
        f"{args.model}, {len(prompts)} prompts, {args.max_new_tokens} tokens, alpha={args.alpha:g}, "
        f"T={1 / args.alpha:g}, {args.chains} chain(s) per prompt, {args.steps} moves, span={args.span}"
    )
    print(cfg)
    print_table(
        [
            "sampler",
            "accept",
            "no fwd",
            "refused",
            "dec tok/move",
            "fwd/step",
            "s/step",
            "acf lag1..",
            "ESS",
            "ESS/s",
        ],
        [
            [
                k,
                f"{r['acceptance']:.2f}",
                f"{r['no_forward']:.2f}",
                f"{r['invalid']:.2f}",
                f"{r['decode_tokens_per_chain_move']:.1f}",
                f"{r['forwards_per_move_step']:.1f}",
                f"{r['wall_per_move_step_s']:.2f}",
                " ".join(f"{a:.2f}" for a in r["autocorrelation"]),
                f"{r['ess']:.1f}",
                f"{r['ess_per_s']:.3f}",
            ]
            for k, r in out.items()
        ],
    )
    config = {**vars(args), "data": args.data and os.path.basename(args.data)}  # no local paths in results
    print(write_results(f"bench_block{args.tag}", {"config": config, "description": cfg, "samplers": out}))


if __name__ == "__main__":
    main()
