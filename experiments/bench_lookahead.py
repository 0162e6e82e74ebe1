"""Lookahead power sampling against the other α = 4 samplers, on HumanEval and MATH-500 level 1.

Per (model, task, method) it runs ``smcdecode.evaluate.run_eval`` one problem per sampler call
(so the backend's counters are each problem's own) into its own directory under ``--out``
(default ``experiments/records/bench_lookahead``, committed; resumable: rerun the same command
and finished problems are skipped), then reads the records
back and reports per problem:

* accuracy (pass@1 / exact answer) and the answer's length in tokens (weighted by the samples'
  normalised weights);
* decode tokens (kept work: the sampler's own rows) and rollout tokens (lookahead work), both
  from the backend's counters: the *work*, which is what wall time tracks on a compute-bound CPU;
* sequential forwards (the backend's ``forwards`` counter, every forward of the call, rollouts
  included): the *depth*, which is what wall time tracks on a GPU whose decode is memory-bound
  (rollout rows and particles batched with the main rows are nearly free there);
* wall seconds here.

Methods (α = 4):
  t4             plain sampling at temperature 1/4
  power_smc      prefix-only power SMC (q ∝ p^α, LocallyOptimal), 8 particles
  suffix_mh      suffix MH on p^α (proposal T = 1/4), blocks of 64, 4 moves per block
  lookahead      the standalone token Lookahead (the paper's approximate sampler, ε = 0): the
                 4 most likely tokens, 4 rollouts of 8 tokens each
  lookahead_block      the paper's block variant: 8 candidate blocks of 32 tokens from p, the 4
                       most likely get 4 rollouts of 32 tokens (approximate)
  smc_lookahead_block  the block variant made exact: 4 particles, a block chosen among its 4
                       candidates by estimated weight, the mean weight as increment
  smc_lookahead  SMC + Lookahead with the twist, 4 particles, 4 candidates × 2 rollouts of 8
                 tokens (exact)

The settings are smaller than the paper's (K = M = 8, blocks of 192) so that a run fits a 2-core
CPU: a token-level step costs K·M·H rollout tokens per kept token.

Targets: Lookahead at ≤ 3× plain sampling's sequential forwards and ≤ 1/3 of
SuffixMH's, SMC + Lookahead at ≤ SuffixMH's, at equal or better accuracy. The table says where it
falls short; the rollout-token column is what the CPU pays.

    python experiments/bench_lookahead.py --model embedded --limit 8 --max-new-tokens 128 --data math500.jsonl \
        --tag _embedded
    python experiments/bench_lookahead.py --model qwen2.5-coder-0.5b-instruct --limit 8 --tasks humaneval --tag _qwen

Results: ``experiments/results/bench_lookahead[TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import smcdecode as sd
from smcdecode.cli import parse_stop
from smcdecode.evaluate import TaskAdapter, run_eval
from smcdecode.models import resolve
from smcdecode.spec import method_name, parse_method
from smcdecode.tasks import load_task

from common import RECORDS, print_table, write_results

METHODS = {
    "t4": "ancestral:n=1;proposal=tempered:temperature=0.25",
    "power_smc": "smc:particles=8;target=power:alpha=4;proposal=optimal",
    "suffix_mh": "mh:chains=1,block_size=64,steps=4;target=power:alpha=4;proposal=tempered:temperature=0.25",
    "lookahead": "ancestral:n=1;proposal=lookahead:alpha=4,candidates=4,rollouts=4,horizon=8,epsilon=0",
    "lookahead_block": ("block-lookahead:alpha=4,particles=1,block_size=32,candidates=8,keep=4,rollouts=4,horizon=32"),
    "smc_lookahead_block": "block-lookahead:alpha=4,particles=4,block_size=32,candidates=4,rollouts=4,horizon=32",
    "smc_lookahead": (
        "smc:particles=4,twist=true;target=power:alpha=4;proposal=lookahead:alpha=4,candidates=4,rollouts=2,horizon=8"
    ),
}


def tasks(names: list[str], limit: int, data: str | None, tokenizer: object) -> dict[str, tuple[TaskAdapter, object]]:
    """name -> (task adapter with the first ``limit`` problems, parsed default stop patterns);
    MATH-500: level 1, raw prompt."""
    out: dict[str, tuple[TaskAdapter, object]] = {}
    for name in names:
        math = name == "math500"
        task = load_task(name, data=data if math else None, tokenizer=tokenizer, levels=[1] if math else None)
        task.adapter.problems = task.adapter.problems[:limit]
        out[name] = (task.adapter, parse_stop(None, task.stop))
    return out


def weighted_length(rec: dict) -> float:
    """Σ_s W_s · |x_s| over the record's samples (W: their normalised weights)."""
    return sum(math.exp(s["log_weight"]) * s["tokens"] for s in rec["samples"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a registry name or a path (default embedded)")
    ap.add_argument("--limit", type=int, default=24, help="first N problems of each task (default 24)")
    ap.add_argument("--tasks", default="humaneval,math500", help="comma-separated from humaneval, math500")
    ap.add_argument("--data", default=None, help="MATH-500 JSONL (required when the tasks include math500)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {sorted(METHODS)}")
    ap.add_argument(
        "--out",
        default=os.path.join(RECORDS, "bench_lookahead"),
        help="record directories (default experiments/records/bench_lookahead, committed)",
    )
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--summary-only", action="store_true", help="summarise the records so far; run nothing")
    args = ap.parse_args()
    if "math500" in args.tasks.split(",") and not args.data:
        ap.error("--data: give the MATH-500 JSONL (a 'problem', 'answer', 'level' per line) for the math500 task")
    torch.set_num_threads(os.cpu_count() or 1)
    engine = None
    if not args.summary_only:
        engine = sd.Engine.embedded() if args.model == "embedded" else sd.Engine.from_pretrained(resolve(args.model))
    rows, payload = [], []
    tokenizer = getattr(engine, "tokenizer", None)  # raw prompts: only a chat template would need it
    for task_name, (task, stop) in tasks(args.tasks.split(","), args.limit, args.data, tokenizer).items():
        for name in args.methods.split(","):
            spec = METHODS[name]
            sampler = parse_method(spec, {}).sampler
            out = os.path.join(args.out, f"{args.model}-{task_name}-{name}")
            os.makedirs(out, exist_ok=True)
            t0, path = time.perf_counter(), os.path.join(out, "results.jsonl")
            if engine is not None:
                path = run_eval(
                    task,
                    engine,
                    sampler,
                    method_name(spec),
                    out,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=1,  # one problem per call: the counters (forwards above all) are its own
                    stop=stop,  # type: ignore[arg-type]
                    continuous=False,
                    progress=True,
                )
            ran = time.perf_counter() - t0
            if not os.path.exists(path):
                continue
            wanted = {p["unique_id"] for p in task.problems}
            recs = [r for r in map(json.loads, open(path)) if r["uid"] in wanted]
            recs = [r for r in recs if "error" not in r]
            n = max(1, len(recs))
            mean = lambda key: sum(float(r.get(key) or 0) for r in recs) / n  # noqa: E731
            row = {
                "model": args.model,
                "task": task_name,
                "method": name,
                "spec": spec,
                "problems": len(recs),
                "accuracy": sum(bool(r["correct"]) for r in recs) / n,
                "length": sum(weighted_length(r) for r in recs) / n,
                "decode_tokens": mean("decode_tokens"),
                "rollout_tokens": mean("rollout_tokens"),
                "forwards": mean("forwards"),
                "wall_s": mean("wall_time"),
                "this_run_s": ran if engine is not None else None,
            }
            payload.append(row)
            rows.append(
                [
                    task_name,
                    name,
                    row["problems"],
                    f"{row['accuracy']:.3f}",
                    f"{row['length']:.0f}",
                    f"{row['decode_tokens']:.0f}",
                    f"{row['rollout_tokens']:.0f}",
                    f"{row['forwards']:.0f}",
                    f"{row['wall_s']:.2f}",
                ]
            )
    header = ["task", "method", "problems", "accuracy", "length", "decode tok", "rollout tok", "forwards", "wall s"]
    print("per problem:")
    print_table(header, rows)
    by = {(r["task"], r["method"]): r for r in payload}
    for task_name in {r["task"] for r in payload}:
        plain, mh = by.get((task_name, "t4")), by.get((task_name, "suffix_mh"))
        for name in ("lookahead", "lookahead_block", "smc_lookahead_block", "smc_lookahead"):
            r = by.get((task_name, name))
            if r is None:
                continue
            parts = [f"{task_name} {name}:"]
            if plain and plain["forwards"]:
                parts.append(f"{r['forwards'] / plain['forwards']:.2f}x plain's forwards")
            if mh and mh["forwards"]:
                parts.append(f"{r['forwards'] / mh['forwards']:.2f}x SuffixMH's forwards")
            print(" ".join(parts))
    config = {k: getattr(args, k) for k in ("model", "limit", "tasks", "max_new_tokens")}
    print(write_results(f"bench_lookahead{args.tag}", {"config": config, "methods": METHODS, "rows": payload}))


if __name__ == "__main__":
    main()
