"""Smoke test of the results scripts: two problems, a few tokens, the embedded model, every
method; then a rerun resumes (records nothing new), and a rerun with another model definition is
refused."""

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
    m = sorted(methods)[0]
    stored = json.loads((tmp_path / "runs" / m / "run.json").read_text())
    assert stored["model"]["name"] == "embedded" and stored["backend"] == "hf" and stored["dtype"] == "float32"
    other = subprocess.run([*args, "--methods", m, "--dtype", "bfloat16"], env=env, capture_output=True, text=True)
    assert other.returncode != 0 and "holds another run" in other.stderr and "dtype" in other.stderr
    assert len((tmp_path / "runs" / m / "results.jsonl").read_text().splitlines()) == 2


def test_contrast_layer_is_chosen_on_the_held_out_problems_and_then_run(tmp_path):
    script = [sys.executable, os.path.join(ROOT, "experiments", "results_humaneval.py"), "--model", "embedded"]
    common = ["--max-new-tokens", "4", "--results-dir", str(tmp_path / "results")]
    env = {**os.environ, "PYTHONPATH": ROOT}
    select = [*script, "--select-contrast-layer", "10,20", "--limit", "1", "--out", str(tmp_path / "sel"), *common]
    subprocess.run(select, check=True, env=env, capture_output=True, timeout=900)
    rows = json.loads((tmp_path / "results" / "results_humaneval_contrast_layers.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"contrast_L10", "contrast_L20"}
    for layer in (10, 20):  # held out: the candidates ran on the last problems only
        rec = json.loads((tmp_path / "sel" / f"contrast_L{layer}" / "results.jsonl").read_text())
        assert rec["uid"] == "HumanEval/144"
    missing = subprocess.run([*script, "--methods", "layer_contrast"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "--contrast-layer" in missing.stderr
    run = [*script, "--contrast-layer", "20", "--methods", "layer_contrast", "--limit", "1", *common]
    subprocess.run([*run, "--out", str(tmp_path / "runs")], check=True, env=env, capture_output=True, timeout=900)
    rec = json.loads((tmp_path / "runs" / "layer_contrast" / "results.jsonl").read_text())
    assert rec["uid"] == "HumanEval/0" and "layer=20" in rec["method"]
