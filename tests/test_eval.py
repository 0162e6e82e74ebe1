"""Evaluation: MATH-500 extraction and grading, HumanEval grading in the sandbox, pass@k,
shards, crash-safe resumable records (including kill -9), reward errors, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from smcdecode import Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.evaluate import TaskAdapter, choose, parse_shard, run_eval, shard
from smcdecode.records import MalformedLineWarning, RecordWriter, read_jsonl
from smcdecode.report import load_records, summarise, table
from smcdecode.samplers.result import Sample
from smcdecode.tasks import humaneval, math500
from smcdecode.testing import CharTokenizer, tiny_llama

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "math500.jsonl")
needs_data = pytest.mark.skipif(not os.path.exists(DATA), reason="shared MATH-500 data not beside the repo")


def test_last_boxed_matches_braces():
    assert math500.last_boxed(r"so \boxed{1} then \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert math500.last_boxed(r"\boxed{x^{2}+1}") == "x^{2}+1"
    assert math500.last_boxed(r"\fbox{7}") == "7"
    assert math500.last_boxed(r"\boxed{unclosed") is None
    assert math500.last_boxed("no answer") is None


@needs_data
def test_reference_solutions_grade_correct_and_others_wrong():
    problems = math500.load(DATA)
    assert len(problems) == 500
    right = sum(math500.grade(math500.last_boxed(p["solution"]), p["answer"]) for p in problems)
    assert right >= 495, right  # the reference solutions' own boxed answers
    wrong = sum(math500.grade(problems[(i + 1) % 500]["answer"], p["answer"]) for i, p in enumerate(problems[:100]))
    assert wrong <= 5, wrong  # a different problem's answer is (almost) never equal
    assert math500.grade("0.5", r"\frac{1}{2}") and not math500.grade(None, "3")


@needs_data
def test_filters_prompts_and_malformed_lines(tmp_path):
    problems = math500.load(DATA)
    lv = math500.select(problems, levels=[1])
    assert lv and all(p["level"] == 1 for p in lv)
    sub = math500.select(problems, subjects=["algebra"])
    assert sub and all(p["subject"] == "Algebra" for p in sub)
    assert math500.prompt(problems[0]).endswith(math500.INSTRUCTION)
    bad = tmp_path / "bad.jsonl"
    lines = open(DATA).read().splitlines()[:3]
    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.warns(MalformedLineWarning, match=":2:"):
        assert len(math500.load(str(bad))) == 2


def test_humaneval_grading_in_the_sandbox():
    problems = humaneval.load()
    assert len(problems) == 164
    for p in problems[:3]:
        assert humaneval.grade(p, p["canonical_solution"])
        assert not humaneval.grade(p, "    return None\n")
        assert humaneval.public_tests_passed(p, p["canonical_solution"]) == 1.0
        assert humaneval.public_tests_passed(p, "    return None\n") < 1.0
    text = problems[0]["canonical_solution"] + "\ndef other():\n    pass\n"
    assert humaneval.extract(text) == problems[0]["canonical_solution"]


def test_pass_at_k_reference_values():
    assert humaneval.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert humaneval.pass_at_k(5, 0, 3) == 0.0 and humaneval.pass_at_k(5, 4, 2) == 1.0


def test_shards_partition_the_problems():
    problems = [{"unique_id": str(i)} for i in range(23)]
    for n in range(1, 6):
        parts = [shard(problems, i, n) for i in range(n)]
        ids = [p["unique_id"] for part in parts for p in part]
        assert sorted(ids) == sorted(p["unique_id"] for p in problems) and len(ids) == len(set(ids))
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(ValueError, match="shard"):
        parse_shard("4/4")


def test_selection_rules():
    samples = [Sample([1], "a", -1.6, 0, 0), Sample([2], "b", -1.2, 0, 0), Sample([3], "b", -0.9, 0, 0)]
    import random

    assert choose(samples, ["x", "y", "y"], "weight", random.Random(0)) == 2
    assert choose(samples, ["x", "y", "y"], "majority", random.Random(0)) == 2
    assert choose(samples, ["x", "y", "z"], "majority", random.Random(0)) == 2
    # best-of-n by log target: the highest, the first of equals; a sample without one never wins
    scored = [Sample([1], "a", -1.1, 0, 0.5), Sample([2], "b", -1.1, 0, 1.0), Sample([3], "c", -1.1, 0, 1.0)]
    assert choose(scored, ["x", "y", "z"], "target", random.Random(0)) == 1
    scored[1].log_target = None
    assert choose(scored, ["x", "y", "z"], "target", random.Random(0)) == 2


def toy_task(n: int = 6) -> TaskAdapter:
    problems = [{"unique_id": f"toy-{i}", "prompt": "ab"[i % 2] + "cd"[i % 2]} for i in range(n)]
    return TaskAdapter("toy", problems, lambda p: p["prompt"], lambda text: (text or "")[:1], lambda p, a: a == "a")


def toy_engine() -> Engine:
    return Engine(tiny_llama(vocab=5), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])


def test_resume_skips_finished_problems_and_repairs_a_torn_line(tmp_path):
    engine, task = toy_engine(), toy_task(6)
    sampler = S.Ancestral(Q.Tempered(1.0), n=3)
    path = run_eval(task, engine, sampler, "anc", str(tmp_path), max_new_tokens=3, batch_size=2, progress=False)
    lines = open(path).read().splitlines()
    assert len(lines) == 6
    with open(path, "w") as f:  # a crash: 3 complete records and half of the 4th
        f.write("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    with pytest.warns(MalformedLineWarning, match="torn"):
        run_eval(task, engine, sampler, "anc", str(tmp_path), max_new_tokens=3, batch_size=2, progress=False)
    recs = list(read_jsonl(path))
    assert sorted(r["uid"] for r in recs) == sorted(p["unique_id"] for p in task.problems)
    assert all(len(r["samples"]) == 3 for r in recs)
    run_eval(task, engine, sampler, "anc", str(tmp_path), max_new_tokens=3, progress=False)  # all done: no-op
    assert len(open(path).read().splitlines()) == 6


def test_a_reward_error_is_recorded_and_the_rest_goes_on(tmp_path):
    def reward(prompt, continuation):
        if prompt == "bd":
            raise ValueError("bad problem")
        return 0.0

    engine, task = toy_engine(), toy_task(4)
    sampler = S.SMC(T.Power(2) * T.Reward(reward), Q.Tempered(1.0), particles=2)
    path = run_eval(task, engine, sampler, "smc", str(tmp_path), max_new_tokens=2, batch_size=4, progress=False)
    recs = {r["uid"]: r for r in read_jsonl(path)}
    assert set(recs) == {"toy-0", "toy-1", "toy-2", "toy-3"}
    assert "bad problem" in recs["toy-1"]["error"] and "bad problem" in recs["toy-3"]["error"]
    assert "error" not in recs["toy-0"] and recs["toy-0"]["log_evidence"] is not None


def test_report_table(tmp_path):
    engine = toy_engine()
    for i in range(2):  # two shards into two directories, merged by the report
        t = toy_task(6)
        t.problems = shard(t.problems, i, 2)
        run_eval(
            t,
            engine,
            S.Ancestral(Q.Tempered(1.0), n=2),
            "anc",
            str(tmp_path / f"s{i}"),
            max_new_tokens=3,
            progress=False,
        )
    rows = summarise(load_records([str(tmp_path / "s0"), str(tmp_path / "s1")]))
    assert len(rows) == 1 and rows[0]["n"] == 6
    assert "anc" in table(rows)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from smcdecode import Engine, proposals, samplers
    from smcdecode.evaluate import TaskAdapter, run_eval
    from smcdecode.testing import CharTokenizer, tiny_llama
    problems = [{"unique_id": f"p{i}", "prompt": "abcd"[i % 4]} for i in range(40)]
    task = TaskAdapter("toy", problems, lambda p: p["prompt"], lambda t: t, lambda p, a: False)
    engine = Engine(tiny_llama(vocab=5), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])
    run_eval(task, engine, samplers.Ancestral(proposals.Tempered(1.0), n=200), "anc", sys.argv[1],
             max_new_tokens=4, batch_size=1, progress=False)
    """
)


def test_kill_9_then_restart_loses_and_duplicates_nothing(tmp_path):
    out = str(tmp_path)
    path = os.path.join(out, "results.jsonl")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, out])
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(path) and len(open(path, "rb").read().split(b"\n")) > 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(read_jsonl(path)))
    assert 0 < partial < 40
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, out], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # after a restart every line is complete
        recs = list(read_jsonl(path))
    assert sorted(r["uid"] for r in recs) == sorted(f"p{i}" for i in range(40))
    for line in open(path).read().splitlines():
        json.loads(line)


def test_record_writer_appends_complete_lines(tmp_path):
    path = str(tmp_path / "r.jsonl")
    with RecordWriter(path) as w:
        w.append({"a": 1})
        w.append({"b": "x\ny"})
    assert list(read_jsonl(path)) == [{"a": 1}, {"b": "x\ny"}]


def test_busy_wall_counts_overlapping_streamed_spans_once():
    """Streamed records span [time − wall_time, time] and overlap; batch records hold shares."""
    from smcdecode.report import busy_wall

    streamed = [
        {"time": 10.0, "wall_time": 4.0, "streamed": True},  # [6, 10]
        {"time": 12.0, "wall_time": 5.0, "streamed": True},  # [7, 12] overlaps: union [6, 12]
        {"time": 20.0, "wall_time": 2.0, "streamed": True},  # [18, 20]
    ]
    batched = [{"time": 30.0, "wall_time": 1.5}, {"time": 30.0, "wall_time": 1.5}]
    assert busy_wall(streamed) == pytest.approx(8.0)
    assert busy_wall(batched) == pytest.approx(3.0)
    assert busy_wall(streamed + batched) == pytest.approx(11.0)
    assert busy_wall([{k: v for k, v in r.items() if k != "streamed"} for r in streamed], streamed=True) == 8.0
    (row,) = summarise([{**r, "task": "t", "method": "m", "correct": True} for r in streamed])
    assert row["wall_time"] == pytest.approx(8.0 / 3)


def test_mcnemar_exact_p_values():
    """Reference values: b = 1, c = 5 → 2 · 7/64; b = c → 1; no discordant pair → 1."""
    from smcdecode.report import mcnemar

    a = [True] * 1 + [False] * 5 + [True] * 4
    b = [False] * 1 + [True] * 5 + [True] * 4
    assert mcnemar(a, b) == {"n": 10, "b": 1, "c": 5, "p": pytest.approx(14 / 64)}
    assert mcnemar([True, False], [False, True])["p"] == 1.0
    assert mcnemar([True, True], [True, True])["p"] == 1.0
    assert mcnemar([False] * 10, [True] * 10)["p"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="correct_b"):
        mcnemar([True], [True, False])


def test_humaneval_public_examples_follow_the_docstring_conventions():
    by_uid = {p["unique_id"]: p for p in humaneval.load()}
    # an escaped "\n" inside an example stays a literal instead of splitting the example
    p51 = by_uid["HumanEval/51"]
    examples = humaneval.public_examples(p51)
    assert len(examples) == 6
    assert examples[1] == ['remove_vowels("abcdef\\nghijklm")\n', "'bcdf\\nghjklm'\n"]
    assert humaneval.public_tests_passed(p51, "    return text\n") == pytest.approx(2 / 6)
    # `f(x) == y` with nothing under it expects True; "21" is the literal '21'
    assert humaneval.public_examples(by_uid["HumanEval/162"])[0][1] == "True\n"
    assert humaneval.public_examples(by_uid["HumanEval/65"])[0] == ["circular_shift(12, 1)\n", "'21'\n"]
    # every canonical solution passes its own examples, but for the two docstrings that are wrong
    scored = {u: humaneval.public_tests_passed(p, p["canonical_solution"]) for u, p in by_uid.items()}
    with_examples = {u for u, p in by_uid.items() if humaneval.public_examples(p)}
    assert len(with_examples) == 76
    assert {u for u in with_examples if scored[u] != 1.0} == {"HumanEval/47", "HumanEval/116"}
    assert scored["HumanEval/47"] == 0.5  # its median example says 8.0 where the median is 15.0


def test_humaneval_unparseable_docstring_examples_score_zero():
    prompt = 'def f(x):\n    """\n    >>> f(1)\n    1\n      >>> f(2)\n    2\n    """\n'
    problem = {"prompt": prompt, "entry_point": "f", "canonical_solution": "    return x\n"}
    assert humaneval.public_examples(problem) == []
    assert humaneval.public_tests_passed(problem, "    return x\n") == 0.0
