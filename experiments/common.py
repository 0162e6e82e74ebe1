"""Helpers shared by the benchmark scripts: timing, table printing, results files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from smcdecode.demo import format_table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Eval records of the long experiments, committed so a run resumes on another machine or checkout.
RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records")


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    print(format_table([[str(c) for c in r] for r in rows], header))


def write_results(name: str, payload: dict[str, Any], directory: str = RESULTS) -> str:
    os.makedirs(directory, exist_ok=True)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        **payload,
    }
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
