"""MATH-500: loading, prompts (Karan & Du's raw prompt or the chat template), extraction of the
last brace-matched ``\\boxed{...}``, and grading with ``math-verify``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from smcdecode.errors import ArgumentError
from smcdecode.records import read_jsonl

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FIELDS = ("problem", "answer", "unique_id")


def load(source: str) -> list[dict[str, Any]]:
    """Problems from a JSONL path, or ``"hub"`` for the dataset HuggingFaceH4/MATH-500 (needs the
    ``datasets`` package and a network). Malformed lines are reported and skipped."""
    if source == "hub":
        try:
            from datasets import load_dataset  # type: ignore[import-not-found]
        except ImportError as e:
            raise ArgumentError("data", "'hub' needs `pip install datasets` and a network; or pass a path") from e
        return [dict(r) for r in load_dataset("HuggingFaceH4/MATH-500", split="test")]
    if not os.path.exists(source):
        raise ArgumentError("data", f"no such file: {source}")
    out = []
    for rec in read_jsonl(source, what="problem"):
        if all(k in rec for k in FIELDS):
            out.append(rec)
        else:
            import warnings

            warnings.warn(f"{source}: skipping a problem without {FIELDS}: {json.dumps(rec)[:80]}", stacklevel=2)
    return out


def select(
    problems: list[dict[str, Any]], levels: Sequence[int] | None = None, subjects: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    if levels:
        problems = [p for p in problems if int(p.get("level", -1)) in set(levels)]
    if subjects:
        wanted = {s.lower() for s in subjects}
        problems = [p for p in problems if str(p.get("subject", "")).lower() in wanted]
    return problems


def prompt(problem: dict[str, Any], style: str = "raw", tokenizer: Any = None) -> str:
    text = f"{problem['problem']}\n{INSTRUCTION}"
    if style == "raw":
        return text
    if style == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ArgumentError("prompt", "the chat style needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    raise ArgumentError("prompt", f"unknown prompt style {style!r}; use raw or chat")


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if absent
    or unclosed."""
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def grade(answer: str | None, gold: str) -> bool:
    """True when ``answer`` (boxed content) is mathematically equal to ``gold`` (math-verify, in a
    child process bounded by a timeout: see :mod:`smcdecode.tasks.mathverify`); string equality
    when math-verify fails on them, False when it overruns."""
    if answer is None:
        return False
    from smcdecode.tasks.mathverify import verifier

    ok = verifier().grade(answer, gold)
    return answer.strip() == gold.strip() if ok is None else ok


def boxed_parses(prompt_text: Any, continuation: Any) -> float:
    """Reward: 1 when the continuation has a last boxed answer that math-verify can parse."""
    ans = last_boxed(continuation if isinstance(continuation, str) else None)
    if ans is None:
        return 0.0
    from smcdecode.tasks.mathverify import verifier

    return 1.0 if verifier().parses(ans) else 0.0
