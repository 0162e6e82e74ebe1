"""``smcdecode report DIR...``: accuracy with a Wilson 95% interval, pass@k where every sample
was graded, generated tokens and wall time per (task, method); a plot of accuracy against
generated tokens per method.

Wall time per problem is :func:`busy_wall` / n: a batch-at-a-time record holds its share of its
batch's wall time; a streamed record (continuous batching) holds the span from its admission to
its grading, and the problems in flight overlap, so their busy time is the union of the spans."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from smcdecode.demo import format_table, wilson
from smcdecode.records import read_jsonl


def busy_wall(records: Sequence[dict[str, Any]], streamed: bool | None = None) -> float:
    """Seconds the method kept the machine busy, from its records alone (so killed and resumed
    runs count right): the sum of the batch-at-a-time records' shares plus the length of the union
    of the streamed records' spans [time − wall_time, time]. ``streamed`` overrides the records'
    own ``streamed`` flag (records written before the flag existed).

    Args:
        records: One method's evaluation records (``wall_time``, ``time``, ``streamed``).
        streamed: Treat every record as streamed (True) or batch-at-a-time (False); None: each
            record's own flag.

    Returns:
        Busy seconds.
    """

    def is_streamed(r: dict[str, Any]) -> bool:
        return bool(r.get("streamed")) if streamed is None else streamed

    total = sum(float(r.get("wall_time", 0.0)) for r in records if not is_streamed(r))
    spans = sorted(
        (r["time"] - r["wall_time"], r["time"]) for r in records if is_streamed(r) and "time" in r and "wall_time" in r
    )
    end = float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of two methods graded on the same problems (paired, one entry each).

    Only the discordant problems count: b = a right and b wrong, c = the reverse. Under H0 (equal
    accuracy) b ~ Binomial(b + c, 1/2); the two-sided p-value is min(1, 2 · P(X ≤ min(b, c))).

    Args:
        correct_a: Method A's correctness per problem.
        correct_b: Method B's correctness on the same problems, in the same order.

    Returns:
        ``{"n": problems, "b": ..., "c": ..., "p": ...}``.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"correct_b: {len(correct_b)} entries, correct_a has {len(correct_a)}")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m if m else 1.0
    return {"n": len(correct_a), "b": b, "c": c, "p": min(1.0, 2.0 * tail)}


def load_records(dirs: Sequence[str]) -> list[dict[str, Any]]:
    """Records of every DIR/results.jsonl (shards merge here); a (task, uid, method, seed, run)
    seen twice is counted once.

    Args:
        dirs: Run directories (each holding ``results.jsonl``) or JSONL files.

    Returns:
        The records in the order read, duplicates dropped.
    """
    seen, out = set(), []
    for d in dirs:
        path = os.path.join(d, "results.jsonl") if os.path.isdir(d) else d
        for r in read_jsonl(path):
            key = (r.get("task"), r.get("uid"), r.get("method"), r.get("seed"), r.get("run"))
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: accuracy with its Wilson interval, tokens, decode and rollout tokens and
    busy wall time per problem, errors, and pass@k when every record was graded per sample.
    Records of one (task, method) with different seeds or run definitions (``run``, see
    ``smcdecode.runs``) are kept apart, the method named with the seed and run id.

    Args:
        records: Evaluation records (``load_records``).

    Returns:
        The rows, sorted by task and method.
    """
    from smcdecode.tasks.humaneval import pass_at_k

    groups: dict[tuple[str, str, Any, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r.get("task", "?"), r.get("method", "?"), r.get("seed"), r.get("run") or "")].append(r)
    runs_of: dict[tuple[str, str], int] = defaultdict(int)
    for task, method, _, _ in groups:
        runs_of[(task, method)] += 1
    rows = []
    for (task, method, seed, run), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if runs_of[(task, method)] > 1:
            method = f"{method} [seed {seed}" + (f", run {run[:8]}]" if run else "]")
        n, k = len(rs), sum(bool(r.get("correct")) for r in rs)
        lo, hi = wilson(k, n)
        row: dict[str, Any] = {
            "task": task,
            "method": method,
            "n": n,
            "accuracy": k / n,
            "ci": (lo, hi),
            "tokens": sum(r.get("tokens", 0) for r in rs) / n,
            # the work: tokens fed to the model (MH's rejected proposals, SMC's dropped particles)
            "decode_tokens": (
                sum(r["decode_tokens"] for r in rs) / n if all("decode_tokens" in r for r in rs) else None
            ),
            # lookahead rollouts (not part of decode_tokens); 0 for samplers without them
            "rollout_tokens": sum(r.get("rollout_tokens") or 0 for r in rs) / n,
            "wall_time": busy_wall(rs) / n,
            "errors": sum(1 for r in rs if r.get("error")),
        }
        graded = [r for r in rs if r.get("n_correct") is not None and r.get("n_samples")]
        if graded and len(graded) == n:
            kmax = min(r["n_samples"] for r in graded)
            row["pass_at"] = {
                kk: sum(pass_at_k(r["n_samples"], r["n_correct"], kk) for r in graded) / n for kk in sorted({1, kmax})
            }
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows of ``summarise`` as a Markdown table.

    Args:
        rows: Rows from :func:`summarise`.
    """
    header = [
        "task",
        "method",
        "n",
        "accuracy [95% CI]",
        "pass@k",
        "kept tok/problem",
        "decode tok/problem",
        "wall s/problem",
        "errors",
    ]
    rollouts = any(r.get("rollout_tokens") for r in rows)  # a column only when some method has rollouts
    if rollouts:
        header.insert(7, "rollout tok/problem")
    cells = []
    for r in rows:
        pk = ", ".join(f"@{k}={v:.3f}" for k, v in r.get("pass_at", {}).items()) or "-"
        row = [
            r["task"],
            r["method"],
            str(r["n"]),
            f"{r['accuracy']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]",
            pk,
            f"{r['tokens']:.0f}",
            "-" if r.get("decode_tokens") is None else f"{r['decode_tokens']:.0f}",
            f"{r['wall_time']:.2f}",
            str(r["errors"]),
        ]
        if rollouts:
            row.insert(7, f"{r.get('rollout_tokens', 0):.0f}")
        cells.append(row)
    return format_table(cells, header)


def plot(rows: list[dict[str, Any]], path: str) -> str:
    """Plot accuracy against decode tokens per problem (tokens when a record lacks them), one point per
    (task, method) with its interval, into the PNG ``path``; returns ``path``.

    Args:
        rows: Rows from :func:`summarise`.
        path: The PNG file to write.
    """
    from smcdecode.plots import figure, finish

    decode = all(r.get("decode_tokens") is not None for r in rows)  # the work, when every record has it
    fig, ax = figure((6, 4))
    for r in rows:
        lo, hi = r["ci"]
        err = [[r["accuracy"] - lo], [hi - r["accuracy"]]]
        x = r["decode_tokens"] if decode else r["tokens"]
        ax.errorbar([x], [r["accuracy"]], yerr=err, fmt="o", capsize=3, label=f"{r['task']}: {r['method']}"[:60])
    xlabel = "decode tokens per problem (the work)" if decode else "generated tokens per problem"
    return finish(fig, ax, path, xlabel, "accuracy", (0, 1), legend_size=6)
