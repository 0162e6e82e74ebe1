"""The frontier script: its baselines read off a pool of samples (exact, on hand-made records), and
end to end on the embedded model: two problems, then its analysis (table, paired tests, plot,
results JSON) read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import frontier as module
    finally:
        sys.path.pop(0)
    return module


class Marks:
    """Grades answer "a" correct; the reward of a text is its number of "!"."""

    def grade(self, uid, answer):
        return answer == "a"

    def reward(self, uid, text):
        return float(text.count("!"))


def test_judge_reuses_verdicts_and_keeps_them(frontier, tmp_path):
    from smcdecode.evaluate import TaskAdapter
    from smcdecode.tasks import Task

    calls = []

    def grade(problem, answer):
        calls.append(("grade", answer))
        return answer == "a"

    def reward(prompt, text):
        calls.append(("reward", text))
        return 1 / 3 if "a" in text else 0.0

    adapter = TaskAdapter(
        "toy", [{"unique_id": "p"}, {"unique_id": "q"}], lambda p: "Q", lambda t: (t or "")[:1], grade
    )
    task = Task(adapter, {"public-tests": reward}, None)

    def record(answer, correct, n_correct, *texts):
        samples = [{"text": t, "tokens": 2, "log_weight": 0.0} for t in texts]
        return {
            "answer": answer,
            "correct": correct,
            "n_correct": n_correct,
            "n_samples": len(texts),
            "samples": samples,
        }

    # p: mixed verdicts, only the chosen answer's is known; q: none correct, every answer is known
    pool = {"p": record("b", False, 1, "b1", "a1", "c1"), "q": record("x", False, 0, "x1", "y1")}
    cache = str(tmp_path / "judged.json")
    judge = frontier.Judge(task, pool, cache)
    assert not judge.grade("p", "b") and not judge.grade("q", "y") and calls == []  # read off the records
    assert judge.grade("p", "a") and judge.grade("p", "a") and calls == [("grade", "a")]  # graded once
    assert judge.reward("p", "a1") == judge.reward("p", "a2")  # the reward sees the extracted answer only
    assert judge.reward("p", "a1") == float(np.float32(1 / 3)) and calls[1:] == [("reward", "a1")]
    judge.save()
    again = frontier.Judge(task, pool, cache)
    assert again.grade("p", "a") and again.reward("p", "a9") == float(np.float32(1 / 3)) and len(calls) == 2


def test_baselines_read_off_a_pool(frontier):
    def pool_record(*samples):
        return {"samples": [{"text": t, "tokens": n, "log_weight": -1.386} for t, n in samples]}

    pool = {
        # vote_2: a tie (b, a): the first answer; vote_4: a wins 3 to 1; bestof: the first of the best
        "p1": pool_record(("b!", 5), ("a!", 7), ("a!!", 3), ("a", 2)),
        # every answer missing but one: votes go to the answers there are
        "p2": pool_record(("", 4), ("", 4), ("", 4), ("a", 4)),
    }
    rows = frontier.read_off_pool(pool, 4, lambda text: (text or "")[:1], Marks(), best_of=True)
    assert set(rows) == {"low_temp", "vote_2", "bestof_2", "vote_4", "bestof_4"}
    correct = {label: {u: r["correct"] for u, r in by.items()} for label, by in rows.items()}
    assert correct["low_temp"] == {"p1": False, "p2": False}
    assert correct["vote_2"] == {"p1": False, "p2": False}  # tie b/a -> b; no answers -> the first sample
    assert correct["vote_4"] == {"p1": True, "p2": True}
    assert correct["bestof_2"] == {"p1": False, "p2": False}  # "b!" and "a!" tie: the first
    assert correct["bestof_4"] == {"p1": True, "p2": False}  # "a!!"; p2: no "!", the first ("")
    tokens = {label: {u: r["decode_tokens"] for u, r in by.items()} for label, by in rows.items()}
    assert tokens["low_temp"] == {"p1": 4, "p2": 3}  # T tokens cost T - 1 decode steps
    assert tokens["vote_2"] == tokens["bestof_2"] == {"p1": 10, "p2": 6}
    assert tokens["vote_4"] == {"p1": 13, "p2": 12}
    assert set(frontier.read_off_pool(pool, 2, lambda t: t, Marks(), best_of=False)) == {"low_temp", "vote_2"}


def test_judged_task_holds_every_problem_the_runs_were_given(frontier, tmp_path, capsys):
    """The summary grades with the task the runs had (the CLI's parser: prompt, levels, data),
    over every problem whatever ``--limit`` / ``--shard`` the runs took; MATH-500 without its data
    falls back to the rows as run, saying why."""
    task = frontier.judged_task("humaneval", ["--limit", "2", "--shard", "1/2", "--model", "embedded"])
    assert task.adapter.name == "humaneval" and len(task.adapter.problems) == 164
    assert "public-tests" in task.rewards
    assert frontier.judged_task("math500", ["--levels", "1,2"]) is None
    assert "MATH-500 needs --data" in capsys.readouterr().err
    data = tmp_path / "math.jsonl"
    rows = [{"problem": f"q{i}", "answer": str(i), "unique_id": f"u{i}", "level": 1 + i % 3} for i in range(9)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = frontier.judged_task("math500", ["--data", str(data), "--limit", "1", "--skip", "1"])
    assert [p["unique_id"] for p in task.adapter.problems] == ["u0", "u1", "u3", "u4", "u6", "u7"]  # levels 1, 2


def test_alpha_is_compared_with_alpha_4_not_given_a_budget_curve(frontier, tmp_path):
    """smc8_aA (8 particles at alpha = A) is paired with smc_8 (alpha = 4); the budget families'
    bends leave it out."""
    correct = {"low_temp": [1, 0, 0, 0], "smc_8": [1, 1, 0, 0], "smc8_a2": [1, 0, 1, 1]}
    for label, oks in correct.items():
        (tmp_path / label).mkdir()
        lines = [{"uid": f"p{i}", "correct": bool(c), "answer": "", "decode_tokens": 10} for i, c in enumerate(oks)]
        (tmp_path / label / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = frontier.analyse("humaneval", str(tmp_path), str(tmp_path / "results"))
    assert set(s["bends"]) == {"smc"} and s["bends"]["smc"]["largest_vs_start"]["method"] == "smc_8"
    (a,) = s["alpha"]
    assert (a["method"], a["against"], a["b"], a["c"], a["p"]) == ("smc8_a2", "smc_8", 2, 1, 1.0)


def test_a_budget_counts_the_lookahead_s_rollouts(frontier, tmp_path):
    """Block-lookahead SMC runs its candidate blocks and rollouts on forks (``rollout_tokens``) and
    feeds only the chosen block to the particle (``decode_tokens``): its budget is both."""
    spent = {"low_temp": (10, 0), "vote_2": (20, 0), "lookahead": (12, 30)}
    for label, (decode, rollout) in spent.items():
        (tmp_path / label).mkdir()
        lines = [
            {"uid": f"p{i}", "correct": i == 0, "answer": "", "decode_tokens": decode, "rollout_tokens": rollout}
            for i in range(3)
        ]
        (tmp_path / label / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = frontier.analyse("math500", str(tmp_path), str(tmp_path / "results"))
    assert {r["method"]: r["decode_tokens"] for r in s["rows"]} == {"low_temp": 10, "vote_2": 20, "lookahead": 42}
    (pair,) = [p for p in s["paired"] if p["method"] == "lookahead"]
    assert pair["against"] == "vote_2"  # the vote nearest 42 tokens, not the one nearest 12


def test_the_default_runs_the_largest_pool_first_then_power_cheapest_first(frontier):
    """Every baseline row is read off the largest vote pool, so smaller pools would be spent twice."""
    table = frontier.methods("math500")
    expected = ["vote_16", "smc_2", "mh_1", "smc_4", "mh_2", "smc_8", "smc8_a2", "smc8_a8", "mh_4", "smc_16", "mh_8"]
    assert frontier.default_methods(table) == [*expected, "lookahead"]
    assert [frontier.in_flight(x) for x in ("vote_16", "smc_8", "mh_8", "lookahead")] == [2, 4, 32, 8]


@pytest.mark.integration
def test_frontier_smoke(tmp_path):
    out, res = tmp_path / "records", tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "frontier.py"), "humaneval", "--model", "embedded"]
    cmd += ["--limit", "2", "--max-new-tokens", "12", "--methods", "vote_2,bestof_2,smc_2"]
    cmd += ["--out", str(out), "--results-dir", str(res)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((res / "frontier_humaneval.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["problems"] == 2 and set(rows) == {"low_temp", "vote_2", "bestof_2", "smc_2"}
    assert summary["pool"] == "vote_2"  # low_temp and bestof_2 read off its samples
    assert rows["smc_2"]["decode_tokens"] > rows["low_temp"]["decode_tokens"] > 0  # two particles cost more than one
    assert rows["vote_2"]["decode_tokens"] == rows["bestof_2"]["decode_tokens"]
    # bestof_2 run on its own draws vote_2's samples (same sampler and seeds; the HF backend is
    # deterministic), so reading it off the pool must reproduce its verdicts
    (check,) = summary["pool_check"]
    assert check["method"] == "bestof_2" and check["problems"] == 2
    assert check["differ"] == 0 and check["answers_differ"] == 0  # the same choice, not only the same verdict
    # the power method against the vote, then against best-of, each at the nearest budget
    assert [p["method"] for p in summary["paired"]] == ["smc_2", "smc_2"]
    assert [p["against"].split("_")[0] for p in summary["paired"]] in (["vote", "bestof"], ["low", "low"])
    assert (res / "frontier_humaneval.png").stat().st_size > 0
    for label in ("vote_2", "bestof_2", "smc_2"):
        recs = [json.loads(x) for x in open(out / label / "results.jsonl")]
        assert len(recs) == 2
    # resuming computes nothing new
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert len((out / "smc_2" / "results.jsonl").read_text().splitlines()) == 2
