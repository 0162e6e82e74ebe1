"""Smoke test of the results scripts: two problems, a few tokens, the embedded model, every
method; then a rerun resumes (records nothing new)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH500 = os.path.join(ROOT, "..", "shared", "data", "math500.jsonl")


@pytest.mark.parametrize("task", ["humaneval", "math500"])
def test_results_script_runs_every_method_and_resumes(tmp_path, task):
    if task == "math500" and not os.path.exists(MATH500):
        pytest.skip("the MATH-500 JSONL is not beside this checkout")
    args = [sys.executable, os.path.join(ROOT, "experiments", f"results_{task}.py"), "--model", "embedded"]
    args += ["--limit", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "runs")]
    args += ["--results-dir", str(tmp_path / "results")]
    if task == "math500":
        args += ["--data", MATH500]
    env = {**os.environ, "PYTHONPATH": ROOT}
    for _ in range(2):  # the second run resumes: every record is already there
        subprocess.run(args, check=True, env=env, capture_output=True, timeout=900)
    summary = json.loads((tmp_path / "results" / f"results_{task}.json").read_text())
    methods = {r["method"] for r in summary["rows"]}
    assert methods and all(r["problems"] == 2 for r in summary["rows"])
    for m in methods:
        lines = (tmp_path / "runs" / m / "results.jsonl").read_text().splitlines()
        assert len(lines) == 2  # not duplicated by the rerun
    assert (tmp_path / "results" / f"results_{task}.png").exists()
