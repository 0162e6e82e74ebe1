"""Peak memory of ``smcdecode demo`` against the number of problems: it must stay flat, since a
run keeps only what is in flight (one chunk of problems per sampler call).

Each ``--limit`` runs in its own process (``python -m smcdecode.cli demo``), so its peak resident
set size (``ru_maxrss`` of the finished child, from ``os.wait4``) is its own; the output
directory's size on disk is reported too. While the child runs, its RSS is polled (``/proc``) and
the peak during each chunk of each method is recorded: flat memory means a method's last chunk
peaks no higher than its first. Prints a table and writes
experiments/results/bench_memory.json.

    python experiments/bench_memory.py [--limits 10,60,150] [--max-new-tokens 6]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from common import print_table, write_results


def disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def rss_kib(pid: int) -> int:
    """The current resident set size of process ``pid`` (Linux ``/proc``; 0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(limit: int, max_new_tokens: int, work: str) -> dict[str, Any]:
    """Run the demo on ``limit`` problems in a child process: its peak RSS, wall time and disk, and
    a trace of the peak RSS during each chunk (a chunk ends when the demo writes its
    ``result_M_KKK.json``: method M, chunk KKK)."""
    out = os.path.join(work, f"demo-{limit}")
    cmd = [sys.executable, "-m", "smcdecode.cli", "demo", "--limit", str(limit), "--out", out]
    cmd += ["--max-new-tokens", str(max_new_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr_chunks: list[bytes] = []
    threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True).start()  # type: ignore[union-attr]
    trace: list[dict[str, Any]] = []  # one entry per chunk: method, chunk, peak RSS while it ran
    seen: set[str] = set()
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the child with its rusage
        if pid:
            break
        peak = max(peak, rss_kib(proc.pid))
        names = os.listdir(out) if os.path.isdir(out) else []
        done = sorted(f for f in names if f.startswith("result_") and f not in seen)
        for name in done:  # result_M_KKK.json
            seen.add(name)
            m, k = name[len("result_") : -len(".json")].split("_")
            trace.append({"method": int(m), "chunk": int(k), "peak_rss_gb": round(peak / 2**20, 3)})
            peak = 0
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    stderr = b"".join(stderr_chunks).decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"demo --limit {limit} failed:\n{stderr[-2000:]}")
    rss = usage.ru_maxrss  # KiB on Linux (bytes on macOS)
    rss_gb = rss / 2**20 if sys.platform != "darwin" else rss / 2**30
    return {
        "limit": limit,
        "peak_rss_gb": round(rss_gb, 3),
        "wall_s": round(wall, 1),
        "disk_mb": disk_bytes(out) / 1e6,
        "chunks": trace,
    }


def first_last(run: dict[str, Any]) -> str:
    """Per method, the peak RSS during its first and its last chunk (GB), e.g. ``1.80/1.81``."""
    by_method: dict[int, list[float]] = {}
    for c in sorted(run["chunks"], key=lambda c: (c["method"], c["chunk"])):
        by_method.setdefault(c["method"], []).append(c["peak_rss_gb"])
    return "  ".join(f"{v[0]:.2f}/{v[-1]:.2f}" for _, v in sorted(by_method.items()))


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
        ["--limit", "peak RSS (GB)", "first/last chunk peak per method (GB)", "wall (s)", "disk (MB)"],
        [
            [r["limit"], f"{r['peak_rss_gb']:.2f}", first_last(r), f"{r['wall_s']:.0f}", f"{r['disk_mb']:.1f}"]
            for r in runs
        ],
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
