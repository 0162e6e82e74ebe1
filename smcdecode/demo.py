"""The main job: base sampling, low-temperature sampling, and power sampling (suffix MH and
SMC) side by side on the built-in arithmetic task with the embedded model.

Every method draws one answer per problem: Ancestral's sample, the MH chain's final state, or one
SMC particle drawn with probability equal to its weight. Problems go CHUNK at a time through the
sampler, so memory is bounded by one chunk in flight, whatever ``limit`` is. The table reports accuracy with a
Wilson 95% interval, the mean per-token log-likelihood of the answers, the decode tokens the
engine computed, and the wall time.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from smcdecode import heap, proposals, samplers, targets
from smcdecode.backends import Backend, Engine
from smcdecode.errors import check_finite_positive, check_int
from smcdecode.evaluate import choose
from smcdecode.tasks import arithmetic


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def methods(alpha: float) -> list[tuple[str, samplers.Sampler]]:
    low = proposals.Tempered(1.0 / alpha)
    power = targets.Power(alpha)
    return [
        ("base T=1", samplers.Ancestral(proposals.Tempered(1.0))),
        (f"low-temp T=1/{alpha:g}", samplers.Ancestral(low)),
        (f"power MH a={alpha:g}", samplers.SuffixMH(power, low, chains=1, block_size=3, steps=4)),
        (f"power SMC a={alpha:g}", samplers.SMC(power, low, particles=8, ess_threshold=0.5)),
    ]


@dataclass
class Row:
    method: str
    correct: int
    n: int
    loglik_per_token: float
    decode_tokens: int
    wall_time: float

    def cells(self) -> list[str]:
        lo, hi = wilson(self.correct, self.n)
        return [
            self.method,
            f"{self.correct / self.n:.3f} [{lo:.2f}, {hi:.2f}]",
            f"{self.loglik_per_token:.3f}",
            str(self.decode_tokens),
            f"{self.wall_time:.1f}",
        ]


HEADER = ["method", "accuracy [95% CI]", "loglik/token", "decode tokens", "wall s"]


def format_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


CHUNK = 16  # problems per sampler call: the rows in flight (SMC: CHUNK x particles)


def run_demo(
    engine: Backend | None = None,
    *,
    limit: int = 150,
    out: str = "runs/demo",
    alpha: float = 4.0,
    seed: int = 0,
    max_new_tokens: int = 6,
    progress: bool | None = None,
    chunk: int = CHUNK,
) -> list[Row]:
    """Run every method on ``limit`` problems, ``chunk`` problems per sampler call (the call with
    problems k·chunk, ... seeded ``seed + k``), and write ``out/results.jsonl`` (one record per
    method and problem, written as each chunk ends), ``out/result_M_K.json`` (method M's Result
    of chunk K, for ``smcdecode plot``), ``out/table.md`` and the plots.

    Memory is bounded by one chunk in flight: a chunk's Result is written and dropped before the
    next starts; what is kept across chunks is per-method counters and the :class:`PlotData`
    sums (one float per sample for the log-likelihood histogram)."""
    from smcdecode.plots import PlotData, plot_all

    check_int("limit", limit, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("chunk", chunk, 1)
    check_finite_positive("alpha", alpha)
    os.makedirs(out, exist_ok=True)
    base = engine if engine is not None else Engine.embedded()
    eng = base.with_eos_tokens(base.token_ids_containing("\n"))  # an answer ends at its newline
    probs = arithmetic.problems(limit, seed=seed)
    rows: list[Row] = []
    plots: list[tuple[str, PlotData]] = []
    records_path = os.path.join(out, "results.jsonl")
    with open(records_path, "w") as f:
        for m, (name, sampler) in enumerate(methods(alpha)):
            rng = random.Random(seed)
            data = PlotData()
            correct, ll, ntok, decode_tokens, wall = 0, 0.0, 0, 0, 0.0
            for k, start in enumerate(range(0, len(probs), chunk)):
                part = probs[start : start + chunk]
                prompts = [arithmetic.prompt(p) for p in part]
                res = sampler.run(eng, prompts, max_new_tokens=max_new_tokens, seed=seed + k, progress=progress)
                for prob, per in zip(part, res.samples):
                    s = per[choose(per, [], "sample", rng)]  # drawn by weight (uniform for one sample)
                    ok = arithmetic.grade(prob, s.text)
                    correct += ok
                    ll += s.log_p
                    ntok += len(s.tokens)
                    rec: dict[str, Any] = {
                        "uid": prob.uid,
                        "kind": prob.kind,
                        "method": name,
                        "spec": res.method,
                        "answer": prob.answer,
                        "prediction": arithmetic.extract(s.text),
                        "correct": ok,
                        "text": s.text,
                        "log_p": s.log_p,
                        "tokens": len(s.tokens),
                        "seed": seed,
                    }
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                res.save(os.path.join(out, f"result_{m}_{k:03d}.json"))
                data.merge(PlotData.of(res))
                decode_tokens += res.counters["decode_tokens"]
                wall += res.wall_time
                del res
                heap.trim(collect=True)  # the next chunk starts from what it needs
            rows.append(Row(name, correct, len(probs), ll / max(1, ntok), decode_tokens, wall))
            plots.append((name, data))
    plot_all(plots, out)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(format_table([r.cells() for r in rows]) + "\n")
    return rows


def main_demo(
    limit: int,
    out: str,
    alpha: float,
    seed: int,
    max_new_tokens: int,
    engine: Backend | None = None,
) -> None:
    t0 = time.perf_counter()
    rows = run_demo(engine, limit=limit, out=out, alpha=alpha, seed=seed, max_new_tokens=max_new_tokens)
    print(format_table([r.cells() for r in rows]))
    print(
        f"\n{limit} problems, total {time.perf_counter() - t0:.0f} s; records in {out}/results.jsonl, plots in {out}/"
    )
