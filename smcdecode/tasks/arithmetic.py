"""The built-in task: procedural few-shot addition with exact integer answers.

Problems mix three difficulties (1-digit + 1-digit, 2-digit + 1-digit, 2-digit + 2-digit) so a
135M model solves some and not others. A prompt is five solved examples then the question;
the answer is the first integer of the continuation, which ends at a newline.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

KINDS = ("1+1", "2+1", "2+2")


@dataclass(frozen=True)
class Problem:
    uid: str
    a: int
    b: int
    kind: str

    @property
    def answer(self) -> int:
        return self.a + self.b

    def question(self) -> str:
        return f"Q: What is {self.a} + {self.b}?\nA:"


def _draw(rng: random.Random, kind: str) -> tuple[int, int]:
    if kind == "1+1":
        return rng.randint(1, 9), rng.randint(1, 9)
    if kind == "2+1":
        return rng.randint(10, 89), rng.randint(1, 9)
    return rng.randint(10, 99), rng.randint(10, 99)


def problems(n: int, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        a, b = _draw(rng, kind)
        out.append(Problem(f"add-{seed}-{i}", a, b, kind))
    return out


def prompt(problem: Problem, shots: int = 5, seed: int = 12345) -> str:
    rng = random.Random(seed + KINDS.index(problem.kind))  # fixed shots per kind
    examples = []
    for _ in range(shots):
        a, b = _draw(rng, problem.kind)
        examples.append(f"Q: What is {a} + {b}?\nA: {a + b}\n")
    return "".join(examples) + problem.question()


def extract(text: str | None) -> int | None:
    m = re.search(r"-?\d+", text or "")
    return int(m.group()) if m else None


def grade(problem: Problem, text: str | None) -> bool:
    return extract(text) == problem.answer
