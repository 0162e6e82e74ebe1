"""llama.cpp's two KV layouts: decode tokens/s against the batch's total context.

With one unified pool (``kv_unified=True``, the default) every token's attention walks every live
cell of the pool, masking other sequences' cells, so a step slows as the batch's *total* context
grows; with a stream per sequence (``kv_unified=False``) each row attends over its own cells only,
at a per-stream cost. For each (layout, rows, context) this prefills ``rows`` distinct contexts
of ``context`` tokens, then times ``--steps`` decode steps of every row at once (each
configuration in its own process, as one would run it). Prints a table and writes
``experiments/results/bench_kv_layout.json``.

    python experiments/bench_kv_layout.py --model qwen2.5-coder-0.5b-instruct --rows 64 --contexts 16,300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import print_table, write_results


def one(model: str, unified: bool, rows: int, context: int, steps: int, threads: int) -> float:
    """Decode tokens/s of ``rows`` rows at ``context`` tokens each (run in this process)."""
    import numpy as np

    from smcdecode.backends.llamacpp import LlamaCppBackend
    from smcdecode.models import resolve

    n_ctx = rows * (context + steps) + 256 if unified else rows * 256 * -(-(context + steps) // 256)
    be = LlamaCppBackend(resolve(model), n_ctx=n_ctx, n_seq_max=rows, n_threads=threads, kv_unified=unified)
    ids = np.array(be._alloc(rows), dtype=np.int32)
    for s in ids.tolist():  # distinct sequences: nothing shared
        tok = (np.arange(context, dtype=np.int32) * 7 + s) % 1000 + 100
        be._run(tok, np.arange(context, dtype=np.int32), np.full(context, s, np.int32), np.zeros(context, np.int8))
    t0 = time.perf_counter()
    for k in range(steps):
        be._run(np.full(rows, 100, np.int32), np.full(rows, context + k, np.int32), ids, np.ones(rows, np.int8))
    return rows * steps / (time.perf_counter() - t0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--rows", default="64", help="comma-separated row counts")
    ap.add_argument("--contexts", default="16,300", help="comma-separated context lengths")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # unified,rows,context: a child run
    args = ap.parse_args()
    if args.one:
        u, r, c = args.one.split(",")
        print(json.dumps(one(args.model, u == "1", int(r), int(c), args.steps, args.threads)))
        sys.exit(0)
    rows_out, payload = [], []
    for rows in map(int, args.rows.split(",")):
        for context in map(int, args.contexts.split(",")):
            rate = {}
            for unified in (True, False):
                cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps)]
                cmd += ["--threads", str(args.threads), "--one", f"{int(unified)},{rows},{context}"]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rate[unified] = float(done.stdout.strip().splitlines()[-1])
            payload.append({"rows": rows, "context": context, "unified_tok_s": rate[True], "split_tok_s": rate[False]})
            rows_out.append(
                [rows, context, f"{rate[True]:.1f}", f"{rate[False]:.1f}", f"{rate[False] / rate[True]:.2f}"]
            )
            print_table(["rows", "context", "unified tok/s", "split tok/s", "split / unified"], rows_out)
    config = {"model": args.model, "threads": args.threads, "steps": args.steps}
    print(write_results("bench_kv_layout", {"config": config, "rows": payload}))
