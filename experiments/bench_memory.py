"""Peak memory of ``smcdecode demo`` against the number of problems: it must stay flat, since a
run keeps only what is in flight (one chunk of problems per sampler call).

Each ``--limit`` runs in its own process (``python -m smcdecode.cli demo``), so its peak resident
set size (``ru_maxrss`` of the finished child, from ``os.wait4``) is its own; the output
directory's size on disk is reported too. Prints a table and writes
experiments/results/bench_memory.json.

    python experiments/bench_memory.py [--limits 10,60,150] [--max-new-tokens 6]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import print_table, write_results


def disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def measure(limit: int, max_new_tokens: int, work: str) -> dict[str, float]:
    """Run the demo on ``limit`` problems in a child process: its peak RSS, wall time and disk."""
    out = os.path.join(work, f"demo-{limit}")
    cmd = [sys.executable, "-m", "smcdecode.cli", "demo", "--limit", str(limit), "--out", out]
    cmd += ["--max-new-tokens", str(max_new_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"demo --limit {limit} failed:\n{stderr[-2000:]}")
    rss_kib = usage.ru_maxrss  # KiB on Linux (bytes on macOS)
    rss_gb = rss_kib / 2**20 if sys.platform != "darwin" else rss_kib / 2**30
    return {"limit": limit, "peak_rss_gb": round(rss_gb, 3), "wall_s": round(wall, 1), "disk_mb": disk_bytes(out) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limits", default="10,60,150", help="problem counts, comma-separated (default 10,60,150)")
    ap.add_argument("--max-new-tokens", type=int, default=6, help="as the demo's default (6)")
    args = ap.parse_args()
    limits = [int(x) for x in args.limits.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
        for limit in limits:
            runs.append(measure(limit, args.max_new_tokens, work))
            r = runs[-1]
            print(f"--limit {limit}: peak RSS {r['peak_rss_gb']:.2f} GB, {r['wall_s']:.0f} s", flush=True)
    print_table(
        ["--limit", "peak RSS (GB)", "wall (s)", "disk (MB)"],
        [[r["limit"], f"{r['peak_rss_gb']:.2f}", f"{r['wall_s']:.0f}", f"{r['disk_mb']:.1f}"] for r in runs],
    )
    spread = max(r["peak_rss_gb"] for r in runs) - min(r["peak_rss_gb"] for r in runs)
    print(f"peak RSS spread over the limits: {spread:.2f} GB")
    path = write_results(
        "bench_memory",
        {
            "config": {
                "command": "smcdecode demo --limit N",
                "max_new_tokens": args.max_new_tokens,
                "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            },
            "runs": runs,
            "peak_rss_spread_gb": round(spread, 3),
        },
    )
    print(path)


if __name__ == "__main__":
    main()
