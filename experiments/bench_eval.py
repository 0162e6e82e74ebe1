"""HumanEval through the evaluation path with and without the harness's stop sequences.

For each (model, method, stops) it runs ``smcdecode.evaluate.run_eval`` on the first ``--limit``
problems into its own directory under ``--out`` (resumable: rerun the same command and finished
problems are skipped), then reads the records back and reports, per problem: decode tokens (the
work), kept tokens (the graded samples' length), wall seconds, and pass@1; and for the run:
generated (decode) tokens per second, against the engine's plain batched decode rate at the same
number of rows. Configurations: ``before`` (no stop strings, ``--batch-size`` problems at a
time, the batch running to its longest sample), ``stops`` (the harness's stop strings, batch at
a time) and ``after`` (stop strings and continuous batching: a finished problem's rows take the
next problem at once). Results: ``experiments/results/bench_eval[TAG].json``.

    python experiments/bench_eval.py --model embedded --limit 48
    python experiments/bench_eval.py --model qwen2.5-coder-0.5b-instruct --limit 48 --methods ancestral --tag _qwen

SMC batch at a time against SMC streamed (each problem's own SMC loop on its rows, problems
admitted as others finish) and streamed Ancestral with as many rows busy (8 samples a problem):

    python experiments/bench_eval.py --model qwen2.5-coder-0.5b-instruct --backend llamacpp \
        --methods smc,ancestral8 --configs stops,after --max-new-tokens 384 --batch-size 16 \
        --plain-rows 128 --tag _smc_stream_llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

import smcdecode as sd
from smcdecode.cli import parse_stop
from smcdecode.evaluate import run_eval
from smcdecode.models import resolve
from smcdecode.spec import method_name, parse_method
from smcdecode.tasks import load_task

from common import print_table, write_results

METHODS = {
    "ancestral": "ancestral:n=1;proposal=tempered:temperature=0.25",
    "mh": "mh:chains=1,block_size=64,steps=2;target=power:alpha=4;proposal=tempered:temperature=0.25",
    "block": "block:chains=1,block_size=64,steps=2,span=16,suffix_every=2;target=power:alpha=4;"
    "proposal=tempered:temperature=0.25",
    "smc": "smc:particles=8;target=power:alpha=4;proposal=tempered:temperature=0.25",
    "ancestral8": "ancestral:n=8;proposal=tempered:temperature=0.25",  # the rows of 8 particles
}


CONFIGS = (  # (label, stop strings, continuous batching)
    ("before", "none", False),
    ("stops", "harness", False),
    ("after", "harness", True),
)


def plain_decode_rate(engine: sd.Engine, rows: int, steps: int = 32) -> float:
    """Tokens/s of the engine's plain batched decode (one prompt, ``rows`` rows, no sampler)."""
    batch, _ = engine.start(engine.encode(["def f(x):\n    return"]), rows)
    tok = torch.full((rows,), engine.encode(["x"])[0][-1], dtype=torch.long, device=engine.device)
    active = torch.ones(rows, dtype=torch.bool, device=engine.device)
    for _ in range(4):
        engine.decode(batch, tok, active)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.decode(batch, tok, active)
    return rows * steps / (time.perf_counter() - t0)


def run_wall(out: str, fn: Callable[[], str]) -> tuple[str, float | None]:
    """Run ``fn`` (a run_eval call) and keep its wall time in ``out/run_wall.json`` when it ran
    every problem from scratch; a resumed run keeps the first complete measurement, if any."""
    marker = os.path.join(out, "run_wall.json")
    fresh = not os.path.exists(os.path.join(out, "results.jsonl"))
    t0 = time.perf_counter()
    path = fn()
    wall = time.perf_counter() - t0
    if fresh:
        with open(marker, "w") as f:
            json.dump({"wall_s": wall}, f)
    if os.path.exists(marker):
        with open(marker) as f:
            return path, json.load(f)["wall_s"]
    return path, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a registry name or a path (default embedded)")
    ap.add_argument("--limit", type=int, default=48, help="first N HumanEval problems (default 48)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    ap.add_argument("--batch-size", type=int, default=8, help="problems in the batch (default 8)")
    ap.add_argument("--methods", default="ancestral,mh", help=f"comma-separated from {sorted(METHODS)}")
    ap.add_argument("--configs", default="before,stops,after", help="comma-separated from before, stops, after")
    ap.add_argument("--out", default="runs/bench_eval", help="record directories (default runs/bench_eval)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--backend", default="hf", choices=["hf", "llamacpp"])
    ap.add_argument("--n-ctx", type=int, default=98304, help="llamacpp: KV cells (default 98304)")
    ap.add_argument("--plain-rows", type=int, default=None, help="rows of the plain decode rate (default batch size)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    ap.add_argument("--kv-split", action="store_true", help="llamacpp: a KV stream per sequence (kv_unified=False)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.backend == "llamacpp":
        engine = sd.Engine.from_gguf(
            args.model,
            backend="llamacpp",
            n_ctx=args.n_ctx,
            n_threads=torch.get_num_threads(),
            kv_unified=not args.kv_split,
        )
    else:
        engine = sd.Engine.embedded() if args.model == "embedded" else sd.Engine.from_pretrained(resolve(args.model))
    humaneval = load_task("humaneval")
    task = humaneval.adapter
    task.problems = task.problems[: args.limit]
    plain_rows = args.plain_rows or args.batch_size
    plain = plain_decode_rate(engine, plain_rows)
    print(f"plain batched decode, {plain_rows} rows: {plain:.1f} tok/s")
    rows, payload = [], []
    wanted = args.configs.split(",")
    for name in args.methods.split(","):
        spec = METHODS[name]
        sampler = parse_method(spec, {}).sampler
        for label, stops_label, continuous in (c for c in CONFIGS if c[0] in wanted):
            stop = parse_stop(None, humaneval.stop) if stops_label == "harness" else None
            layout = "-split" if args.kv_split else ""
            out = os.path.join(args.out, f"{args.model}-{args.backend}{layout}-{name}-{label}")
            os.makedirs(out, exist_ok=True)
            path, total = run_wall(
                out,
                lambda: run_eval(
                    task,
                    engine,
                    sampler,
                    method_name(spec),
                    out,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    stop=stop,
                    continuous=continuous,
                ),
            )
            recs = [json.loads(x) for x in open(path)]
            n = len(recs)
            decode = sum(r.get("decode_tokens", 0) for r in recs)
            prefill = sum(r.get("prefill_tokens", 0) for r in recs)
            kept = sum(r["tokens"] for r in recs) / n
            passed = sum(bool(r["correct"]) for r in recs) / n
            rate = decode / total if total else None
            row = {
                "model": args.model,
                "method": name,
                "config": label,
                "stops": stops_label,
                "continuous": continuous,
                "problems": n,
                "decode_tokens": decode / n,
                "prefill_tokens": prefill / n,
                "kept_tokens": kept,
                "wall_s": total / n if total else None,
                "tok_per_s": rate,
                "all_tok_per_s": (decode + prefill) / total if total else None,
                "vs_plain_decode": rate / plain if rate else None,
                "pass@1": passed,
            }
            payload.append(row)
            fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
            rows.append(
                [
                    name,
                    label,
                    stops_label,
                    "yes" if continuous else "no",
                    n,
                    f"{decode / n:.0f}",
                    f"{prefill / n:.0f}",
                    f"{kept:.0f}",
                    fmt(row["wall_s"], ".2f"),
                    fmt(rate, ".1f"),
                    fmt(row["vs_plain_decode"], ".2f"),
                    fmt(row["all_tok_per_s"], ".1f"),
                    f"{passed:.3f}",
                ]
            )
    header = [
        "method",
        "config",
        "stops",
        "continuous",
        "problems",
        "decode tok/problem",
        "prefill tok/problem",
        "kept tok/problem",
        "wall s/problem",
        "decode tok/s",
        "vs plain decode",
        "prefill+decode tok/s",
        "pass@1",
    ]
    print_table(header, rows)
    keys = ("model", "backend", "limit", "max_new_tokens", "batch_size", "n_ctx", "kv_split")
    config = {k: getattr(args, k) for k in keys}
    config["plain_decode_tok_per_s"], config["plain_rows"] = plain, plain_rows
    print(write_results(f"bench_eval{args.tag}", {"config": config, "methods": METHODS, "rows": payload}))


if __name__ == "__main__":
    main()
