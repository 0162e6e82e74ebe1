"""HumanEval through the evaluation path with and without the harness's stop sequences.

For each (model, method, stops) it runs ``smcdecode.evaluate.run_eval`` on the first ``--limit``
problems into its own directory under ``--out`` (resumable: rerun the same command and finished
problems are skipped), then reads the records back and reports, per problem: decode tokens (the
engine's counter, the work), kept tokens (the graded samples' length), wall seconds, generated
tokens per second, and pass@1. Results: ``experiments/results/bench_eval[TAG].json``.

    python experiments/bench_eval.py --model embedded --limit 48
    python experiments/bench_eval.py --model qwen2.5-coder-0.5b-instruct --limit 48 --methods ancestral --tag _qwen
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import smcdecode as sd
from smcdecode.cli import parse_stop
from smcdecode.evaluate import TaskAdapter, run_eval
from smcdecode.models import resolve
from smcdecode.spec import method_name, parse_method
from smcdecode.tasks import humaneval as h

from common import print_table, write_results

METHODS = {
    "ancestral": "ancestral:n=1;proposal=tempered:temperature=0.25",
    "mh": "mh:chains=1,block_size=64,steps=2;target=power:alpha=4;proposal=tempered:temperature=0.25",
    "block": "block:chains=1,block_size=64,steps=2,span=16,suffix_every=2;target=power:alpha=4;"
    "proposal=tempered:temperature=0.25",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a registry name or a path (default embedded)")
    ap.add_argument("--limit", type=int, default=48, help="first N HumanEval problems (default 48)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    ap.add_argument("--batch-size", type=int, default=8, help="problems per sampler call (default 8)")
    ap.add_argument("--methods", default="ancestral,mh", help=f"comma-separated from {sorted(METHODS)}")
    ap.add_argument("--out", default="runs/bench_eval", help="record directories (default runs/bench_eval)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    engine = sd.Engine.embedded() if args.model == "embedded" else sd.Engine.from_pretrained(resolve(args.model))
    problems = h.load()[: args.limit]
    task = TaskAdapter("humaneval", problems, lambda p: h.prompt(p, "raw"), h.extract, h.grade, grade_all=True)
    rows, payload = [], []
    for name in args.methods.split(","):
        spec = METHODS[name]
        sampler = parse_method(spec, {}).sampler
        for stops_label, stop in (("none", None), ("harness", parse_stop(None, h.STOP_SEQUENCES))):
            out = os.path.join(args.out, f"{args.model}-{name}-{stops_label}")
            path = run_eval(
                task,
                engine,
                sampler,
                method_name(spec),
                out,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                stop=stop,
            )
            recs = [json.loads(x) for x in open(path)]
            n = len(recs)
            decode = sum(r.get("decode_tokens", 0) for r in recs) / n
            kept = sum(r["tokens"] for r in recs) / n
            wall = sum(r["wall_time"] for r in recs) / n
            passed = sum(bool(r["correct"]) for r in recs) / n
            row = {
                "model": args.model,
                "method": name,
                "stops": stops_label,
                "problems": n,
                "decode_tokens": decode,
                "kept_tokens": kept,
                "wall_s": wall,
                "tok_per_s": decode / wall,
                "pass@1": passed,
            }
            payload.append(row)
            rows.append(
                [
                    name,
                    stops_label,
                    n,
                    f"{decode:.0f}",
                    f"{kept:.0f}",
                    f"{wall:.2f}",
                    f"{decode / wall:.1f}",
                    f"{passed:.3f}",
                ]
            )
    header = [
        "method",
        "stops",
        "problems",
        "decode tok/problem",
        "kept tok/problem",
        "wall s/problem",
        "decode tok/s",
        "pass@1",
    ]
    print_table(header, rows)
    config = {k: getattr(args, k) for k in ("model", "limit", "max_new_tokens", "batch_size")}
    print(write_results(f"bench_eval{args.tag}", {"config": config, "methods": METHODS, "rows": payload}))


if __name__ == "__main__":
    main()
