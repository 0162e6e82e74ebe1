"""End to end on both backends: the first N HumanEval problems with low temperature (T = 1/4),
power suffix MH and power SMC (8 particles, α = 4), the settings of ``results_humaneval.py``,
on the HF backend and on the llama.cpp backend, same GGUF file, same seed.

Each (method, backend) pair runs through ``results_humaneval.py`` (``run_eval``: continuous
batching, durable records, resume) into ``experiments/records/backends_humaneval/BACKEND/METHOD``;
the pairs alternate between backends, so a machine that gets busier affects both alike. Then
per method: pass@1 on each backend with an exact McNemar test between them, decode tokens per
problem and busy wall seconds per problem, and the wall ratio llama.cpp / HF. Rerun the same
command to resume; ``--summary-only`` summarises what is recorded.

    python experiments/backends_humaneval.py [--limit 48] [--methods low_temp,power_mh,power_smc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from smcdecode.demo import wilson
from smcdecode.report import busy_wall, mcnemar

from common import RECORDS, print_table, write_results  # type: ignore[import-not-found]

BACKENDS = ("llamacpp", "hf")
HERE = os.path.dirname(os.path.abspath(__file__))


def records(out: str, backend: str, method: str, limit: int) -> list[dict[str, Any]]:
    path = os.path.join(out, backend, method, "results.jsonl")
    if not os.path.exists(path):
        return []
    recs = [json.loads(line) for line in open(path)]
    order = {f"HumanEval/{i}": i for i in range(limit)}
    return [r for r in recs if r["uid"] in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--methods", default="low_temp,power_mh,power_smc")
    ap.add_argument("--out", default=os.path.join(RECORDS, "backends_humaneval"))
    ap.add_argument("--n-ctx", type=int, default=65536, help="llama.cpp KV cells (16 problems x 8 particles)")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if not args.summary_only:
        for method in methods:
            for backend in BACKENDS:
                cmd = [sys.executable, os.path.join(HERE, "results_humaneval.py"), "--model", args.model]
                cmd += ["--methods", method, "--limit", str(args.limit), "--backend", backend]
                cmd += ["--out", os.path.join(args.out, backend), "--tag", f"_backends_{backend}"]
                cmd += ["--results-dir", os.path.join(args.out, backend)]
                if backend == "llamacpp":
                    cmd += ["--n-ctx", str(args.n_ctx)]
                print(" ".join(cmd), file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True)
    rows, payload = [], []
    for method in methods:
        by = {b: records(args.out, b, method, args.limit) for b in BACKENDS}
        if not all(by.values()):
            continue
        uids = sorted(set.intersection(*({r["uid"] for r in v} for v in by.values())))
        ok = {b: {r["uid"]: bool(r["correct"]) for r in v} for b, v in by.items()}
        test = mcnemar([ok["hf"][u] for u in uids], [ok["llamacpp"][u] for u in uids])
        row: dict[str, Any] = {"method": method, "problems": len(uids), "mcnemar_hf_vs_llamacpp": test}
        for b, v in by.items():
            kept = [r for r in v if r["uid"] in set(uids)]
            k = sum(ok[b][u] for u in uids)
            row[b] = {
                "correct": k,
                "wilson95": wilson(k, len(uids)),
                "decode_tokens": sum(r.get("decode_tokens", 0) for r in kept) / len(uids),
                "wall_s": busy_wall(kept) / len(uids),
            }
        payload.append(row)
        hf, lc = row["hf"], row["llamacpp"]
        rows.append(
            [
                method,
                len(uids),
                f"{hf['correct']} / {lc['correct']}",
                f"{test['b']} vs {test['c']}, p={test['p']:.2f}",
                f"{hf['decode_tokens']:.0f} / {lc['decode_tokens']:.0f}",
                f"{hf['wall_s']:.1f} / {lc['wall_s']:.1f}",
                f"{lc['wall_s'] / hf['wall_s']:.2f}",
            ]
        )
    print_table(
        [
            "method",
            "problems",
            "solved HF / llama.cpp",
            "McNemar (only HF vs only llama.cpp)",
            "decode tok/problem",
            "wall s/problem",
            "wall llama.cpp / HF",
        ],
        rows,
    )
    print(write_results("backends_humaneval", {"model": args.model, "limit": args.limit, "rows": payload}))


if __name__ == "__main__":
    main()
