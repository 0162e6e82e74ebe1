"""The frontier script end to end on the embedded model: two problems, two methods, then its
analysis (table, paired tests, plot, results JSON) read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
def test_frontier_smoke(tmp_path):
    out, res = tmp_path / "records", tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "frontier.py"), "humaneval", "--model", "embedded"]
    cmd += ["--limit", "2", "--max-new-tokens", "12", "--methods", "low_temp,smc_2"]
    cmd += ["--out", str(out), "--results-dir", str(res)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((res / "frontier_humaneval.json").read_text())
    assert summary["problems"] == 2 and {r["method"] for r in summary["rows"]} == {"low_temp", "smc_2"}
    by = {r["method"]: r for r in summary["rows"]}
    assert by["smc_2"]["decode_tokens"] > by["low_temp"]["decode_tokens"] > 0  # two particles cost more than one
    assert [p["method"] for p in summary["paired"]] == ["smc_2"]  # the power method, against a baseline
    assert (res / "frontier_humaneval.png").stat().st_size > 0
    for label in ("low_temp", "smc_2"):
        recs = [json.loads(x) for x in open(out / label / "results.jsonl")]
        assert len(recs) == 2
    # resuming computes nothing new
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert len((out / "smc_2" / "results.jsonl").read_text().splitlines()) == 2
