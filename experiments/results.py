"""Shared runner of the results scripts: several methods on one task, one model loaded once.

Each method runs through ``smcdecode.evaluate.run_eval`` (the path ``smcdecode eval`` takes, with
its continuous batching, stop sequences and durable records) into ``OUT/LABEL`` (default
``experiments/records/results_TASK/LABEL``, committed with the repository, so a run stopped on one
machine resumes on another); rerunning the same command resumes every method where it stopped.
A method's ``run.json`` holds its definition as ``smcdecode eval`` writes it (model identity,
backend, dtype, prompt style, data file), so a resume with another model or backend is refused.
Then ``smcdecode.report`` prints the table and the accuracy-vs-decode-tokens plot
(``experiments/results/results_TASK[TAG].png``); a summary table (accuracy with its 95% Wilson
interval, decode tokens, wall seconds per problem) is printed and written to
``experiments/results/results_TASK[TAG].json``.

Per-problem wall seconds of continuously batched methods overlap (several problems share the
batch), so the summary's wall time per problem is the method's busy time (the union of its
records' admission-to-grading spans; across killed and resumed runs) divided by its problems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from smcdecode.cli import _engine, _task, build_parser, check_out, parse_stop, run_definition
from smcdecode.demo import wilson
from smcdecode.errors import SmcdecodeError
from smcdecode.evaluate import run_eval
from smcdecode.report import busy_wall, mcnemar, plot, summarise, table
from smcdecode.spec import method_name, parse_method

from common import RECORDS, print_table, write_results
from common import RESULTS as RESULTS_DIR


def run(task: str, methods: dict[str, tuple[str, str]], defaults: list[str], argv: list[str] | None = None) -> None:
    """``methods``: label -> (method spec, answer selection); ``defaults``: ``smcdecode eval``
    arguments of this task (the command line may override them)."""
    ap = argparse.ArgumentParser(description=f"{task} results: every method, one model, resumable")
    ap.add_argument("--methods", default=",".join(methods), help=f"comma-separated from {', '.join(methods)}")
    ap.add_argument(
        "--out",
        default=os.path.join(RECORDS, f"results_{task}"),
        help=f"one directory per method under it (default experiments/records/results_{task}, committed)",
    )
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--results-dir", default=RESULTS_DIR, help="where the summary JSON and PNG go")
    ap.add_argument("--summary-only", action="store_true", help="summarise the records so far; run nothing")
    ap.add_argument("--paired-with", default="low_temp", help="McNemar test of every method against this one")
    ours, rest = ap.parse_known_args(argv)
    args = build_parser().parse_args(["eval", task, "--method", "ancestral", "--out", ours.out, *defaults, *rest])
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset)
    unknown = [label for label in ours.methods.split(",") if label not in methods]
    if unknown:
        sys.exit(f"unknown method {unknown[0]!r}; choose from {', '.join(methods)}")
    if not ours.summary_only:  # a directory holding another run is refused before the model loads
        early = _task(args, None)
        for label in ours.methods.split(","):
            try:
                check_out(args, early, *methods[label], os.path.join(ours.out, label))
            except SmcdecodeError as e:
                sys.exit(str(e))
    engine = None if ours.summary_only else _engine(args)
    rows: list[list[Any]] = []
    payload: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    correct_of: dict[str, dict[str, bool]] = {}  # method -> uid -> correct
    for label in ours.methods.split(","):
        spec, select = methods[label]
        built = _task(args, engine)
        adapter, rewards = built.adapter, built.rewards
        sampler = parse_method(spec, rewards).sampler
        out = os.path.join(ours.out, label)
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.jsonl")
        if engine is not None:
            path = run_eval(
                adapter,
                engine,
                sampler,
                method_name(spec),
                out,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                select=select,
                batch_size=args.batch_size,
                stop=parse_stop(args.stop, built.stop),
                definition=run_definition(args, engine),  # model, backend, dtype, prompt, data
            )
        if not os.path.exists(path):
            continue
        wanted = {p["unique_id"] for p in adapter.problems}  # --limit / --shard of this command
        recs = [r for r in map(json.loads, open(path)) if r["uid"] in wanted]
        if not recs:
            continue
        for r in recs:  # records written before they carried the flag
            r.setdefault("streamed", sampler.rows_plan(1) is not None)
        kept.extend(recs)
        correct_of[label] = {r["uid"]: bool(r["correct"]) for r in recs}
        n, k = len(recs), sum(bool(r["correct"]) for r in recs)
        lo, hi = wilson(k, n)
        wall = busy_wall(recs)
        row: dict[str, Any] = {
            "method": label,
            "spec": spec,
            "select": select,
            "problems": n,
            "correct": k,
            "accuracy": k / n,
            "wilson95": [lo, hi],
            "decode_tokens": sum(r.get("decode_tokens", 0) for r in recs) / n,
            "wall_s": wall / n,
        }
        payload.append(row)
        rows.append(
            [
                label,
                n,
                f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]",
                f"{row['decode_tokens']:.0f}",
                f"{wall / n:.1f}",
            ]
        )
    print_table(["method", "problems", "accuracy [95% Wilson]", "decode tok/problem", "wall s/problem"], rows)
    paired = []
    ref = correct_of.get(ours.paired_with)
    for label, by_uid in correct_of.items():
        if ref is None or label == ours.paired_with:
            continue
        both = sorted(set(by_uid) & set(ref))  # the problems both methods have graded
        test = mcnemar([by_uid[u] for u in both], [ref[u] for u in both])
        test = {"method": label, "against": ours.paired_with, **test}
        paired.append(test)
        print(
            f"McNemar {label} vs {ours.paired_with} on {test['n']} shared problems: {test['b']} only {label} "
            f"right, {test['c']} only {ours.paired_with} right, exact two-sided p = {test['p']:.3f}"
        )
    summary = summarise(kept)
    print(table(summary))
    os.makedirs(ours.results_dir, exist_ok=True)
    print(plot(summary, os.path.join(ours.results_dir, f"results_{task}{ours.tag}.png")))
    config = {"task": task, "model": args.model, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    config["prompt"], config["seed"], config["limit"] = args.prompt, args.seed, args.limit
    summary_json = {"config": config, "rows": payload, "paired": paired}
    print(write_results(f"results_{task}{ours.tag}", summary_json, ours.results_dir))
