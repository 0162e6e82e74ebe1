"""Ray executor against the single-process run: MATH-500 problems with the embedded model.

Three runs of the same evaluation, each into a fresh directory: in this process, on 1 Ray worker
holding every CPU (the same torch threads as this process), and on 2 Ray workers with one CPU
each. Wall time counts from the call to the last record and includes loading the model (once
here, once per worker there); starting the local Ray instance is timed apart (a cluster runs
already). "s/problem" is the steady-state interval between records (last - first record time
over n - 1). Overhead = Ray 1 worker / single process - 1. "same tokens" is the fraction of
samples whose tokens equal the single-process run's (seeds follow the problem id; CPU float
reductions can differ in the last bits with the thread count, which is why the 2-worker run
is compared too).

    python experiments/bench_ray.py --data PATH/math500.jsonl [--problems 24] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from typing import Any

import torch

from smcdecode import Engine
from smcdecode.evaluate import TaskAdapter, run_eval
from smcdecode.executors import RayExecutor
from smcdecode.records import read_jsonl
from smcdecode.spec import method_name, parse_method
from smcdecode.tasks import Task, load_task

from common import print_table, write_results

METHOD = "smc:particles=4;target=power:alpha=4;proposal=tempered:temperature=0.5"


def adapter(data: str, problems: int) -> TaskAdapter:
    return build_task(data, problems).adapter


def build_task(data: str, problems: int) -> Task:
    task = load_task("math500", data=data)
    task.adapter.problems = task.adapter.problems[:problems]
    return task


def build(data: str, problems: int, method: str, device: str) -> tuple[TaskAdapter, Engine, Any]:
    """Task, engine and sampler of the benchmark (called here, and inside each Ray worker)."""
    engine = Engine.embedded(device=device)
    task = build_task(data, problems)
    return task.adapter, engine, parse_method(method, task.rewards).sampler


def timed(label: str, fn: Any, out: str) -> dict[str, Any]:
    t0 = time.time()
    fn(out)
    wall = time.time() - t0
    recs = list(read_jsonl(os.path.join(out, "results.jsonl")))
    stamps = sorted(r["time"] for r in recs)
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"run": label, "wall_s": wall, "s_per_problem": steady, "records": recs}


def same_tokens(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Fraction of samples with the same length and text in both runs (by problem id)."""
    ref = {r["uid"]: r["samples"] for r in a}
    pairs = [(x, y) for r in b for x, y in zip(r["samples"], ref[r["uid"]])]
    return sum(x["text"] == y["text"] and x["tokens"] == y["tokens"] for x, y in pairs) / max(1, len(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="MATH-500 JSONL")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--method", default=METHOD)
    args = ap.parse_args()
    import ray

    data, name, cpus = os.path.abspath(args.data), method_name(args.method), os.cpu_count() or 1
    recipe = functools.partial(build, data, args.problems, args.method)
    task = adapter(data, args.problems)  # the driver needs the problems only
    load_before = os.getloadavg()
    root = tempfile.mkdtemp(prefix="bench_ray_")
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "progress": False}

    def single(out: str) -> None:
        t, engine, sampler = recipe("cpu")
        run_eval(t, engine, sampler, name, out, **kw)

    def on_ray(workers: int, out: str) -> None:
        ex = RayExecutor(recipe, workers=workers, cpus_per_worker=cpus // workers)
        run_eval(task, None, None, name, out, executor=ex, **kw)

    runs = [timed("single process", single, os.path.join(root, "single"))]
    t0 = time.time()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.time() - t0
    for workers in (1, 2):
        label = f"Ray, {workers} worker{'s' if workers > 1 else ''}"
        runs.append(timed(label, functools.partial(on_ray, workers), os.path.join(root, f"ray{workers}")))
    ray.shutdown()
    base = runs[0]
    rows, table = [], []
    for r in runs:
        row = {
            "run": r["run"],
            "wall_s": round(r["wall_s"], 1),
            "s_per_problem": round(r["s_per_problem"], 2),
            "wall_vs_single": round(r["wall_s"] / base["wall_s"], 3),
            "same_tokens_as_single": round(same_tokens(base["records"], r["records"]), 4),
            "records": len(r["records"]),
        }
        rows.append(row)
        table.append(list(row.values()))
    print_table(["run", "wall s", "s/problem", "wall / single", "same tokens", "records"], table)
    overhead = runs[1]["wall_s"] / base["wall_s"] - 1
    print(f"Ray start-up (local instance, not in the wall times): {ray_start:.1f} s")
    print(f"Ray overhead at 1 worker: {100 * overhead:+.1f}% of the single-process wall time")
    path = write_results(
        "bench_ray",
        {
            "config": {
                "problems": args.problems,
                "max_new_tokens": args.max_new_tokens,
                "method": name,
                "model": "embedded (SmolLM2-135M-Instruct)",
                "device": "cpu",
                "torch_threads_single": torch.get_num_threads(),
                "ray": ray.__version__,
            },
            "runs": rows,
            "ray_start_s": round(ray_start, 1),
            "overhead_1_worker": round(overhead, 4),
            "load_average_before_after": [list(load_before), list(os.getloadavg())],
            "note": "the CPUs are shared with other jobs; load averages above show how busy the machine was",
        },
    )
    print(path)


if __name__ == "__main__":
    main()
