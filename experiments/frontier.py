"""Accuracy against compute: every method family at several budgets, on the same problems.

A budget is a method's mean decode tokens per problem, as the engine counts them (rollouts and
rejected proposals included). Families, all with proposal T = 1/4 and the same seed:

* ``low_temp``: one T = 1/4 sample;
* ``vote_N``: N T = 1/4 samples, majority vote over the answers (MATH: the boxed answer;
  HumanEval: the normalised completion);
* ``bestof_N`` (HumanEval): N T = 1/4 samples, the one the ``public-tests`` reward (docstring
  examples only) scores highest, the first of equals (target = that reward alone, ``--select
  target``);
* ``smc_N``: power SMC, N particles, α = 4; ``smc8_aA``: 8 particles at α = A ∈ {2, 8};
* ``mh_K``: suffix MH on p^4, K moves per 64-token block (128 for MATH);
* ``lookahead``: block-lookahead SMC at one CPU-sized setting.

The baselines are read off a pool: the largest ``vote_N`` run that graded every problem holds N
independent T = 1/4 samples per problem, and its first M are M independent T = 1/4 samples, so
``low_temp`` (the first sample), ``vote_M`` (the majority over the first M) and ``bestof_M`` (the
first of the best by the ``public-tests`` reward over the first M) for every M ≤ N follow from it
with the law of their own runs, at their own budget (a sample of T tokens costs T − 1 decode
steps: its first token comes from the prompt's prefill). One pool run therefore gives every
baseline row up to its size, and the rows are nested (each doubling adds samples to the same
ones), which is what the doubling tests compare. Baseline rows that were also run on their own
are compared with the ones read off the pool (``pool_check``: the accuracy of each and the problems
on which they differ): the same law, so they differ by sampling noise, and by llama.cpp's
batch-dependent rounding alone where the run drew the same samples (``bestof_N`` against a
``vote_N`` pool: same sampler, same seeds). By default the largest pool (``vote_16``) runs first,
since it gives every baseline row, then the power methods, cheapest first, so a stopped run has
every baseline and the small power budgets complete, and each power row is compared with the
baselines the moment it lands. ``--methods`` may still name a smaller ``vote_N``, ``low_temp`` or
``bestof_N`` to run one on its own (a pool check).

Every method runs through ``run_eval`` (``results.py``: resumable records, one directory per
method under ``experiments/records/frontier/TASK``). Then, from the records of the problems every
finished method has graded:

* the accuracy-vs-budget plot (log x, 95% Wilson intervals, a line per budget family, the α variants as points):
  ``experiments/results/frontier_TASK.png``;
* a table and ``experiments/results/frontier_TASK.json``;
* paired exact McNemar tests of each power method against the vote at the nearest budget (log
  scale), and (HumanEval) against best-of-N at the nearest budget;
* per family, where more budget stops paying: the first point that no larger budget of the
  family beats significantly (McNemar p < 0.05); each budget family (vote, best-of, SMC, MH)
  starts at ``low_temp``, which is what it is with one sample, one particle or no move; and the
  family's largest budget against that start;
* at 8 particles, power SMC with alpha = 2 and 8 against alpha = 4 (paired, the same budget);
* the fraction of problems only power methods solve at the largest budget (solved by the largest
  power SMC or MH run, by no baseline row at any budget).

    python experiments/frontier.py humaneval --model qwen2.5-coder-0.5b-instruct --backend llamacpp --n-ctx 98304
    python experiments/frontier.py math500 --data PATH/math500.jsonl --model qwen2.5-coder-0.5b-instruct \\
        --backend llamacpp --n-ctx 98304
    python experiments/frontier.py humaneval --model embedded --limit 2 --methods low_temp,vote_2 --out DIR  # smoke

Rerun the same command to resume; ``--summary-only`` analyses what is recorded. About 32 rows are
in flight (``in_flight``: 32 problems of one sample, 4 of 8 particles): on one CPU core llama.cpp's
unified KV cache decodes 32 rows of 200 tokens at 2.4x the rate of 128 (``bench_kv_layout.py``).
Every sampler here but the lookahead streams, so a problem's samples depend on this only through
llama.cpp's batch-dependent rounding, which can flip a sample at a near-tie; the runs before this
rule kept 16 problems in flight (8 for the 16-row methods).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from results import run  # type: ignore[import-not-found]

from smcdecode.cli import _task as cli_task
from smcdecode.cli import build_parser
from smcdecode.demo import wilson
from smcdecode.errors import SmcdecodeError
from smcdecode.evaluate import choose
from smcdecode.report import mcnemar
from smcdecode.tasks import Task

from common import RECORDS, write_results  # type: ignore[import-not-found]
from common import RESULTS as RESULTS_DIR

T, LA = "proposal=tempered:temperature=0.25", "block-lookahead:alpha=4,particles=4,block_size=16,candidates=2"
BASELINES = ("low_temp", "vote", "bestof")
BUDGET_FAMILIES = ("vote", "bestof", "smc", "mh")  # each a curve over budget, starting at low_temp
POWER = ("smc", "smc8_a", "mh", "lookahead")
LEGEND = {"smc8_a": "smc, 8 particles, other α"}
DEFAULTS = {
    "humaneval": ["--prompt", "raw", "--max-new-tokens", "384"],
    "math500": ["--prompt", "chat", "--levels", "1,2", "--max-new-tokens", "512"],
}


def methods(task: str) -> dict[str, tuple[str, str]]:
    """label -> (method spec, answer selection), cheapest first (roughly)."""
    block = 64 if task == "humaneval" else 128
    out: dict[str, tuple[str, str]] = {"low_temp": (f"ancestral:n=1;{T}", "sample")}
    for n in (2, 4, 8, 16):
        out[f"vote_{n}"] = (f"ancestral:n={n};{T}", "majority")
        if task == "humaneval":
            out[f"bestof_{n}"] = (f"ancestral:n={n};target=reward:name=public-tests;{T}", "target")
        out[f"smc_{n}"] = (f"smc:particles={n};target=power:alpha=4;{T}", "sample")
    for k in (1, 2, 4, 8):
        out[f"mh_{k}"] = (f"mh:chains=1,block_size={block},steps={k};target=power:alpha=4;{T}", "sample")
    for a in (2, 8):
        out[f"smc8_a{a}"] = (f"smc:particles=8;target=power:alpha={a};{T}", "sample")
    out["lookahead"] = (f"{LA},rollouts=2,horizon=16;{T}", "sample")
    return dict(sorted(out.items(), key=lambda kv: _rank(kv[0])))


ROWS = 32  # rows in flight: llama.cpp's unified KV decodes 32 rows 2.4x faster than 128 on a CPU core


def default_methods(table: dict[str, tuple[str, str]]) -> list[str]:
    """The largest pool first (every baseline row is read off it), then the power methods in
    ``table``'s order (cheapest first)."""
    pool = max((x for x in table if family(x) == "vote"), key=_size)
    return [pool] + [x for x in table if family(x) in POWER]


def in_flight(label: str) -> int:
    """Problems in flight, so that about ``ROWS`` rows decode at once (a row per sample, particle or
    chain; the lookahead, which does not stream, a batch of its 4 particles)."""
    rows = {"low_temp": 1, "mh": 1, "smc8_a": 8, "lookahead": 4}.get(family(label), _size(label))
    return max(1, ROWS // rows)


def _rank(label: str) -> float:
    """A guess of the budget (in T = 1/4 samples) for the order of the runs."""
    fam, n = family(label), _size(label)
    return {"low_temp": 1, "vote": n, "bestof": n + 0.1, "smc": n + 0.2, "mh": 1 + 2 * n, "smc8_a": 8.5}.get(fam, 40)


def family(label: str) -> str:
    if label.startswith("smc8_a"):
        return "smc8_a"
    return label.split("_")[0] if "_" in label and label != "low_temp" else label


def _size(label: str) -> int:
    tail = label.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 1


class Judge:
    """The task's grade and ``public-tests`` reward of a pool's samples, each (problem, answer)
    computed once and kept in ``cache`` (a JSON file beside the records, so a summary grades and
    runs nothing twice, and machine load on a later summary cannot flip a sandbox timeout). A
    pool record's own verdicts come first: its chosen answer's, and every sample's when all or
    none of them were correct (``n_correct``, where every sample was graded)."""

    def __init__(self, task: Task, pool: dict[str, dict[str, Any]], cache: str | None = None) -> None:
        self.task, self.cache = task, cache
        self.problem = {str(p["unique_id"]): p for p in task.adapter.problems}
        self.known: dict[tuple[str, Any], bool] = {}
        self.rewards: dict[tuple[str, str], float] = {}
        if cache and os.path.exists(cache):
            with open(cache) as f:
                saved = json.load(f)
            self.known.update({(u, a): bool(v) for u, a, v in saved["grades"]})
            self.rewards.update({(u, c): float(v) for u, c, v in saved["rewards"]})
        for uid, r in pool.items():
            if r.get("n_correct") in (0, r["n_samples"]):
                for s in r["samples"]:
                    self.known[(uid, task.adapter.answer(s["text"]))] = r["n_correct"] > 0
            self.known[(uid, r["answer"])] = bool(r["correct"])

    def grade(self, uid: str, answer: Any) -> bool:
        if (uid, answer) not in self.known:
            self.known[(uid, answer)] = bool(self.task.adapter.grade(self.problem[uid], answer))
        return self.known[(uid, answer)]

    def reward(self, uid: str, text: str) -> float:
        """The ``public-tests`` reward as a ``bestof_N`` run's target holds it (a float32 log π)."""
        code = self.task.adapter.answer(text)  # the reward sees the extracted completion only
        if (uid, code) not in self.rewards:
            r = self.task.rewards["public-tests"](self.task.adapter.prompt(self.problem[uid]), text)
            self.rewards[(uid, code)] = float(np.float32(r))
        return self.rewards[(uid, code)]

    def save(self) -> None:
        if self.cache:
            grades = [[u, a, v] for (u, a), v in self.known.items()]
            rewards = [[u, c, v] for (u, c), v in self.rewards.items()]
            with open(self.cache + ".tmp", "w") as f:
                json.dump({"grades": grades, "rewards": rewards}, f)
            os.replace(self.cache + ".tmp", self.cache)


def read_off_pool(
    pool: dict[str, dict[str, Any]], size: int, answer: Callable[[str | None], Any], judge: Judge, best_of: bool
) -> dict[str, dict[str, dict[str, Any]]]:
    """Baseline records (label -> uid -> ``answer``, ``correct``, ``decode_tokens``) from a pool run of
    ``size`` independent samples per problem: ``low_temp`` is its first sample, ``vote_M`` the
    majority (``choose(..., "majority")``, as ``run_eval`` grades it) over the first M, ``bestof_M``
    the first of the highest rewards over the first M, for M = 2, 4, 8, 16 up to ``size``. A sample
    of T tokens costs T − 1 decode steps (the first comes from the prompt's prefill)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    answers_of = {uid: [answer(s["text"]) for s in rec["samples"][:size]] for uid, rec in pool.items()}
    for m in [1] + [m for m in (2, 4, 8, 16) if m <= size]:
        for kind in ["low_temp"] if m == 1 else ["vote", "bestof"] if best_of else ["vote"]:
            label = kind if m == 1 else f"{kind}_{m}"
            out[label] = {}
            for uid, rec in pool.items():
                first, answers = rec["samples"][:m], answers_of[uid][:m]
                if kind == "vote":  # equal weights: the most frequent answer, the first of equals
                    samples = [SimpleNamespace(log_weight=s["log_weight"], log_target=None) for s in first]
                    i = choose(samples, answers, "majority", None)  # type: ignore[arg-type]
                elif kind == "bestof":
                    scores = [judge.reward(uid, s["text"]) for s in first]
                    i = scores.index(max(scores))
                else:
                    i = 0
                out[label][uid] = {
                    "answer": answers[i],
                    "correct": judge.grade(uid, answers[i]),
                    "decode_tokens": sum(s["tokens"] - 1 for s in first),
                }
    return out


def analyse(task: str, out: str, results_dir: str, judged: Task | None = None) -> dict[str, Any]:
    """The summary of the records under ``out``: every method of the task's table that has graded
    every problem graded so far. ``judged``: the task, to grade and reward the samples of the
    baseline pool (None: baselines only as run on their own)."""
    recs: dict[str, dict[str, dict[str, Any]]] = {}
    for label in methods(task):
        path = os.path.join(out, label, "results.jsonl")
        if os.path.exists(path):
            recs[label] = {r["uid"]: r for r in map(json.loads, open(path))}
    if not recs:
        return {}
    complete = max(len(v) for v in recs.values())
    done = {k: v for k, v in recs.items() if len(v) == complete}  # methods that graded every problem so far
    pools = [k for k in done if family(k) == "vote"]
    pool_label, pool_check = None, []
    if pools and judged is not None:
        pool_label = max(pools, key=_size)
        pool = done[pool_label]
        judge = Judge(judged, pool, os.path.join(out, "judged.json"))
        derived = read_off_pool(pool, _size(pool_label), judged.adapter.answer, judge, task == "humaneval")
        judge.save()
        for label, by_uid in derived.items():
            mine = recs.get(label, {})
            own = [u for u in by_uid if u in mine]
            if own and label != pool_label:
                pool_check.append(
                    {
                        "method": label,
                        "problems": len(own),
                        "run_accuracy": sum(bool(mine[u]["correct"]) for u in own) / len(own),
                        "pool_accuracy": sum(by_uid[u]["correct"] for u in own) / len(own),
                        "differ": sum(bool(mine[u]["correct"]) != by_uid[u]["correct"] for u in own),
                        "answers_differ": sum(mine[u]["answer"] != by_uid[u]["answer"] for u in own),
                    }
                )
            done[label] = by_uid
    shared = sorted(set.intersection(*(set(v) for v in done.values())))
    rows = []
    for label, by_uid in done.items():
        ok = [bool(by_uid[u]["correct"]) for u in shared]
        k, n = sum(ok), len(ok)
        lo, hi = wilson(k, n)
        # the lookahead's candidates and rollouts run on forks and are counted apart from its decode tokens
        budget = sum(by_uid[u].get("decode_tokens", 0) + by_uid[u].get("rollout_tokens", 0) for u in shared) / n
        rows.append(
            {
                "method": label,
                "family": family(label),
                "problems": n,
                "correct": k,
                "accuracy": k / n,
                "wilson95": [lo, hi],
                "decode_tokens": budget,
            }
        )
    rows.sort(key=lambda r: (r["family"], r["decode_tokens"]))
    ok_of = {label: [bool(done[label][u]["correct"]) for u in shared] for label in done}
    paired = []
    for fams in (("vote", "low_temp"), ("bestof", "low_temp")):  # the vote, then the verifier
        base = [r for r in rows if r["family"] in fams]
        if not any(r["family"] == fams[0] for r in base):
            continue
        for r in rows:
            if r["family"] not in POWER:
                continue
            near = min(base, key=lambda v: abs(math.log(v["decode_tokens"] + 1) - math.log(r["decode_tokens"] + 1)))
            test = mcnemar(ok_of[r["method"]], ok_of[near["method"]])
            paired.append({"method": r["method"], "against": near["method"], **test})
    bends = {}
    for fam in sorted({r["family"] for r in rows} & set(BUDGET_FAMILIES)):
        pts = _curve(rows, fam)
        # the first point that no larger budget of the family beats significantly (one step at a
        # time would stop at any step that changes nothing, e.g. vote_2, which keeps the first
        # sample's answer on a 1-1 tie, so it is low_temp on every problem where that has one)
        bend = next(
            a
            for k, a in enumerate(pts)
            if not any(_better(ok_of[b["method"]], ok_of[a["method"]]) for b in pts[k + 1 :])
        )
        largest = mcnemar(ok_of[pts[-1]["method"]], ok_of[pts[0]["method"]])
        bends[fam] = {
            "method": bend["method"],
            "accuracy": bend["accuracy"],
            # the largest budget against the start (fixed in advance, not the best-looking point)
            "largest_vs_start": {"method": pts[-1]["method"], "against": pts[0]["method"], **largest},
        }
    # alpha at 8 particles: each other alpha against alpha = 4 (smc_8), the same budget
    alpha = [
        {"method": m, "against": "smc_8", **mcnemar(ok_of[m], ok_of["smc_8"])}
        for m in sorted(ok_of)
        if family(m) == "smc8_a" and "smc_8" in ok_of
    ]
    power_top = [
        max((r for r in rows if r["family"] == f), key=lambda r: r["decode_tokens"])
        for f in ("smc", "mh")
        if any(r["family"] == f for r in rows)
    ]
    baseline = [r["method"] for r in rows if r["family"] in BASELINES]
    only_power = None
    if power_top and baseline:
        solved = {u for p in power_top for u, c in zip(shared, ok_of[p["method"]]) if c}
        by_base = {u for m in baseline for u, c in zip(shared, ok_of[m]) if c}
        only_power = len(solved - by_base) / len(shared)
    summary = {
        "task": task,
        "problems": len(shared),
        "rows": rows,
        "paired": paired,
        "bends": bends,
        "alpha": alpha,
        "only_power_fraction": only_power,
        "power_top": [p["method"] for p in power_top],
        "pool": pool_label,
        "pool_check": pool_check,
        "incomplete": sorted(set(recs) - set(done)),
    }
    _print(summary)
    os.makedirs(results_dir, exist_ok=True)
    _plot(rows, task, os.path.join(results_dir, f"frontier_{task}.png"))
    print(write_results(f"frontier_{task}", summary, results_dir))
    return summary


def _print(s: dict[str, Any]) -> None:
    print(f"\n{s['task']}: {s['problems']} problems graded by every finished method")
    print("| method | decode tok/problem | solved | accuracy [95% Wilson] |\n|---|---|---|---|")
    for r in sorted(s["rows"], key=lambda r: (r["decode_tokens"], r["method"])):  # a Markdown table, by budget
        lo, hi = r["wilson95"]
        solved = f"{r['correct']}/{r['problems']}"
        print(f"| {r['method']} | {r['decode_tokens']:.0f} | {solved} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |")
    for p in s["paired"]:
        print(
            f"McNemar {p['method']} vs {p['against']}: {p['b']} only {p['method']}, {p['c']} only "
            f"{p['against']}, p = {p['p']:.3f}"
        )
    for fam, b in s["bends"].items():
        t = b["largest_vs_start"]
        print(
            f"{fam}: more budget stops paying after {b['method']} (accuracy {b['accuracy']:.3f}); "
            f"{t['method']} against {t['against']}: {t['b']} vs {t['c']} discordant, p = {t['p']:.3f}"
        )
    for a in s.get("alpha", []):
        print(f"alpha: {a['method']} vs {a['against']} (alpha = 4): {a['b']} vs {a['c']} discordant, p = {a['p']:.3f}")
    if s["only_power_fraction"] is not None:
        print(f"solved only by power methods ({', '.join(s['power_top'])}): {s['only_power_fraction']:.3f}")
    if s["pool"]:
        print(f"baselines read off {s['pool']}; against their own runs:")
        for c in s["pool_check"]:
            print(
                f"  {c['method']}: run {c['run_accuracy']:.3f}, pool {c['pool_accuracy']:.3f}, "
                f"verdicts differ on {c['differ']} of {c['problems']} problems, answers on {c['answers_differ']}"
            )
    if s["incomplete"]:
        print(f"not yet complete (left out): {', '.join(s['incomplete'])}")


def _better(ok_b: list[bool], ok_a: list[bool]) -> bool:
    """b solves significantly more than a (exact McNemar, p < 0.05)."""
    test = mcnemar(ok_b, ok_a)
    return bool(test["b"] > test["c"] and test["p"] < 0.05)


def _curve(rows: list[dict[str, Any]], fam: str) -> list[dict[str, Any]]:
    """A family's points by budget. The budget families start at one T = 1/4 sample, which is what
    each of them is with one sample, particle or no move (``low_temp``)."""
    pts = [r for r in rows if r["family"] == fam]
    start = [r for r in rows if r["family"] == "low_temp"] if fam in BUDGET_FAMILIES else []
    return start + pts


def _plot(rows: list[dict[str, Any]], task: str, path: str) -> None:
    from smcdecode.plots import figure, finish

    fig, ax = figure((6.5, 4.2))
    for k, fam in enumerate(sorted({r["family"] for r in rows})):
        pts = _curve(rows, fam)
        x = [r["decode_tokens"] * 1.015**k for r in pts]  # a small offset per family keeps the bars apart
        y = [r["accuracy"] for r in pts]
        err = [[r["accuracy"] - r["wilson95"][0] for r in pts], [r["wilson95"][1] - r["accuracy"] for r in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o-" if fam in BUDGET_FAMILIES else "s", capsize=3, label=LEGEND.get(fam, fam))
        if fam == "smc8_a":  # alpha at 8 particles: each point says its alpha
            for r, xi, yi in zip(pts, x, y):
                ax.annotate(
                    f"α={r['method'].removeprefix('smc8_a')}",
                    (xi, yi),
                    fontsize=7,
                    xytext=(4, 0),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    ax.set_title(f"{task}: accuracy against decode tokens")
    lo = min(r["wilson95"][0] for r in rows)
    hi = max(r["wilson95"][1] for r in rows)
    ylim = (max(0.0, lo - 0.05), min(1.0, hi + 0.05))
    print(finish(fig, ax, path, "decode tokens per problem (log; families offset slightly)", "accuracy", ylim, 7))


def judged_task(task: str, rest: list[str]) -> Task | None:
    """Every problem of the task as the runs were given it, parsed by the CLI's own ``eval`` parser
    (``--limit``, ``--skip`` and ``--shard`` dropped: a pool holds every problem), for grading and
    rewards; None, with a note, when the task cannot be loaded (MATH-500 without ``--data``)."""
    if task == "math500" and not any(a == "--data" or a.startswith("--data=") for a in rest):
        print("baselines only as run on their own (no pool read): MATH-500 needs --data", file=sys.stderr)
        return None
    argv = ["eval", task, "--method", "-", "--out", "-", *DEFAULTS[task], *rest]
    args, _ = build_parser().parse_known_args(argv)
    args.limit, args.skip, args.shard = None, 0, None
    try:
        return cli_task(args, None)
    except SmcdecodeError as e:
        print(f"baselines only as run on their own (no pool read): {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in DEFAULTS:
        sys.exit(f"usage: frontier.py {{{'|'.join(DEFAULTS)}}} [--methods a,b] [--out DIR] [smcdecode eval options]")
    task, argv = sys.argv[1], sys.argv[2:]
    table = methods(task)
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--methods", default=",".join(default_methods(table)))
    ap.add_argument("--out", default=os.path.join(RECORDS, "frontier", task))
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--summary-only", action="store_true")
    ours, rest = ap.parse_known_args(argv)
    labels = ours.methods.split(",")
    unknown = [x for x in labels if x not in table]
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    if not ours.summary_only:
        scratch = ["--out", ours.out, "--results-dir", os.path.join("runs", "frontier_scratch"), "--tag", f"_{task}"]
        for label in labels:  # one at a time, in default_methods' order unless --methods names them
            fit = [] if "--batch-size" in rest else ["--batch-size", str(in_flight(label))]
            run(task, {label: table[label]}, DEFAULTS[task], ["--methods", label, *scratch, *fit, *rest])
    analyse(task, ours.out, ours.results_dir, judged_task(task, rest))
